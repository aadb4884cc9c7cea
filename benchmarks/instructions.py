"""The plugin's cost in instructions: deterministic, where step times are not.

On a shared or virtual machine the scheduler's step time moves by tens of per
cent from one run to the next, more than the costs being measured. Instruction
counts do not: this runs the step benchmark's workloads (vLLM's real scheduler)
under callgrind, once per variant, and reads how many instructions each run
took while stepping (schedule, the benchmark's fake model, update_from_output
and the plugin's collections; not the set-up), the plugin against no plugin and
against vLLM's own KV-cache metrics. Instructions are not time (cache misses and
branch mispredictions are not counted), so the README shows both.

    python benchmarks/instructions.py [--json OUT]     # about 25 minutes (vLLM's import under callgrind is most of it)

Needs valgrind (callgrind, callgrind_control).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("baseline", "plugin", "plugin_spans", "vllm_kv_metrics")


def _scenarios(step):
    return {
        "pressured": step.Scenario(384, num_requests=60),
        "seqs256": step._long_decodes(256, 48),
        "seqs1024": step._long_decodes(1024, 24),
    }


def _callgrind(*args: str) -> None:
    """Ask callgrind (which runs this process) to zero or dump its counters. It
    handles the request while this process executes code, so spin, not wait."""
    control = subprocess.Popen(["callgrind_control", *args, str(os.getpid())],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while control.poll() is None:
        pass
    if control.returncode:
        raise SystemExit(f"callgrind_control {' '.join(args)} failed: is this process running under callgrind?")


def inside() -> None:
    """Under callgrind: every scenario and variant, counters zeroed before a run
    and dumped after it, labelled '<scenario> <variant>'."""
    sys.path.insert(0, str(HERE))
    import step

    bench = step.StepBench(collect_every=1000)
    scenarios = _scenarios(step)
    specs = {name: scenario.specs(bench.workloads) for name, scenario in scenarios.items()}
    warm = bench.workloads.generate("sharegpt", 10, seed=1, max_len=4096)
    for variant in VARIANTS:  # every code path imported and warmed before counting
        bench.run(variant, scenarios["pressured"], warm, seed=1)
    for name, scenario in scenarios.items():
        steps = set()
        for variant in VARIANTS:

            @contextlib.contextmanager
            def counted():  # the stepping alone: not the scheduler's or the exporters' set-up
                _callgrind("--zero")
                yield
                _callgrind(f"--dump={name} {variant}")

            result = bench.run(variant, scenario, specs[name], around_steps=counted)
            steps.add(result["steps"])
            print(f"{name} {variant}: {result['steps']} steps", file=sys.stderr, flush=True)
        if len(steps) != 1:
            raise SystemExit(f"{name}: the variants disagree on the number of steps: {steps}")


def counts(out_dir: Path) -> dict[str, dict[str, int]]:
    """Instructions per labelled dump, from callgrind's output files."""
    found: dict[str, dict[str, int]] = {}
    for path in out_dir.glob("callgrind.out*"):
        text = path.read_text(errors="replace")
        label = re.search(r"^desc: Trigger: dump (.+)$", text, re.M)
        total = re.search(r"^summary: (\d+)$", text, re.M)
        if label and total:
            scenario, variant = label.group(1).rsplit(" ", 1)
            found.setdefault(scenario, {})[variant] = int(total.group(1))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the counts and ratios as JSON to this file")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        inside()
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--vgdb=yes", f"--callgrind-out-file={out_dir}/callgrind.out.%p",
             sys.executable, __file__, "--inside"],
            check=True, stdout=sys.stderr, stderr=subprocess.DEVNULL if not os.environ.get("VERBOSE") else None,
        )
        found = counts(out_dir)
    result = {}
    print(f"{'scenario':10s} {'variant':16s} {'instructions':>16s} {'ratio':>7s}")
    for scenario, by_variant in found.items():
        base = by_variant["baseline"]
        result[scenario] = {v: {"instructions": n, "ratio": n / base} for v, n in by_variant.items()}
        for variant in VARIANTS:
            n = by_variant[variant]
            print(f"{scenario:10s} {variant:16s} {n:16,d} {n / base:7.4f}")
    if args.json:
        args.json.write_text(json.dumps({"instructions": result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The plugin's cost in instructions: deterministic, where step times are not.

On a shared or virtual machine the scheduler's step time moves by tens of per
cent from one run to the next, more than the costs being measured. Instruction
counts do not: this runs the step benchmark's workloads (vLLM's real scheduler)
under callgrind, once per variant, and reads how many instructions each run
took while stepping (schedule, the benchmark's fake model, update_from_output
and the plugin's collections; not the set-up), the plugin against no plugin and
against vLLM's own KV-cache metrics. Instructions are not time (cache misses and
branch mispredictions are not counted), so the README shows both.

    python benchmarks/instructions.py [--json OUT]     # about 35 minutes

Counts are taken only inside operator.call (callgrind's --toggle-collect), which
holds the stepping alone: the same run twice differs by a few hundred
instructions. On seqs256 the plugin's extra is also split by hook group
(hook_profile.HOOK_GROUPS), each unwrapped in turn.

Needs valgrind (callgrind, callgrind_control).
"""

from __future__ import annotations

import argparse
import gc
import json
import operator
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("baseline", "plugin", "plugin_spans", "vllm_kv_metrics")
# where the plugin's cost is split by hook group (hook_profile.HOOK_GROUPS)
ABLATED = "seqs256"
FINAL_COLLECTION = "final collection"


_SCENARIO_NAMES = ("pressured", "seqs256", "seqs1024")


def _scenarios(step):
    return {
        "pressured": step.Scenario(384, num_requests=60),
        "seqs256": step._long_decodes(256, 48),
        "seqs1024": step._long_decodes(1024, 24),
    }


def _dump(label: str) -> None:
    """Ask callgrind (which runs this process) to write out and reset its
    counters. It handles the request while this process executes code, so
    spin, not wait (the spinning is not counted: collection is on only inside
    operator.call)."""
    control = subprocess.Popen(["callgrind_control", f"--dump={label}", str(os.getpid())],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while control.poll() is None:
        pass
    if control.returncode:
        raise SystemExit("callgrind_control failed: is this process running under callgrind?")


def _slug(name: str) -> str:
    """A dump label callgrind_control takes whole: no slashes or parentheses (and no word may
    start with "-", which it reads as an option and drops the dump)."""
    return re.sub(r"\W+", "_", name).strip("_")


def _counted(label: str, gc_off: bool = False):
    """An around_steps for StepBench.run: the stepping runs inside operator.call,
    the only place callgrind counts (--toggle-collect), then the count is dumped.
    `gc_off`: no cyclic garbage collection while counting, so two codes are compared
    by what they execute, not by where a collection of vLLM's objects happened to fall."""
    def around_steps(run):
        if gc_off:
            gc.collect()
            gc.disable()
        try:
            result = operator.call(run)
        finally:
            gc.enable()
        _dump(label)
        return result
    return around_steps


def inside(only: list[str] | None = None, breakdown: bool = True, variants: tuple[str, ...] = VARIANTS,
           gc_off: bool = False) -> None:
    """Under callgrind: every scenario and variant, then, on `ABLATED`, the
    plugin with each group of hooks unwrapped in turn and without its final
    collection; one dump per run, labelled '<scenario> <variant>'."""
    sys.path.insert(0, str(HERE))
    import step
    from hook_profile import HOOK_GROUPS

    bench = step.StepBench(collect_every=1000)
    every = _scenarios(step)
    scenarios = {name: s for name, s in every.items() if not only or name in only}
    specs = {name: scenario.specs(bench.workloads) for name, scenario in scenarios.items()}
    warm = bench.workloads.generate("sharegpt", 10, seed=1, max_len=4096)
    for variant in variants:  # every code path imported and warmed before counting
        bench.run(variant, every["pressured"], warm, seed=1)
    bench._set_instrumented(True)
    hooked = {f"{cls.__name__}.{method}": (cls, method) for cls, method in bench.instrumentor._wrapped}
    for name, scenario in scenarios.items():
        runs = [(variant, variant, {}) for variant in variants]
        if name == ABLATED and breakdown:
            runs += [(f"minus_{_slug(group)}", "plugin", {"ablate": [hooked.get(q, q) for q in qualnames]})
                     for group, qualnames in HOOK_GROUPS.items()]
            runs.append((f"minus_{_slug(FINAL_COLLECTION)}", "plugin", {"collect": False}))
        steps = set()
        for label, variant, options in runs:
            result = bench.run(variant, scenario, specs[name], around_steps=_counted(f"{name} {label}", gc_off),
                               **options)
            if result.get("hook_errors"):
                raise SystemExit(f"{name} {label}: the plugin's hooks raised {result['hook_errors']} errors")
            steps.add(result["steps"])
            print(f"{name} {label}: {result['steps']} steps", file=sys.stderr, flush=True)
        if len(steps) != 1:
            raise SystemExit(f"{name}: the runs disagree on the number of steps: {steps}")


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
    parser.add_argument("--scenarios", help="comma-separated subset of " + ", ".join(_SCENARIO_NAMES))
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-hook-group split (faster)")
    parser.add_argument("--variants", help="comma-separated subset of " + ", ".join(VARIANTS) + " (baseline always)")
    parser.add_argument("--gc-off", action="store_true",
                        help="no garbage collection while counting (compare two codes' paths, not GC timing)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    only = args.scenarios.split(",") if args.scenarios else None
    variants = VARIANTS if not args.variants else ("baseline", *[v for v in args.variants.split(",") if v != "baseline"])
    if args.inside:
        inside(only, not args.no_breakdown, variants, args.gc_off)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--vgdb=yes", "--collect-atstart=no", "--toggle-collect=_operator_call",
             f"--callgrind-out-file={out_dir}/callgrind.out.%p", sys.executable, __file__, "--inside",
             *(argv or sys.argv[1:])],
            check=True, stdout=sys.stderr, stderr=subprocess.DEVNULL if not os.environ.get("VERBOSE") else None,
            # one string-hash seed for every run: vLLM seeds its block hashes from it (random
            # otherwise), and dict and set layouts follow it; with it unset the same code's
            # count moved by up to 6M instructions (0.4%) between two runs, collector off
            env={**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")},
        )
        found = counts(out_dir)
    result = {}
    print(f"{'scenario':10s} {'variant':16s} {'instructions':>16s} {'ratio':>7s}")
    for scenario, by_variant in found.items():
        base = by_variant["baseline"]
        result[scenario] = {v: {"instructions": n, "ratio": n / base} for v, n in by_variant.items() if v in VARIANTS}
        for variant in variants:
            n = by_variant[variant]
            print(f"{scenario:10s} {variant:16s} {n:16,d} {n / base:7.4f}")
    if args.no_breakdown or "plugin" not in variants or (only and ABLATED not in only):
        if args.json:
            args.json.write_text(json.dumps({"instructions": result}, indent=2) + "\n")
        return 0
    from hook_profile import HOOK_GROUPS

    parts = [*HOOK_GROUPS, FINAL_COLLECTION]
    expected = {(scenario, v) for scenario in (only or _SCENARIO_NAMES) for v in variants}
    expected |= {(ABLATED, f"minus_{_slug(p)}") for p in parts}
    missing = expected - {(scenario, v) for scenario, counted in found.items() for v in counted}
    if missing:
        raise SystemExit(f"callgrind wrote no count for {sorted(missing)} (scenarios {sorted(found)})")
    by_variant = found[ABLATED]
    base, plugin = by_variant["baseline"], by_variant["plugin"]
    breakdown = {part: plugin - by_variant[f"minus_{_slug(part)}"] for part in parts}
    breakdown["rest (hooks' set-up, interactions)"] = plugin - base - sum(breakdown.values())
    print(f"\nwhere the plugin's {plugin - base:,d} extra instructions go ({ABLATED}, metrics only: "
          f"plugin - plugin without that part)")
    for part, n in breakdown.items():
        print(f"  {part:36s} {n:14,d}  {n / base * 100:6.2f}% of vLLM's")
    result[ABLATED]["plugin_breakdown"] = {part: {"instructions": n, "pct_of_baseline": n / base * 100}
                                           for part, n in breakdown.items()}
    if args.json:
        args.json.write_text(json.dumps({"instructions": result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""--profile: the plugin's self time per hook, a hook-group ablation and cProfile listings."""

from __future__ import annotations

import inspect
import statistics
import time

import numpy as np

from collection import Collector, _advance, build_block_map
from common import log
from step import Config, Scenario, StepBench


HOOK_GROUPS = {
    "allocate_slots": ("KVCacheManager.allocate_slots",),
    "block alloc/free/touch": (
        "BlockPool.get_new_blocks", "BlockPool.touch", "BlockPool.free_blocks", "BlockPool.unpin_blocks",
    ),
    "prefix-cache hash/evict": (
        "BlockPool.cache_full_blocks", "BlockPool.cache_partial_block", "BlockPool.move_block_hashes",
        "BlockPool.evict_blocks", "BlockPool.reset_prefix_cache",
    ),
    "request lifecycle": (
        "KVCacheManager.record_prefix_cache_stats", "KVCacheManager.get_computed_blocks",
        "KVCacheManager.remove_skipped_blocks", "Scheduler._preempt_request", "Scheduler._free_request",
    ),
    "step boundary (self-check)": ("Scheduler.schedule",),
}


class _Dummy:
    def method(self, x):
        return x


def _dispatch_calibration(n: int = 200_000) -> dict:
    """us per call of the plugin's hook dispatch with a pass-through wrapper, and
    the bias the self-time instrumentation below adds to each measured call."""
    from vllm_frag_otel.plugin import hooks

    clock = time.perf_counter
    original = _Dummy.__dict__["method"]

    def passthrough(wrapped, instance, args, kwargs):
        return wrapped(instance, *args, **kwargs)

    def loop() -> float:
        obj, best = _Dummy(), float("inf")
        for _ in range(5):
            t = clock()
            for i in range(n):
                obj.method(i)
            best = min(best, clock() - t)
        return best / n * 1e6

    try:
        direct = loop()
        _Dummy.method = hooks._hooked(original, passthrough)
        hooked = loop()
        timed_self = float("inf")
        obj = _Dummy()
        for _ in range(5):
            acc = [0, 0.0, 0.0]
            _Dummy.method = _timed_hook(_Dummy, original, passthrough, acc)
            for i in range(n):
                obj.method(i)
            timed_self = min(timed_self, (acc[1] - acc[2]) / acc[0] * 1e6)
    finally:
        _Dummy.method = original
    dispatch = hooked - direct
    return {"direct_us": direct, "dispatch_us": dispatch, "bias_us": timed_self - dispatch}


def _timed_hook(cls, original, wrapper, acc):
    """The plugin's hook (hooks._hooked) of `original` through `wrapper`, timed:
    acc = [calls, s in the hook, s in vLLM's original under it]."""
    from vllm_frag_otel.plugin import hooks

    clock = time.perf_counter

    def timed_original(self, *args, **kwargs):
        t = clock()
        try:
            return original(self, *args, **kwargs)
        finally:
            acc[2] += clock() - t

    timed_original.__name__ = getattr(original, "__name__", "original")
    timed_original.__signature__ = inspect.signature(original)  # a compiled hook forwards by it
    inner = hooks._hooked(timed_original, wrapper)

    def outer(self, *args, **kwargs):
        t = clock()
        try:
            return inner(self, *args, **kwargs)
        finally:
            acc[1] += clock() - t
            acc[0] += 1

    outer.__vllm_frag_otel_hook__ = True
    outer.__wrapped__ = original
    return outer


def hook_self_times(bench: StepBench, scenario: Scenario, specs, runs: int) -> dict:
    """The plugin's own time in each hook (the hook minus the vLLM method it wraps,
    nested hooks excluded), summed over `runs` hooks-only runs, against baselines
    interleaved with them."""
    from vllm_frag_otel.plugin import hooks

    calibration = _dispatch_calibration()
    stats: dict[str, list] = {}
    baseline_s = plugin_s = 0.0
    steps = 0
    try:
        for _ in range(runs):
            baseline_s += bench.run("baseline", scenario, specs)["step_s"]  # uninstruments
            bench._set_instrumented(True)
            for cls, method in bench.instrumentor._wrapped:
                if method == "__init__":
                    continue
                qualname = f"{cls.__name__}.{method}"
                acc = stats.setdefault(qualname, [0, 0.0, 0.0])
                hook = cls.__dict__[method]
                setattr(cls, method, _timed_hook(cls, hook.__wrapped__, hooks.WRAPPERS[qualname], acc))
            res = bench.run("plugin", scenario, specs, collect=False)  # instrument() is a no-op now
            if res.get("hook_errors"):
                raise SystemExit(f"plugin hooks raised {res['hook_errors']} errors under the profiler")
            plugin_s += res["step_s"]
            steps += res["steps"]
    finally:
        # puts back vLLM's originals (the timed hooks' __wrapped__); the next
        # instrument() builds the plugin's hooks afresh
        bench.instrumentor.uninstrument()
        bench._set_instrumented(False)
    bias = calibration["bias_us"] * 1e-6
    per_hook = {}
    for qualname, (calls, hook_s, vllm_s) in stats.items():
        if not calls:
            continue
        own = max(hook_s - vllm_s - calls * bias, 0.0)
        per_hook[qualname] = {
            "calls_per_step": calls / steps,
            "us_per_call": own / calls * 1e6,
            "vllm_us_per_call": vllm_s / calls * 1e6,
            "us_per_step": own / steps * 1e6,
            "pct_of_baseline": own / baseline_s * 100,
        }
    if not per_hook:
        raise SystemExit("the timed hooks saw no call")
    return {
        "runs": runs,
        "steps_per_run": steps // runs,
        "baseline_s": baseline_s / runs,
        "plugin_timed_s": plugin_s / runs,
        "calibration": calibration,
        "hooks": dict(sorted(per_hook.items(), key=lambda kv: -kv[1]["pct_of_baseline"])),
    }


def profile(bench: StepBench, cfg: Config, pairs: int = 5, self_time_runs: int = 3) -> str:
    """Where the plugin's time goes, on the first (pressured) pool.

    - self time per hook: each hook's own time (minus the vLLM method under it),
      us per call, calls per step and % of baseline step time;
    - hook ablation: the step time each group of hooks costs, as the median over
      `pairs` interleaved pairs of (all hooks) - (all hooks but that group), no collection;
    - cProfile of one plugin run (plugin-side functions), of 10 collections at
      the largest pool size, and the histogram fold with and without tags.
    """
    import cProfile
    import io
    import pstats

    name, scenario = next(iter(cfg.scenarios.items()))
    specs = scenario.specs(bench.workloads)
    num_blocks = scenario.num_blocks
    report = io.StringIO()
    out = report.write

    log(f"profile: self time per hook ({self_time_runs} runs, {name} pool)")
    st = hook_self_times(bench, scenario, specs, self_time_runs)
    cal = st["calibration"]
    total_pct = sum(h["pct_of_baseline"] for h in st["hooks"].values())
    total_us = sum(h["us_per_step"] for h in st["hooks"].values())
    out(f"\n=== plugin self time per hook ({name}: {num_blocks} blocks, {scenario.num_requests} requests, "
        f"{st['steps_per_run']} steps, no collection; sum of {st['runs']} runs) ===\n")
    out(f"baseline {st['baseline_s']:.3f}s/run ({st['baseline_s'] / st['steps_per_run'] * 1e6:.1f} us/step); "
        f"self time = hook - the vLLM method under it - {cal['bias_us']:.3f} us/call timer bias; "
        f"it includes the dispatch layer ({cal['dispatch_us']:.3f} us/call with a pass-through wrapper)\n")
    out(f"{'hook':42s} {'calls/step':>10s} {'us/call':>8s} {'us/step':>8s} {'% base':>7s} {'vLLM us/call':>13s}\n")
    for q, h in st["hooks"].items():
        out(f"{q:42s} {h['calls_per_step']:10.2f} {h['us_per_call']:8.3f} {h['us_per_step']:8.2f} "
            f"{h['pct_of_baseline']:6.2f}% {h['vllm_us_per_call']:13.2f}\n")
    calls = sum(h["calls_per_step"] for h in st["hooks"].values())
    out(f"{'all hooks':42s} {calls:10.2f} {'':8s} {total_us:8.2f} {total_pct:6.2f}%   "
        f"(of which dispatch {calls * cal['dispatch_us']:.2f} us/step, "
        f"{calls * cal['dispatch_us'] / (st['baseline_s'] / st['steps_per_run'] * 1e6) * 100:.2f}%)\n")

    bench._set_instrumented(True)
    groups: dict[str, list] = {name: [] for name in HOOK_GROUPS}
    groups["other"] = []
    for cls, method in bench.instrumentor._wrapped:
        if method == "__init__":
            continue  # without them nothing is tracked
        qualname = f"{cls.__name__}.{method}"
        name = next((g for g, members in HOOK_GROUPS.items() if qualname in members), "other")
        groups[name].append((cls, method))
    groups = {g: pts for g, pts in groups.items() if pts}
    log(f"profile: ablation of {len(groups)} hook groups x {pairs} pairs")
    base, full_all, saved = [], [], {g: [] for g in groups}
    errors = dict.fromkeys(groups, 0)
    for _ in range(pairs):
        base.append(bench.run("baseline", scenario, specs)["step_s"])
        for g, pts in groups.items():
            full = bench.run("plugin", scenario, specs, collect=False)
            ablated = bench.run("plugin", scenario, specs, collect=False, ablate=pts)
            errors[g] += ablated.get("hook_errors", 0)
            saved[g].append(full["step_s"] - ablated["step_s"])
            full_all.append(full["step_s"])
    baseline_s = statistics.median(base)
    hooks_s = statistics.median(full_all) - baseline_s
    out(f"\n=== hook ablation ({num_blocks} blocks, {scenario.num_requests} requests, no collection, "
        f"median of {pairs} interleaved pairs) ===\n")
    out(f"baseline {baseline_s:.3f}s, all hooks +{hooks_s:.3f}s (+{hooks_s / baseline_s * 100:.1f}%)\n")
    out(f"{'hooks removed':28s} {'saved s':>8s} {'of hook cost':>13s} {'of baseline':>12s}  members\n")
    for g, pts in groups.items():
        s = statistics.median(saved[g])
        note = f" ({errors[g]} contained hook errors without them)" if errors[g] else ""
        members = ", ".join(f"{c.__name__}.{m}" for c, m in pts)
        share = f"{s / hooks_s * 100:12.1f}%" if hooks_s > 0 else f"{'n/a':>13s}"
        out(f"{g:28s} {s:8.3f} {share} {s / baseline_s * 100:11.1f}%  {members}{note}\n")

    log("profile: cProfile")
    prof = cProfile.Profile()
    prof.enable()
    res = bench.run("plugin", scenario, specs)
    prof.disable()
    out(f"\n=== cProfile, plugin run with collections ({res['total_s']:.3f}s timed, profiler-inflated) ===\n")
    pstats.Stats(prof, stream=report).sort_stats("tottime").print_stats(
        r"vllm_frag_otel/(hooks|state|telemetry|stories)|opentelemetry", 25
    )

    size = max(cfg.pool_sizes)
    state, requests, _ = build_block_map(size, 512)
    state.snapshot()
    collector = Collector(state)
    collector.collect()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        _advance(requests)
        collector.collect()
    prof.disable()
    collector.shutdown()
    out(f"\n=== cProfile, 10 collections at {size} blocks, 512 requests ===\n")
    pstats.Stats(prof, stream=report).sort_stats("tottime").print_stats(20)

    # the fold: values buffered with a tag each (None with spans off) vs no tags at all
    from vllm_frag_otel.core.state import ALLOCATION_BUCKETS, BucketHistogram

    n = 200_000
    values = np.random.default_rng(5).lognormal(np.log(2e-5), 1.0, n)
    none_tags = [None] * n
    timings = {}
    for label, tags in (("tags=None", None), (f"tags=[None]*{n}", none_tags)):
        best = float("inf")
        for _ in range(5):
            h = BucketHistogram(ALLOCATION_BUCKETS)
            t = time.perf_counter()
            h.fold(values, tags, 0)
            best = min(best, time.perf_counter() - t)
        timings[label] = best
    out(f"\n=== BucketHistogram.fold of {n} values (best of 5) ===\n")
    for label, t in timings.items():
        out(f"{label:24s} {t * 1e3:8.2f} ms  {t / n * 1e6:.4f} us/value\n")
    return report.getvalue()



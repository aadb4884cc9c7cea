#!/usr/bin/env python
"""Performance benchmark of vllm-frag-otel on vLLM's real v1 scheduler (CPU only).

    python benchmarks/run.py [--quick] [--json OUT] [--parts step,collection,memory]
                             [--rounds N] [--collect-every N] [--profile]

Measures, side by side in one process:

1. step time: scheduler.schedule() + scheduler.update_from_output() (the fake
   model output in between is not timed) on a fixed seeded ShareGPT-like
   workload, run to completion, for
     baseline         vLLM alone (plugin uninstrumented)
     plugin           every plugin hook on, plus a full metrics collection
                      every --collect-every steps and once at the end of the
                      run, all counted in the plugin's time. One collection is
                      what the plugin's exporter runs: MeterProvider.force_flush()
                      on a PeriodicExportingMetricReader(HistogramExporter(a
                      MetricExporter that discards)): KVCacheMetrics callbacks
                      (snapshot + numpy fold of the buffered histogram values)
                      and the OTLP histogram points built at export
     plugin_spans     as plugin, with per-request spans going to an in-memory
                      span exporter (only if this plugin version has spans)
     vllm_kv_metrics  vLLM's own KVCacheMetricsCollector, sample rate 1.0
     vllm_kv_events   vLLM's own KV events (publisher "null")
   The vLLM alternatives run without the plugin. Every round runs each variant
   once on the SAME workload and seed (order rotated from round to round), on a
   pool small enough to preempt and evict and one large enough not to; each
   variant's ratio is the median over rounds of (variant time / baseline time
   of the same round).
2. collection cost on a synthetic but realistic block map (KVCacheState built
   directly, no vLLM): KVCacheState.snapshot() and a full KVCacheMetrics
   collection (as above) at 10k, 100k and 1M blocks (512 requests, one decode
   token between two collections, no histogram values buffered); the cost per
   buffered histogram value of a collection (folded with numpy) and of
   buffering it on the hot path; and the cost of one
   hook-style event call (lock + on_blocks_allocated / on_blocks_released of
   4 blocks) at each size.
3. memory: bytes per block of KVCacheState (its per-block numpy arrays),
   bytes per in-flight request.

Readable table on stdout, progress on stderr, all numbers with --json OUT.
--profile adds, on the first (pressured) pool, the plugin's self time per
hook (us per call, % of baseline step time), a hook-group ablation and cProfile
listings (not in --json).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_PLUGINS"] = "frag_otel"
os.environ["VLLM_FRAG_OTEL_EXPORTER"] = "none"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import numpy as np  # noqa: E402

from vllm_frag_otel.layout import BlockMap  # noqa: E402

T0 = time.perf_counter()
BLOCK_SIZE = 16

# Targets set by the issue.
TARGET_STEP_OVERHEAD = 1.01  # metrics only: <= +1% step time
TARGET_STEP_OVERHEAD_WITH_SPANS = 1.03  # the default (spans on): <= +3%
TARGET_COLLECTION_MS_1M = 1.0  # one collection at 1M blocks
TARGET_BYTES_PER_BLOCK = 16
FLAT_TOLERANCE = 1.25  # "flat": largest / smallest per-event cost across pool sizes


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Scenario:
    """One engine shape and workload the step benchmark runs every variant on."""

    num_blocks: int
    max_num_seqs: int = 128
    num_requests: int = 200
    output_len: int = 0  # 0: ShareGPT-like lengths; else every request decodes this many tokens
    prompt_len: int = 128  # with output_len: prompt tokens per request

    def specs(self, workloads, seed: int = 0) -> list:
        if not self.output_len:
            return workloads.generate("sharegpt", self.num_requests, seed=seed, max_len=4096)
        rng = random.Random(seed)
        return [
            workloads.RequestSpec([rng.randrange(3, 32000) for _ in range(self.prompt_len)], self.output_len)
            for _ in range(self.num_requests)
        ]


def _long_decodes(max_num_seqs: int, output_len: int) -> Scenario:
    """`max_num_seqs` requests decoding together, in a pool that holds them all."""
    blocks = max_num_seqs * math.ceil((128 + output_len) / BLOCK_SIZE) * 11 // 10 + 1
    return Scenario(blocks, max_num_seqs, max_num_seqs, output_len)


@dataclass(frozen=True)
class Config:
    rounds: int
    num_requests: int
    warmup_requests: int
    scenarios: dict  # name -> Scenario
    collect_every: int
    pool_sizes: tuple
    collection_reps: dict  # pool size -> repetitions
    event_groups: int
    event_reps: int
    memory_requests: int


FULL = Config(
    rounds=7,
    num_requests=200,
    warmup_requests=40,
    scenarios={
        "pressured": Scenario(1024), "roomy": Scenario(16384),
        "seqs256": _long_decodes(256, 512), "seqs1024": _long_decodes(1024, 256),
    },
    collect_every=1000,
    pool_sizes=(10_000, 100_000, 1_000_000),
    collection_reps={10_000: 60, 100_000: 40, 1_000_000: 20},
    event_groups=500,
    event_reps=41,
    memory_requests=2000,
)
QUICK = Config(
    rounds=3,
    num_requests=60,
    warmup_requests=20,
    scenarios={
        "pressured": Scenario(384, num_requests=60), "roomy": Scenario(8192, num_requests=60),
        "seqs256": _long_decodes(256, 96), "seqs1024": _long_decodes(1024, 32),
    },
    collect_every=1000,
    pool_sizes=(10_000, 100_000, 1_000_000),
    collection_reps={10_000: 15, 100_000: 10, 1_000_000: 5},
    event_groups=500,
    event_reps=41,
    memory_requests=500,
)


# =============================================================================
# one collection, as the plugin's exporter runs it
# =============================================================================


HISTOGRAM_METRICS = (
    "vllm.kv_cache.allocation.duration",
    "vllm.kv_cache.block.cache.duration",
    "vllm.kv_cache.block.idle.duration",
)


def _discarding_exporter():
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

    class DiscardingMetricExporter(MetricExporter):
        """Takes every export and drops it (keeps the last, to check its content)."""

        def __init__(self):
            super().__init__()
            self.exports = 0
            self.last = None

        def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs):
            self.exports += 1
            self.last = metrics_data
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
            pass

    return DiscardingMetricExporter()


class Collector:
    """The plugin's metrics pipeline over one pool, exporting to nowhere.

    `collect()` is one collection: MeterProvider.force_flush() on a
    PeriodicExportingMetricReader(HistogramExporter(discarding exporter)) that
    never fires on its own: the KVCacheMetrics callbacks (snapshot, then the
    numpy fold of the histogram values buffered since the last one), the SDK's
    gauge and counter points, the OTLP histogram points HistogramExporter adds,
    handed to an exporter that drops them.
    """

    def __init__(self, state, guard=None):
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        from vllm_frag_otel.telemetry import POOL, SCOPE, HistogramExporter, KVCacheMetrics

        self.sink = _discarding_exporter()
        exporter = HistogramExporter(self.sink)
        self.provider = MeterProvider(
            metric_readers=[PeriodicExportingMetricReader(exporter, export_interval_millis=10**9)]
        )
        exporter.metrics = KVCacheMetrics(self.provider.get_meter(SCOPE, "bench"), guard)
        exporter.metrics.add_pool(state, {POOL: "0"})
        self.collect = self.provider.force_flush

    def exported_metric_names(self) -> set:
        """Metric names of the plugin's scope in the last export (the harness checks them)."""
        from vllm_frag_otel.telemetry import SCOPE

        if self.sink.last is None:
            return set()
        return {
            m.name
            for rm in self.sink.last.resource_metrics
            for sm in rm.scope_metrics
            if sm.scope.name == SCOPE
            for m in sm.metrics
        }

    def check(self) -> None:
        missing = set(HISTOGRAM_METRICS) - self.exported_metric_names()
        if missing:
            raise SystemExit(f"a collection exported no {', '.join(sorted(missing))} (exports: {self.sink.exports})")

    def shutdown(self) -> None:
        self.provider.shutdown()


# =============================================================================
# 1. step time on vLLM's real scheduler
# =============================================================================


class StepBench:
    """Runs one workload to completion under one variant, timing the scheduler."""

    BASE_VARIANTS = ("baseline", "plugin", "vllm_kv_metrics", "vllm_kv_events")

    def __init__(self, collect_every: int):
        from vllm.plugins import load_general_plugins

        load_general_plugins()
        from vllm.v1.core.block_pool import BlockPool

        from vllm_frag_otel import sim, telemetry, workloads
        from vllm_frag_otel.hooks import guard, instrumentor

        self.sim, self.workloads, self.telemetry = sim, workloads, telemetry
        self.instrumentor, self.guard, self.BlockPool = instrumentor, guard, BlockPool
        if not instrumentor.is_instrumented:
            raise SystemExit("vLLM did not load the frag_otel plugin through its entry point")
        self.collect_every = collect_every
        self.variants = list(self.BASE_VARIANTS)
        why = self._spans_unavailable()
        if why is None:
            self.variants.append("plugin_spans")
        else:
            log(f"plugin_spans variant skipped: {why}")

    # -- variants ---------------------------------------------------------------

    def _spans_unavailable(self) -> str | None:
        """This plugin version's per-request spans, if it has them (feature-detected)."""
        import inspect

        try:
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: F401

            from vllm_frag_otel import config

            if not hasattr(self.telemetry, "install") or "spans" not in config.Settings.__dataclass_fields__:
                return "this plugin version has no per-request spans"
            if "span_exporter" not in inspect.signature(self.telemetry.Runtime).parameters:
                return "telemetry.Runtime takes no span_exporter"
        except Exception as exc:  # an API in flux: measure what exists
            return f"{type(exc).__name__}: {exc}"
        return None

    def _set_instrumented(self, on: bool) -> None:
        if on:
            if not self.instrumentor.instrument():
                raise SystemExit("instrumentor.instrument() refused to instrument this vLLM")
            g = self.guard()
            g.active, g.errors = True, 0
        else:
            self.instrumentor.uninstrument()
        hooked = getattr(self.BlockPool.__dict__["get_new_blocks"], "__vllm_frag_otel_hook__", False)
        assert hooked == on, f"BlockPool.get_new_blocks hooked={hooked}, expected {on}"

    def _spans_runtime(self):
        import dataclasses

        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from vllm_frag_otel import config

        settings = dataclasses.replace(config.load_settings(), spans=True)
        exporter = InMemorySpanExporter()
        runtime = self.telemetry.Runtime(settings, {}, self.guard(), span_exporter=exporter)
        return runtime, exporter

    # -- one run ------------------------------------------------------------------

    def run(self, variant: str, scenario: Scenario, specs, seed: int = 0, collect: bool = True, ablate=None,
            around_steps=contextlib.nullcontext) -> dict:
        """One run to completion. `collect=False`: no metrics collection at all
        (hooks only); `ablate=[(cls, method), ...]`: those hooks unwrapped (profiling);
        `around_steps()`: a context entered around the stepping alone (the scheduler's
        steps and the plugin's collections, not the set-up), e.g. an instruction count."""
        plugin = variant.startswith("plugin")
        # instrumentation first, then the scheduler: pools built unhooked are not tracked
        self._set_instrumented(plugin)
        restore = runtime = previous_runtime = span_exporter = None
        if ablate:
            restore = [(cls, m, cls.__dict__[m]) for cls, m in ablate]
            for cls, m, hook in restore:
                assert getattr(hook, "__vllm_frag_otel_hook__", False), f"{cls.__name__}.{m} is not a plugin hook"
                setattr(cls, m, hook.__wrapped__)
        try:
            if variant == "plugin_spans":
                runtime, span_exporter = self._spans_runtime()
                previous_runtime = self.telemetry.install(runtime)
            shape = self.sim.EngineShape(
                num_blocks=scenario.num_blocks,
                block_size=BLOCK_SIZE,
                max_num_seqs=scenario.max_num_seqs,
                max_num_batched_tokens=max(2048, scenario.max_num_seqs),
                kv_events=variant == "vllm_kv_events",
                kv_metrics_sample=1.0 if variant == "vllm_kv_metrics" else None,
            )
            try:
                scheduler = self.sim.build_scheduler(shape)
            finally:
                if runtime is not None:
                    self.telemetry.install(previous_runtime)
            result = self._run(variant, scheduler, specs, seed, collect, around_steps)
        finally:
            for cls, m, hook in restore or ():
                setattr(cls, m, hook)
            if runtime is not None:
                runtime.shutdown()
        if span_exporter is not None:
            result["spans"] = len(span_exporter.get_finished_spans())
        return result

    def _run(self, variant: str, scheduler, specs, seed: int, collect: bool, around_steps) -> dict:
        from vllm_frag_otel import analyzer_for

        sim = self.sim
        plugin = variant.startswith("plugin")
        pool = scheduler.kv_cache_manager.block_pool
        state = None
        if plugin:
            state = analyzer_for(scheduler)  # raises if the pool is not tracked
        else:
            assert not any(
                k.startswith("_vllm_frag_otel") for k in pool.__dict__
            ), "an unhooked run's pool is tracked"
        if variant == "vllm_kv_metrics":
            assert scheduler.kv_metrics_collector is not None
            assert scheduler.kv_metrics_collector.sample_rate == 1.0
        else:
            assert getattr(scheduler, "kv_metrics_collector", None) is None
        assert pool.enable_kv_cache_events == (variant == "vllm_kv_events")

        requests = sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], BLOCK_SIZE)
        for request in requests:
            scheduler.add_request(request)
        collector = collect_once = None
        if plugin and collect:
            collector = Collector(state, self.guard())
            collect_once = collector.collect

        rng = random.Random(seed)
        schedule, update = scheduler.schedule, scheduler.update_from_output
        fake_output = sim.fake_model_output
        clock = time.perf_counter
        collect_every = self.collect_every
        step_s = collect_s = 0.0
        collections = steps = 0
        gc.collect()
        with around_steps():
            cpu_start = time.process_time()  # every thread of the process: span export threads too
            while scheduler.has_requests():
                t0 = clock()
                scheduler_output = schedule()
                t1 = clock()
                model_output = fake_output(scheduler_output, scheduler, rng)
                t2 = clock()
                update(scheduler_output, model_output)
                t3 = clock()
                step_s += (t1 - t0) + (t3 - t2)
                steps += 1
                if collect_once is not None and steps % collect_every == 0:
                    t0 = clock()
                    collect_once()
                    collect_s += clock() - t0
                    collections += 1
                if steps > 200_000:
                    raise RuntimeError("the scheduler did not drain")
            if collect_once is not None:  # the histograms buffered since the last export are paid for too
                t0 = clock()
                collect_once()
                collect_s += clock() - t0
                collections += 1
            cpu_s = time.process_time() - cpu_start

        result = {
            "variant": variant,
            "steps": steps,
            "step_s": step_s,
            "collect_s": collect_s,
            "collections": collections,
            "total_s": step_s + collect_s,
            "cpu_s": cpu_s,
            "preemptions": sum(r.num_preemptions for r in requests),
        }
        if plugin:
            g = self.guard()
            result["hook_errors"] = g.errors
            if g.errors == 0 and g.active:
                snap = state.snapshot()
                result["evictions"] = snap.evictions
                result["allocation_attempts"] = snap.allocation_attempts
            if collector is not None:
                try:
                    if g.errors == 0 and g.active:
                        collector.check()
                finally:
                    collector.shutdown()
        return result

    # -- the interleaved experiment ---------------------------------------------

    def experiment(self, cfg: Config, rounds: int) -> dict:
        specs = {name: scenario.specs(self.workloads) for name, scenario in cfg.scenarios.items()}
        warm_specs = self.workloads.generate("sharegpt", cfg.warmup_requests, seed=1, max_len=4096)
        first = next(iter(cfg.scenarios.values()))
        log(f"warm-up: {len(self.variants)} variants x {cfg.warmup_requests} requests")
        for variant in self.variants:
            self.run(variant, first, warm_specs, seed=1)

        runs: dict[str, list[dict]] = {name: [] for name in cfg.scenarios}
        k = len(self.variants)
        for r in range(rounds):
            scenario_order = list(cfg.scenarios.items())
            if r % 2:
                scenario_order.reverse()
            for name, scenario in scenario_order:
                order = self.variants[r % k :] + self.variants[: r % k]
                results = {v: self.run(v, scenario, specs[name]) for v in order}
                for res in results.values():
                    if res.get("hook_errors"):
                        raise SystemExit(f"plugin hooks raised {res['hook_errors']} errors during a run: {res}")
                steps = {res["steps"] for res in results.values()}
                if len(steps) != 1:
                    raise SystemExit(f"variants disagree on the number of steps: {results}")
                runs[name].append(results)
                base = results["baseline"]["total_s"]
                ratios = "  ".join(f"{v}={results[v]['total_s'] / base:.3f}" for v in self.variants[1:])
                log(f"round {r + 1}/{rounds} {name:9s} baseline {base:.3f}s  {ratios}")
        return {name: summarize_scenario(name, cfg.scenarios[name], rs, self.variants) for name, rs in runs.items()}


def _quantiles(values: list[float]) -> dict:
    values = sorted(values)
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1, q3 = values[0], values[-1]
    return {"median": statistics.median(values), "p25": q1, "p75": q3, "min": values[0], "max": values[-1]}


def summarize_scenario(name: str, scenario: Scenario, rounds: list[dict], variants: list[str]) -> dict:
    first = rounds[0]
    base_steps = first["baseline"]["steps"]
    out = {
        "num_blocks": scenario.num_blocks,
        "max_num_seqs": scenario.max_num_seqs,
        "requests": scenario.num_requests,
        "output_len": scenario.output_len or "sharegpt",
        "steps": base_steps,
        "rounds": len(rounds),
        "preemptions": first["baseline"]["preemptions"],
        "evictions": first["plugin"].get("evictions"),
        "allocate_slots_calls": first["plugin"].get("allocation_attempts"),
        "baseline_step_us": statistics.median(r["baseline"]["total_s"] for r in rounds) / base_steps * 1e6,
        "baseline_cpu_us_per_step": statistics.median(r["baseline"]["cpu_s"] for r in rounds) / base_steps * 1e6,
        "variants": {},
    }
    for v in variants[1:]:
        ratios = [r[v]["total_s"] / r["baseline"]["total_s"] for r in rounds]
        extra_us = [(r[v]["total_s"] - r["baseline"]["total_s"]) / base_steps * 1e6 for r in rounds]
        cpu = [r[v]["cpu_s"] / r["baseline"]["cpu_s"] for r in rounds]
        entry = {
            "ratio": _quantiles(ratios),
            "extra_us_per_step": statistics.median(extra_us),
            "cpu_ratio": statistics.median(cpu),
            "cpu_us_per_step": statistics.median(r[v]["cpu_s"] for r in rounds) / base_steps * 1e6,
        }
        if v.startswith("plugin"):
            hooks_only = [r[v]["step_s"] / r["baseline"]["total_s"] for r in rounds]
            entry["hooks_only_ratio"] = statistics.median(hooks_only)
            entry["collections_per_run"] = first[v]["collections"]
            entry["collection_ms_mean"] = statistics.median(
                r[v]["collect_s"] / r[v]["collections"] * 1e3 for r in rounds
            )
            entry["collection_share_of_step_time"] = statistics.median(
                r[v]["collect_s"] / r["baseline"]["total_s"] for r in rounds
            )
            if "spans" in first[v]:
                entry["spans"] = first[v]["spans"]
        out["variants"][v] = entry
    return out


# =============================================================================
# 2. collection and event cost on a synthetic block map
# =============================================================================


class TableEntry:
    """What KVCacheState reads of a block-table entry (vLLM's KVCacheBlock)."""

    __slots__ = ("block_id",)

    def __init__(self, block_id: int):
        self.block_id = block_id


class FakeRequest:
    """What KVCacheState reads of a request."""

    __slots__ = ("num_computed_tokens", "capacity")

    def __init__(self, num_computed_tokens: int, capacity: int):
        self.num_computed_tokens = num_computed_tokens
        self.capacity = capacity


def build_block_map(num_blocks: int, num_requests: int, seed: int = 0):
    """A KVCacheState ~70% allocated in random-length runs, some runs released
    again (cached when hashed), ~60% of allocated blocks hashed, the rest
    shared out as block tables of `num_requests` requests (half of them
    sharing a 4-block system prompt) with a partly filled last block.

    Returns (state, requests, never-allocated free block ids)."""
    from vllm_frag_otel.state import GroupLayout, KVCacheState

    rng = np.random.default_rng(seed)
    now = time.monotonic()
    state = KVCacheState(num_blocks, [BLOCK_SIZE])
    tables, by_id = {}, {}
    state.attach_tables([GroupLayout("full_attention", BLOCK_SIZE)], [tables])
    state.attach_requests(by_id)
    lengths = rng.geometric(1 / 8, size=num_blocks)
    ends = np.cumsum(lengths)
    ends = ends[ends < num_blocks - 1]
    runs = np.split(np.arange(1, num_blocks), ends)
    allocated_runs = [run for run in runs if len(run) and rng.random() < 0.7]
    never = np.concatenate([run for run in runs if len(run)] or [np.empty(0, np.int64)])
    allocated = np.concatenate(allocated_runs)
    never = np.setdiff1d(never, allocated, assume_unique=True)
    for start in range(0, len(allocated), 4096):
        state.on_blocks_allocated(allocated[start : start + 4096].tolist(), now)
    for b in allocated[rng.random(len(allocated)) < 0.6].tolist():
        state.on_block_hashed(b, now)
    release = rng.random(len(allocated_runs)) < 0.15
    released = [run for run, rel in zip(allocated_runs, release) if rel]
    kept = [run for run, rel in zip(allocated_runs, release) if not rel]
    if released:
        state.on_blocks_released(np.concatenate(released).tolist(), now)
    used = np.concatenate(kept)
    prefix, rest = used[:4].tolist(), used[4:]
    requests = []
    for i, table in enumerate(np.array_split(rest, num_requests)):
        blocks = table.tolist()
        if i % 2 == 0:
            state.on_blocks_touched(prefix)
            blocks = prefix + blocks
        capacity = len(blocks) * BLOCK_SIZE
        req = FakeRequest(max(0, capacity - int(rng.integers(1, 2 * BLOCK_SIZE))), capacity)
        tables[f"req-{i}"] = [TableEntry(b) for b in blocks]
        by_id[f"req-{i}"] = req
        requests.append(req)
    return state, requests, never


def _advance(requests, tokens: int = 1) -> None:
    """One decode step: every request computes one more token (within its table)."""
    for req in requests:
        if req.num_computed_tokens + tokens <= req.capacity:
            req.num_computed_tokens += tokens


def bench_collection(num_blocks: int, reps: int, num_requests: int = 512) -> dict:
    t = time.perf_counter()
    state, requests, _ = build_block_map(num_blocks, num_requests)
    build_s = time.perf_counter() - t
    gc.collect()
    clock = time.perf_counter
    t = clock()
    snap = state.snapshot()  # cold: counts every full block of every request once
    first_ms = (clock() - t) * 1e3
    collector = Collector(state)
    collector.collect()  # warm-up: the SDK sets up its instruments; folds anything buffered
    collector.check()
    snapshot_ms, collection_ms = [], []
    for _ in range(reps):
        _advance(requests)
        t = clock()
        state.snapshot()
        snapshot_ms.append((clock() - t) * 1e3)
        _advance(requests)
        t = clock()
        collector.collect()
        collection_ms.append((clock() - t) * 1e3)
    collector.shutdown()
    codes_ms, encode_ms = [], []
    for _ in range(reps):
        _advance(requests)
        t = clock()
        codes = state.block_states()
        codes_ms.append((clock() - t) * 1e3)
        t = clock()
        payload, _ = BlockMap.from_states(codes, 0, 4096).encode()
        encode_ms.append((clock() - t) * 1e3)
    return {
        "num_blocks": num_blocks,
        "requests": num_requests,
        "used": snap.used_blocks,
        "cached": snap.cached_blocks,
        "free": snap.free_blocks - snap.cached_blocks,
        "free_runs": snap.free_runs,
        "build_s": build_s,
        "first_snapshot_ms": first_ms,
        "snapshot_ms": statistics.median(snapshot_ms),
        "collection_ms": statistics.median(collection_ms),
        "collection_ms_p75": _quantiles(collection_ms)["p75"],
        "block_map_codes_ms": statistics.median(codes_ms),
        "block_map_encode_ms": statistics.median(encode_ms),
        "block_map_bytes": len(payload),
    }


def bench_histograms(num_values: int = 200_000, reps: int = 7) -> dict:
    """Cost of the histogram values buffered between two collections.

    At collection (the part that grows with them): (one collection with
    `num_values` allocate_slots durations buffered through
    `state.on_allocation(True, d, None)`, as the hook does with spans off -
    the same collection with none buffered) / num_values; every buffered value
    (one per allocate_slots call, two per evicted block) is folded with numpy
    into bucket counts. `fold_us_per_value` is `fold_histograms` alone, outside
    a collection. On the hot path: `buffer_us_per_value`, one on_allocation call
    (the Python loop calling it included; no lock)."""
    state, _, _ = build_block_map(10_000, 64)
    collector = Collector(state)
    collector.collect()
    collector.check()
    rng = np.random.default_rng(3)
    durations = rng.lognormal(np.log(2e-5), 1.0, num_values).tolist()
    on_allocation = state.on_allocation
    clock = time.perf_counter
    empty, full, buffer, fold = [], [], [], []
    gc.collect()
    for _ in range(reps):
        t = clock()
        collector.collect()
        empty.append(clock() - t)
        t = clock()
        for d in durations:
            on_allocation(True, d, None)
        buffer.append(clock() - t)
        t = clock()
        collector.collect()
        full.append(clock() - t)
        for d in durations:
            on_allocation(True, d, None)
        t = clock()
        state.fold_histograms(time.time_ns())
        fold.append(clock() - t)
    folded = state.allocation_duration["success"].count
    collector.collect()
    collector.shutdown()
    assert folded == 2 * reps * num_values, f"{folded} values folded, {2 * reps * num_values} buffered"
    assert state.dropped_measurements == 0
    empty_s, full_s = statistics.median(empty), statistics.median(full)
    return {
        "values": num_values,
        "collection_empty_ms": empty_s * 1e3,
        "collection_full_ms": full_s * 1e3,
        "us_per_value": (full_s - empty_s) / num_values * 1e6,
        "fold_us_per_value": statistics.median(fold) / num_values * 1e6,
        "buffer_us_per_value": statistics.median(buffer) / num_values * 1e6,
    }


def bench_events(num_blocks: int, groups: int, reps: int, group_size: int = 4) -> dict:
    """Hook-style calls (take the lock, report `group_size` block ids) on random
    never-used free blocks spread over the whole pool."""
    state, _, never = build_block_map(num_blocks, 256, seed=1)
    rng = np.random.default_rng(2)
    groups = min(groups, len(never) // group_size)
    picked = rng.choice(never, size=groups * group_size, replace=False).reshape(groups, group_size)
    id_groups = [g.tolist() for g in picked]
    lock, allocate, release = state.lock, state.on_blocks_allocated, state.on_blocks_released
    clock = time.perf_counter
    alloc_us, release_us = [], []
    now = time.monotonic()
    gc.collect()
    for _ in range(reps):
        rng.shuffle(id_groups)
        t0 = clock()
        for ids in id_groups:
            with lock:
                allocate(ids, now)
        t1 = clock()
        for ids in id_groups:
            with lock:
                release(ids, now)
        t2 = clock()
        alloc_us.append((t1 - t0) / groups * 1e6)
        release_us.append((t2 - t1) / groups * 1e6)
    return {
        "blocks_per_call": group_size,
        "on_blocks_allocated": statistics.median(alloc_us),
        "on_blocks_released": statistics.median(release_us),
    }


# =============================================================================
# 3. memory
# =============================================================================


def bench_memory(num_requests: int) -> dict:
    from vllm_frag_otel import workloads
    from vllm_frag_otel.state import GroupLayout, KVCacheState

    n = 1_000_000

    def traced_state(num_blocks: int):
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        state = KVCacheState(num_blocks, [BLOCK_SIZE])
        traced = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        return state, traced

    # the same at half the size: the slope is the per-block part, the rest is fixed
    half = n // 2
    traced_half = traced_state(half)[1]
    state, traced = traced_state(n)
    marginal = (traced - traced_half) / (n - half)
    # the per-block buffers themselves: every attribute owning one item per block
    # (numpy arrays, bytearray, array.array); memoryviews over one of those
    # share its memory and are listed apart, not counted again
    attributes = vars(state)
    arrays, dtypes, views = {}, {}, {}
    for name, value in attributes.items():
        if isinstance(value, np.ndarray):
            if value.base is None and value.shape == (n,):
                arrays[name], dtypes[name] = value.nbytes, str(value.dtype)
        elif isinstance(value, memoryview):
            if len(value) != n:
                continue
            owner = next((k for k, v in attributes.items() if v is value.obj), None)
            if owner is not None and not isinstance(attributes[owner], memoryview):
                views[name] = owner
            else:
                arrays[name], dtypes[name] = value.nbytes, f"memoryview {value.format}"
        elif isinstance(value, bytearray) or type(value).__name__ == "array":
            if len(value) == n:
                arrays[name] = len(value) * getattr(value, "itemsize", 1)
                dtypes[name] = type(value).__name__ + (f" {value.typecode}" if hasattr(value, "typecode") else "")
    del state, attributes

    # in-flight requests: prompt blocks at admission, then one block at a time (decode),
    # as the allocate_slots hook reports them; sizes from the ShareGPT-like workload
    specs = workloads.generate("sharegpt", num_requests, seed=7, max_len=4096)
    pool = 100_000
    rng = np.random.default_rng(7)
    calls, blocks_total = [], 0
    for i, spec in enumerate(specs):
        prompt_blocks = math.ceil(len(spec.prompt_tokens) / BLOCK_SIZE)
        total = math.ceil((len(spec.prompt_tokens) + spec.output_len // 2) / BLOCK_SIZE)  # mid-generation
        ids = rng.integers(1, pool, size=total).tolist()
        req = FakeRequest(total * BLOCK_SIZE - 3, total * BLOCK_SIZE)
        rid = f"cmpl-{i:08x}-0-{i:08x}"
        chunks = [ids[:prompt_blocks]] + [[b] for b in ids[prompt_blocks:]]
        calls.append((rid, req, chunks))
        blocks_total += total
    state = KVCacheState(pool, [BLOCK_SIZE])
    tables, by_id = {}, {}
    state.attach_tables([GroupLayout("full_attention", BLOCK_SIZE)], [tables])
    state.attach_requests(by_id)
    for rid, req, chunks in calls:  # vLLM's own tables and requests: not the plugin's memory
        tables[rid] = [TableEntry(b) for chunk in chunks for b in chunk]
        by_id[rid] = req
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    state.snapshot()  # the tables are read (and their block ids kept) at collection
    per_request = (tracemalloc.get_traced_memory()[0] - before) / num_requests
    tracemalloc.stop()
    return {
        "bytes_per_block": traced / n,
        "bytes_per_block_marginal": marginal,
        "fixed_bytes": traced - marginal * n,
        "bytes_per_block_arrays": sum(arrays.values()) / n,
        "per_block_arrays": {k: v // n for k, v in arrays.items()},
        "per_block_array_types": dtypes,
        "memoryviews": views,
        "bytes_per_request": per_request,
        "blocks_per_request": blocks_total / num_requests,
        "requests": num_requests,
    }


# =============================================================================
# profiling (optional)
# =============================================================================


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
    from vllm_frag_otel import hooks

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
    from vllm_frag_otel import hooks

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
    from vllm_frag_otel import hooks

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
    from vllm_frag_otel.state import ALLOCATION_BUCKETS, BucketHistogram

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


# =============================================================================
# report
# =============================================================================


def _fmt_ratio(q: dict) -> str:
    return f"{q['median']:.4f}  [{q['p25']:.4f} .. {q['p75']:.4f}]"


def render(result: dict) -> str:
    lines = []
    add = lines.append
    cfg = result["config"]
    add(f"vllm-frag-otel benchmark ({result['mode']}) — vLLM {result['environment']['vllm']}, "
        f"{result['environment']['cpus']} CPUs, python {result['environment']['python']}")
    if "scenarios" in result:
        add("")
        add(f"1. scheduler step time (schedule + update_from_output), seed 0, {cfg['rounds']} interleaved rounds;"
            " ratio = median [p25 .. p75] over rounds of variant/baseline; cpu = the process's CPU time"
            " (every thread, the fake model's too), variant/baseline")
        for name, sc in result["scenarios"].items():
            workload = "sharegpt" if sc["output_len"] == "sharegpt" else f"{sc['output_len']}-token decodes"
            add(f"   {name}: {sc['requests']} requests ({workload}), max_num_seqs {sc['max_num_seqs']}, "
                f"{sc['num_blocks']} blocks, {sc['steps']} steps, {sc['preemptions']} preemptions, "
                f"{sc['evictions']} evictions, baseline {sc['baseline_step_us']:.1f} us/step")
            add(f"     {'variant':17s} {'ratio  [p25 .. p75]':>30s} {'+us/step':>9s} {'cpu':>6s}  notes")
            for v, e in sc["variants"].items():
                note = ""
                if "hooks_only_ratio" in e:
                    share = e["collection_share_of_step_time"] * 100
                    note = (f"hooks only {e['hooks_only_ratio']:.4f}; {e['collections_per_run']} collections/run, "
                            f"{e['collection_ms_mean']:.2f} ms each (+{share:.2f}% of baseline time)")
                    if "spans" in e:
                        note += f"; {e['spans']} spans"
                add(f"     {v:17s} {_fmt_ratio(e['ratio']):>30s} {e['extra_us_per_step']:9.2f} "
                    f"{e['cpu_ratio']:6.3f}  {note}")
    if "collection" in result:
        add("")
        add("2. one collection on a synthetic block map (512 requests; median of repetitions)")
        add(f"   {'blocks':>9s} {'used':>8s} {'cached':>8s} {'free runs':>9s} {'snapshot ms':>12s} "
            f"{'collection ms':>14s} {'cold 1st snapshot ms':>21s}")
        for c in result["collection"].values():
            add(f"   {c['num_blocks']:9d} {c['used']:8d} {c['cached']:8d} {c['free_runs']:9d} "
                f"{c['snapshot_ms']:12.3f} {c['collection_ms']:14.3f} {c['first_snapshot_ms']:21.1f}")
        add("   one block-layout map (opt-in, on the plugin's thread): state codes (the pool lock is held for"
            " part of it), then binning to 4096 cells and zlib")
        add(f"   {'blocks':>9s} {'codes ms':>9s} {'bin+zlib ms':>12s} {'bytes':>8s}")
        for c in result["collection"].values():
            add(f"   {c['num_blocks']:9d} {c['block_map_codes_ms']:9.3f} {c['block_map_encode_ms']:12.3f}"
                f" {c['block_map_bytes']:8d}")
        h = result["histogram"]
        add(f"   per buffered histogram value: {h['us_per_value']:.4f} us of collection "
            f"(fold_histograms alone {h['fold_us_per_value']:.4f} us; collection with {h['values']} values "
            f"{h['collection_full_ms']:.2f} ms vs {h['collection_empty_ms']:.2f} ms empty, 10k blocks); "
            f"{h['buffer_us_per_value']:.3f} us to buffer it on the hot path")
        add("   hook-style event call (lock + state method, 4 random blocks), us per call")
        add(f"   {'blocks':>9s} {'on_blocks_allocated':>20s} {'on_blocks_released':>19s}")
        for size, e in result["event_us_by_pool_size"].items():
            add(f"   {int(size):9d} {e['on_blocks_allocated']:20.3f} {e['on_blocks_released']:19.3f}")
    if "memory" in result:
        m = result["memory"]
        add("")
        add("3. memory")
        add(f"   per block:   {m['bytes_per_block']:.2f} bytes (tracemalloc, 1M-block KVCacheState: "
            f"{m['bytes_per_block_marginal']:.2f} per block + {m['fixed_bytes'] / 1e3:.1f} kB fixed); "
            f"per-block arrays {m['bytes_per_block_arrays']:.0f} bytes:")
        add("     " + ", ".join(f"{k} {m['per_block_array_types'].get(k, '')} {v}"
                                for k, v in m["per_block_arrays"].items()))
        if m.get("memoryviews"):
            add("     + memoryviews sharing their memory (not counted again): "
                + ", ".join(f"{k}->{v}" for k, v in m["memoryviews"].items()))
        add(f"   per request: {m['bytes_per_request']:.0f} bytes ({m['requests']} in-flight requests, "
            f"{m['blocks_per_request']:.1f} blocks each on average)")
    add("")
    add("targets")
    for t in result["targets"].values():
        add(f"   [{t['status']:>12s}] {t['target']}: {t['measured']}")
    add("")
    add(f"wall time {result['wall_s']:.1f} s")
    return "\n".join(lines)


def evaluate_targets(result: dict) -> dict:
    targets = {}

    def put(key, target, met, measured):
        status = "not measured" if met is None else ("met" if met else "NOT MET")
        targets[key] = {"target": target, "status": status, "measured": measured}

    if "scenarios" in result:
        per = {n: sc["variants"] for n, sc in result["scenarios"].items()}
        put("step_overhead", f"metrics only: step-time overhead <= {(TARGET_STEP_OVERHEAD - 1) * 100:.0f}%",
            all(v["plugin"]["ratio"]["median"] <= TARGET_STEP_OVERHEAD for v in per.values()),
            ", ".join(f"{n} {v['plugin']['ratio']['median']:.4f}" for n, v in per.items()))
        if all("plugin_spans" in v for v in per.values()):
            put("step_overhead_with_spans",
                f"default (spans on): step-time overhead <= {(TARGET_STEP_OVERHEAD_WITH_SPANS - 1) * 100:.0f}%",
                all(v["plugin_spans"]["ratio"]["median"] <= TARGET_STEP_OVERHEAD_WITH_SPANS for v in per.values()),
                ", ".join(f"{n} {v['plugin_spans']['ratio']['median']:.4f}" for n, v in per.items()))
            put("below_vllm_kv_metrics", "default (spans on) at or below vLLM's kv_cache_metrics (sample 1.0)",
                all(v["plugin_spans"]["ratio"]["median"] <= v["vllm_kv_metrics"]["ratio"]["median"]
                    for v in per.values()),
                ", ".join(f"{n} {v['plugin_spans']['ratio']['median']:.4f} vs "
                          f"{v['vllm_kv_metrics']['ratio']['median']:.4f}" for n, v in per.items()))
    if "collection" in result:
        c1m = result["collection_ms"].get("1000000")
        put("collection_1m", f"one collection <= {TARGET_COLLECTION_MS_1M} ms at 1M blocks",
            None if c1m is None else c1m <= TARGET_COLLECTION_MS_1M,
            "skipped (--quick)" if c1m is None else f"{c1m:.3f} ms")
        ev = result["event_us_by_pool_size"]
        spreads = {}
        for key in ("on_blocks_allocated", "on_blocks_released"):
            values = [e[key] for e in ev.values()]
            spreads[key] = max(values) / min(values)
        put("event_flat", f"per-event cost flat in pool size (largest/smallest <= {FLAT_TOLERANCE})",
            all(s <= FLAT_TOLERANCE for s in spreads.values()),
            ", ".join(f"{k} x{s:.2f} over {', '.join(ev)} blocks" for k, s in spreads.items()))
    if "memory" in result:
        b = result["memory"]["bytes_per_block"]
        m = result["memory"]
        put("bytes_per_block", f"<= {TARGET_BYTES_PER_BLOCK} bytes per block", b <= TARGET_BYTES_PER_BLOCK,
            f"{b:.2f} bytes at 1M blocks ({m['bytes_per_block_marginal']:.2f} per block + "
            f"{m['fixed_bytes'] / 1e3:.1f} kB fixed)")
    return targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run (under a minute)")
    parser.add_argument("--json", metavar="OUT", help="write all numbers as JSON to OUT")
    parser.add_argument("--parts", default="step,collection,memory", help="comma list of step, collection, memory")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 15, quick 3)")
    parser.add_argument("--collect-every", type=int, help="steps between two metrics collections (default 1000)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the plugin's costs")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"step", "collection", "memory"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    rounds = args.rounds or cfg.rounds
    collect_every = args.collect_every or cfg.collect_every

    import vllm

    result: dict = {
        "mode": "quick" if args.quick else "full",
        "environment": {
            "vllm": vllm.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "config": {
            "rounds": rounds,
            "num_requests": cfg.num_requests,
            "seed": 0,
            "scenarios": {name: dataclasses.asdict(sc) for name, sc in cfg.scenarios.items()},
            "collect_every": collect_every,
            "block_size": BLOCK_SIZE,
        },
    }
    bench = None
    if "step" in parts or args.profile:
        log("loading vLLM and the plugin")
        bench = StepBench(collect_every)
    if "step" in parts:
        log(f"step time: {rounds} rounds x {len(cfg.scenarios)} pools x {len(bench.variants)} variants")
        scenarios = bench.experiment(cfg, rounds)
        result["scenarios"] = scenarios
        worst = {
            v: max(sc["variants"][v]["ratio"]["median"] for sc in scenarios.values())
            for v in bench.variants[1:]
        }
        result["step_overhead_ratio"] = worst["plugin"]
        result["vllm_kv_metrics_overhead_ratio"] = worst["vllm_kv_metrics"]
        result["vllm_kv_events_overhead_ratio"] = worst["vllm_kv_events"]
        if "plugin_spans" in worst:
            result["step_overhead_ratio_with_spans"] = worst["plugin_spans"]
        result["step_overhead_ratio_by_pool"] = {
            n: sc["variants"]["plugin"]["ratio"]["median"] for n, sc in scenarios.items()
        }
        result["step_overhead_ratio_by_scenario"] = {
            n: {v: sc["variants"][v]["ratio"]["median"] for v in bench.variants[1:]} for n, sc in scenarios.items()
        }
        result["cpu_overhead_ratio"] = max(sc["variants"]["plugin"]["cpu_ratio"] for sc in scenarios.values())
        if "plugin_spans" in worst:
            result["cpu_overhead_ratio_with_spans"] = max(
                sc["variants"]["plugin_spans"]["cpu_ratio"] for sc in scenarios.values())
    if "collection" in parts:
        collection = {}
        events = {}
        for size in cfg.pool_sizes:
            log(f"collection at {size} blocks ({cfg.collection_reps[size]} repetitions)")
            collection[str(size)] = bench_collection(size, cfg.collection_reps[size])
            log(f"event cost at {size} blocks")
            events[str(size)] = bench_events(size, cfg.event_groups, cfg.event_reps)
            gc.collect()
        result["collection"] = collection
        result["collection_ms"] = {k: v["collection_ms"] for k, v in collection.items()}
        result["snapshot_ms"] = {k: v["snapshot_ms"] for k, v in collection.items()}
        result["event_us_by_pool_size"] = events
        log("cost per buffered histogram value")
        result["histogram"] = bench_histograms()
        result["histogram_record_us_per_value"] = result["histogram"]["us_per_value"]
    if "memory" in parts:
        log("memory")
        memory = bench_memory(cfg.memory_requests)
        result["memory"] = memory
        result["bytes_per_block"] = memory["bytes_per_block"]
        result["bytes_per_request"] = memory["bytes_per_request"]
    result["wall_s"] = time.perf_counter() - T0
    result["targets"] = evaluate_targets(result)
    print(render(result), flush=True)
    if args.profile:
        log("profiling")
        print(profile(bench, cfg, pairs=1 if args.quick else 5, self_time_runs=1 if args.quick else 3), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
        log(f"wrote {args.json}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

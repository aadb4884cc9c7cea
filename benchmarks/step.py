"""1. Step time on vLLM's real scheduler: every variant on the same seeded workloads."""

from __future__ import annotations

import gc
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from common import BLOCK_SIZE, _quantiles, log
from collection import Collector


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
    pool_sizes=(10_000, 100_000, 1_000_000, 4_000_000),
    collection_reps={10_000: 60, 100_000: 40, 1_000_000: 20, 4_000_000: 10},
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


def _call(run: Callable[[], dict]) -> dict:
    return run()


class StepBench:
    """Runs one workload to completion under one variant, timing the scheduler."""

    BASE_VARIANTS = ("baseline", "plugin", "vllm_kv_metrics", "vllm_kv_events")

    def __init__(self, collect_every: int):
        from vllm.plugins import load_general_plugins

        load_general_plugins()
        from vllm.v1.core.block_pool import BlockPool

        from vllm_frag_otel.sim import simulator as sim
        from vllm_frag_otel.export import telemetry
        from vllm_frag_otel.sim import workloads
        from vllm_frag_otel.plugin.hooks import guard, instrumentor

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
            around_steps=_call) -> dict:
        """One run to completion. `collect=False`: no metrics collection at all
        (hooks only); `ablate=[(cls, method), ...]`: those hooks unwrapped (profiling);
        `around_steps(run)`: returns `run()`, the stepping alone (the scheduler's steps and
        the plugin's collections, not the set-up), e.g. inside an instruction count."""
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
            # not `pool.__dict__`: reading it slows every attribute access of the pool (plugin/hooks.py, _STATE)
            assert not hasattr(pool, "_vllm_frag_otel"), "an unhooked run's pool is tracked"
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
        def run_to_completion() -> dict:
            cpu_start = time.process_time()  # every thread of the process: span export threads too
            step_s = collect_s = 0.0
            collections = steps = 0
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
            return {"steps": steps, "step_s": step_s, "collect_s": collect_s, "collections": collections,
                    "total_s": step_s + collect_s, "cpu_s": time.process_time() - cpu_start}

        gc.collect()
        result = {"variant": variant, **around_steps(run_to_completion),
                  "preemptions": sum(r.num_preemptions for r in requests)}
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



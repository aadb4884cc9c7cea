"""The live heat map's vllm.kv_cache.region.blocks, on vLLM's real scheduler.

The plugin is loaded through vLLM's entry point and attached to the schedulers the
tests build; the metric is read through the OTel SDK from a Runtime made from the
VLLM_FRAG_OTEL_* variables. Every (region, state) point is checked against the
oracle's brute-force state of every block of vLLM's pool, binned here by plain
Python from the documented boundaries: region r of R over n usable blocks covers
block ids 1 + r * n // R up to (r + 1) * n // R (the null block 0 is in none).
"""

from __future__ import annotations

import logging
import random

import pytest
from oracle import block_states
from test_spans import CapturingMetricExporter

from vllm_frag_otel import analyzer_for, config
from vllm_frag_otel.config import load_settings
from vllm_frag_otel.export import telemetry
from vllm_frag_otel.plugin.hooks import guard
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.sim import workloads

METRIC = "vllm.kv_cache.region.blocks"
STATES = ("empty", "cached", "full", "partial", "reserved")


@pytest.fixture()
def runtime_from(plugin):
    """A Runtime made from the given VLLM_FRAG_OTEL_* variables, exporting into memory,
    installed for the schedulers the test builds."""
    started = []

    def start(env: dict[str, str]):
        metrics = CapturingMetricExporter()
        settings = load_settings({"VLLM_FRAG_OTEL_EXPORTER": "none", "VLLM_FRAG_OTEL_SPANS": "false", **env})
        runtime = telemetry.Runtime(settings, {}, guard(), metrics)
        started.append((runtime, telemetry.install(runtime)))
        return runtime, metrics

    yield start
    for runtime, previous in started:
        runtime.shutdown()
        telemetry.install(previous)


def _collect(runtime, metrics) -> dict[str, list]:
    runtime.meter_provider.force_flush()
    (resource_metrics,) = metrics.exports[-1].resource_metrics
    (scope,) = [s for s in resource_metrics.scope_metrics if s.scope.name == telemetry.SCOPE]
    return {m.name: list(m.data.data_points) for m in scope.metrics}


def _expected(scheduler, regions: int) -> dict[tuple[int, str], int]:
    """Brute force: the oracle's state of every usable block, binned by plain Python."""
    states = block_states(scheduler)
    n = len(states)
    count = min(regions, n)
    expected = {(r, s): 0 for r in range(count) for s in STATES}
    for r in range(count):
        for index in range(r * n // count, (r + 1) * n // count):
            expected[(r, states[index])] += 1
    return expected


def _got(points) -> dict[tuple[int, str], int]:
    got = {}
    for p in points:
        key = (p.attributes["vllm.kv_cache.region"], p.attributes["vllm.kv_cache.block.state"])
        assert key not in got, key
        got[key] = p.value
    return got


def _pressured(num_blocks: int = 100, seed: int = 3):
    scheduler = sim.build_scheduler(sim.EngineShape(num_blocks=num_blocks, block_size=16, max_num_seqs=16))
    specs = workloads.generate("sharegpt", 40, seed=seed, max_len=800)
    for request in sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], 16):
        scheduler.add_request(request)
    return scheduler


@pytest.mark.parametrize("regions", [8, 7, 32, 200])
def test_every_region_and_state_equals_the_brute_force(runtime_from, regions):
    """At many collections through a run that preempts and evicts: every point equals the
    recount; each region's points add up to its size; the per-state totals equal
    vllm.kv_cache.blocks's at the same collection. 7 does not divide the 99 usable
    blocks (uneven regions); 200 is more than the pool (one region per block)."""
    runtime, metrics = runtime_from({"VLLM_FRAG_OTEL_REGION_METRIC": "true", "VLLM_FRAG_OTEL_REGIONS": str(regions)})
    scheduler = _pressured()
    analyzer = analyzer_for(scheduler)
    n = analyzer.num_blocks - 1
    rng = random.Random(0)
    seen = set()
    collections = 0

    def check(where: str) -> None:
        nonlocal collections
        points = _collect(runtime, metrics)
        got, expected = _got(points[METRIC]), _expected(scheduler, regions)
        wrong = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
        assert set(got) == set(expected) and not wrong, f"{where}: (got, brute force) {dict(list(wrong.items())[:5])}"
        sizes = [sum(got[(r, s)] for s in STATES) for r in range(min(regions, n))]
        assert sizes == [(r + 1) * n // len(sizes) - r * n // len(sizes) for r in range(len(sizes))], where
        totals = {p.attributes["vllm.kv_cache.block.state"]: p.value for p in points["vllm.kv_cache.blocks"]}
        state_total = {s: sum(v for (_, st), v in got.items() if st == s) for s in STATES}
        assert state_total["empty"] == totals["empty"] and state_total["cached"] == totals["cached"], where
        assert state_total["full"] + state_total["partial"] + state_total["reserved"] == totals["used"], where
        seen.update(s for s, v in state_total.items() if v)
        collections += 1

    check("before the first step")
    for step in range(600):
        if not scheduler.has_requests():
            break
        output = scheduler.schedule()
        if step % 11 == 5:  # a collection may come between schedule and update, as in a live engine
            check(f"step {step}, scheduled")
        scheduler.update_from_output(output, sim.fake_model_output(output, scheduler, rng))
        if step % 7 == 0:
            check(f"step {step}")
    snapshot = analyzer.snapshot()
    assert snapshot.preemptions > 0 and snapshot.evictions > 0
    # `reserved` (held, nothing computed) does not outlive a step in these workloads
    assert collections >= 20 and seen >= {"empty", "cached", "full", "partial"}, (collections, seen)


def test_off_by_default(runtime_from):
    runtime, metrics = runtime_from({"VLLM_FRAG_OTEL_REGIONS": "8"})  # regions alone do not turn it on
    scheduler = _pressured()
    sim.step(scheduler, random.Random(0))
    points = _collect(runtime, metrics)
    assert "vllm.kv_cache.blocks" in points and METRIC not in points


def test_default_is_32_regions_and_series_are_bounded(runtime_from):
    runtime, metrics = runtime_from({"VLLM_FRAG_OTEL_REGION_METRIC": "1"})
    scheduler = _pressured(num_blocks=1001)
    rng = random.Random(1)
    for _ in range(30):
        sim.step(scheduler, rng)
    points = _collect(runtime, metrics)[METRIC]
    assert len(points) == 32 * len(STATES)
    assert {p.attributes["vllm.kv_cache.region"] for p in points} == set(range(32))
    assert _got(points) == _expected(scheduler, 32)


@pytest.mark.parametrize("name, raw", [
    ("VLLM_FRAG_OTEL_REGIONS", "0"), ("VLLM_FRAG_OTEL_REGIONS", "1025"), ("VLLM_FRAG_OTEL_REGIONS", "eight"),
    ("VLLM_FRAG_OTEL_REGION_METRIC", "maybe"),
])
def test_a_bad_value_is_named_with_the_accepted_values(runtime_from, caplog, name, raw):
    config._reported.clear()
    env = {"VLLM_FRAG_OTEL_REGION_METRIC": "true", "VLLM_FRAG_OTEL_REGIONS": "4", name: raw}
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        runtime, metrics = runtime_from(env)
    (message,) = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    accepted = "a whole number in 1-1024" if name.endswith("REGIONS") else "one of 1, true, yes, on, 0, false, no, off"
    assert f"ignoring {name}={raw!r}" in message and accepted in message, message
    scheduler = _pressured()
    sim.step(scheduler, random.Random(0))
    points = _collect(runtime, metrics)
    if name.endswith("REGIONS"):  # the default 32 instead
        assert {p.attributes["vllm.kv_cache.region"] for p in points[METRIC]} == set(range(32))
    else:  # the default: off
        assert METRIC not in points


class _CountingLock:
    def __init__(self, lock):
        self.lock, self.taken = lock, 0

    def __enter__(self):
        self.taken += 1
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def test_one_read_of_the_pool_per_collection(runtime_from):
    """The region points and vllm.kv_cache.blocks come from the same copy of the
    pool's flags: a collection takes the pool lock as often as it does without the
    metric (a second read would let a live scheduler change the pool in between)."""
    taken = {}
    for on in ("false", "true"):
        runtime, metrics = runtime_from({"VLLM_FRAG_OTEL_REGION_METRIC": on})
        scheduler = _pressured()
        sim.step(scheduler, random.Random(0))
        analyzer = analyzer_for(scheduler)
        analyzer.lock = counting = _CountingLock(analyzer.lock)
        points = _collect(runtime, metrics)
        assert (METRIC in points) == (on == "true")
        taken[on] = counting.taken
    assert taken["true"] == taken["false"] > 0, taken

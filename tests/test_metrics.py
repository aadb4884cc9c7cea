"""The metrics read through the OTel SDK equal the analyzer's snapshot."""

from __future__ import annotations

import random

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from vllm_frag_otel import analyzer_for, sim, workloads
from vllm_frag_otel.hooks import guard
from vllm_frag_otel.telemetry import ALLOCATION_BUCKETS, SCOPE, KVCacheMetrics

GAUGE_FIELDS = {
    "vllm.kv_cache.block.limit": "num_blocks",
    "vllm.kv_cache.free_run.count": "free_runs",
    "vllm.kv_cache.free_run.largest": "largest_free_run",
    "vllm.kv_cache.fragmentation.external": "external_fragmentation",
    "vllm.kv_cache.fragmentation.internal": "internal_fragmentation",
    "vllm.kv_cache.slot.utilization": "slot_utilization",
    "vllm.kv_cache.request.count": "tracked_requests",
    "vllm.kv_cache.preemptions": "preemptions",
}


def _points(reader) -> dict[str, list]:
    data = reader.get_metrics_data()
    (resource_metrics,) = data.resource_metrics
    (scope_metrics,) = [s for s in resource_metrics.scope_metrics if s.scope.name == SCOPE]
    return {m.name: (m, list(m.data.data_points)) for m in scope_metrics.metrics}


def _value(points, **attributes):
    matches = [p.value for p in points if all(p.attributes.get(k) == v for k, v in attributes.items())]
    assert len(matches) == 1, (attributes, points)
    return matches[0]


@pytest.fixture()
def pressured_run(plugin):
    """A scheduler half-way through a workload that preempts, evicts and shares prefixes."""
    scheduler = sim.build_scheduler(sim.EngineShape(num_blocks=100, block_size=16, max_num_seqs=16))
    specs = workloads.generate("sharegpt", 40, seed=3, max_len=800)
    for request in sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], 16):
        scheduler.add_request(request)
    rng = random.Random(0)
    for _ in range(400):
        sim.step(scheduler, rng)
    return scheduler


def test_metrics_equal_the_snapshot(pressured_run):
    analyzer = analyzer_for(pressured_run)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics = KVCacheMetrics(provider.get_meter(SCOPE, "test"), guard())
    metrics.add_pool(analyzer, {"vllm.kv_cache.pool": "0"})
    pending = {k: list(v) for k, v in analyzer.drain_histograms()["allocation_duration"].items()}
    # the drained values are gone: the next collection records only newer ones
    snapshot = analyzer.snapshot()
    assert snapshot.used_blocks > 0 and snapshot.preemptions > 0 and snapshot.evictions > 0
    assert snapshot.partial_blocks > 0
    sim.step(pressured_run, random.Random(1))  # new measurements after the drain
    fresh = {k: len(v) for k, v in analyzer.drain_histograms()["allocation_duration"].items()}
    analyzer.on_allocation(True, 3e-6)  # a known measurement, recorded via the histogram buffer
    snapshot = analyzer.snapshot()
    points = _points(reader)

    _, block_points = points["vllm.kv_cache.block.count"]
    assert _value(block_points, **{"vllm.kv_cache.block.state": "used"}) == snapshot.used_blocks
    assert _value(block_points, **{"vllm.kv_cache.block.state": "cached"}) == snapshot.cached_blocks
    assert _value(block_points, **{"vllm.kv_cache.block.state": "free"}) == snapshot.free_blocks - snapshot.cached_blocks
    for name, field in GAUGE_FIELDS.items():
        _, pts = points[name]
        assert _value(pts) == getattr(snapshot, field), name
    _, slot_points = points["vllm.kv_cache.slot.count"]
    assert _value(slot_points, **{"vllm.kv_cache.slot.state": "used"}) == snapshot.used_slots
    assert _value(slot_points, **{"vllm.kv_cache.slot.state": "unused"}) == snapshot.unused_slots
    _, partial_points = points["vllm.kv_cache.block.partial.count"]
    assert _value(partial_points) == snapshot.partial_blocks

    _, queried = points["vllm.kv_cache.prefix_cache.queried"]
    _, hit = points["vllm.kv_cache.prefix_cache.hit"]
    assert sum(p.value for p in queried) == snapshot.prefix_queried_tokens
    assert sum(p.value for p in hit) == snapshot.prefix_hit_tokens
    assert _value(hit, **{"vllm.request.resumed": True}) == snapshot.prefix_resumed_hit_tokens
    _, evictions = points["vllm.kv_cache.block.evictions"]
    assert sum(p.value for p in evictions) == snapshot.evictions
    assert sum(p.value for p in evictions if not p.attributes["vllm.kv_cache.block.reused"]) == snapshot.evicted_never_reused
    _, attempts = points["vllm.kv_cache.allocation.attempts"]
    assert sum(p.value for p in attempts) == snapshot.allocation_attempts
    assert _value(attempts, **{"vllm.kv_cache.allocation.outcome": "failure"}) == snapshot.allocation_failures
    _, sources = points["vllm.kv_cache.block.allocations"]
    assert _value(sources, **{"vllm.kv_cache.block.source": "fresh"}) == snapshot.blocks_allocated_fresh
    assert _value(sources, **{"vllm.kv_cache.block.source": "recycled"}) == snapshot.blocks_allocated_recycled
    assert _value(sources, **{"vllm.kv_cache.block.source": "prefix_hit"}) == snapshot.blocks_prefix_hit

    # the histogram holds exactly what was buffered since the last drain: one known value
    metric, duration_points = points["vllm.kv_cache.allocation.duration"]
    assert metric.unit == "s"
    (point,) = duration_points
    assert point.attributes["vllm.kv_cache.allocation.outcome"] == "success"
    assert point.count == 1 and point.sum == pytest.approx(3e-6)
    assert tuple(point.explicit_bounds) == ALLOCATION_BUCKETS
    assert point.bucket_counts[ALLOCATION_BUCKETS.index(5e-6)] == 1  # 2.5us < 3us <= 5us
    assert sum(pending.values(), []) and sum(fresh.values()) > 0

    # a second collection with more steps in between: the cumulative counters follow
    sim.step(pressured_run, random.Random(2))
    later = analyzer.snapshot()
    _, attempts = _points(reader)["vllm.kv_cache.allocation.attempts"]
    assert sum(p.value for p in attempts) == later.allocation_attempts
    provider.shutdown()


def test_histograms_get_every_eviction(pressured_run):
    analyzer = analyzer_for(pressured_run)
    analyzer.drain_histograms()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics = KVCacheMetrics(provider.get_meter(SCOPE, "test"), guard())
    metrics.add_pool(analyzer, {})
    before = analyzer.snapshot()
    rng = random.Random(5)
    attempts_seen = 0
    while pressured_run.has_requests():
        sim.step(pressured_run, rng)
    after = analyzer.snapshot()
    points = _points(reader)
    evicted = after.evictions - before.evictions
    assert evicted > 0
    for name in ("vllm.kv_cache.block.cache.duration", "vllm.kv_cache.block.idle.duration"):
        _, (point,) = points[name]
        assert point.count == evicted, name
        assert point.min >= 0
    _, duration_points = points["vllm.kv_cache.allocation.duration"]
    attempts_seen = sum(p.count for p in duration_points)
    assert attempts_seen == after.allocation_attempts - before.allocation_attempts
    provider.shutdown()

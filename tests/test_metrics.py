"""The metrics read through the OTel SDK equal the analyzer's snapshot."""

from __future__ import annotations

import random

import pytest
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from test_spans import CapturingMetricExporter

from vllm_frag_otel import analyzer_for
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.sim import workloads
from vllm_frag_otel.plugin.hooks import guard
from vllm_frag_otel.core.state import ALLOCATION_BUCKETS
from vllm_frag_otel.export.telemetry import SCOPE, HistogramExporter, KVCacheMetrics

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


class Pipeline:
    """The plugin's instruments behind a real SDK reader and the histogram exporter."""

    def __init__(self, analyzer, attributes, delta: bool = False):
        self.captured = CapturingMetricExporter({Histogram: AggregationTemporality.DELTA} if delta else None)
        exporter = HistogramExporter(self.captured)
        assert exporter.delta == delta
        self.provider = MeterProvider(metric_readers=[PeriodicExportingMetricReader(exporter, 10**9)])
        exporter.metrics = KVCacheMetrics(self.provider.get_meter(SCOPE, "test"), guard())
        exporter.metrics.add_pool(analyzer, attributes)

    def collect(self) -> dict[str, tuple]:
        self.provider.force_flush()
        return _points(self.captured.exports[-1])


def _points(data) -> dict[str, list]:
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
    analyzer_for(scheduler).set_allocation_sample_rate(1.0)  # every call timed: counts are comparable
    specs = workloads.generate("sharegpt", 40, seed=3, max_len=800)
    for request in sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], 16):
        scheduler.add_request(request)
    rng = random.Random(0)
    for _ in range(400):
        sim.step(scheduler, rng)
    return scheduler


def test_metrics_equal_the_snapshot(pressured_run):
    analyzer = analyzer_for(pressured_run)
    pipeline = Pipeline(analyzer, {"vllm.kv_cache.pool": "0"})
    analyzer.fold_histograms(0)
    before = {o: (h.count, h.counts.copy()) for o, h in analyzer.allocation_duration.items()}
    analyzer.on_allocation(True, 3e-6)  # a known measurement, recorded via the histogram buffer
    snapshot = analyzer.snapshot()
    assert snapshot.used_blocks > 0 and snapshot.preemptions > 0 and snapshot.evictions > 0
    assert snapshot.partial_blocks > 0
    points = pipeline.collect()

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

    # cumulative histograms: every allocate_slots call, plus the one known value
    metric, duration_points = points["vllm.kv_cache.allocation.duration"]
    assert metric.unit == "s"
    success = _point(duration_points, "success")
    failure = _point(duration_points, "failure")
    assert success.count + failure.count == snapshot.allocation_attempts
    assert failure.count == snapshot.allocation_failures
    assert tuple(success.explicit_bounds) == ALLOCATION_BUCKETS
    known = ALLOCATION_BUCKETS.index(5e-6)  # 2.5us < 3us <= 5us
    assert success.bucket_counts[known] == before["success"][1][known] + 1
    assert sum(success.bucket_counts) == success.count == before["success"][0] + 1

    # a second collection with more steps in between: the cumulative counters follow
    sim.step(pressured_run, random.Random(2))
    later = analyzer.snapshot()
    points = pipeline.collect()
    _, attempts = points["vllm.kv_cache.allocation.attempts"]
    assert sum(p.value for p in attempts) == later.allocation_attempts
    _, duration_points = points["vllm.kv_cache.allocation.duration"]
    assert sum(p.count for p in duration_points) == later.allocation_attempts
    pipeline.provider.shutdown()


def _point(points, outcome):
    (point,) = [p for p in points if p.attributes["vllm.kv_cache.allocation.outcome"] == outcome]
    return point


def test_histograms_get_every_eviction(pressured_run):
    """Delta temporality: each export holds exactly what happened since the previous one."""
    analyzer = analyzer_for(pressured_run)
    pipeline = Pipeline(analyzer, {}, delta=True)
    before = analyzer.snapshot()
    pipeline.collect()  # everything up to `before`
    rng = random.Random(5)
    while pressured_run.has_requests():
        sim.step(pressured_run, rng)
    after = analyzer.snapshot()
    points = pipeline.collect()
    evicted = after.evictions - before.evictions
    assert evicted > 0
    for name in ("vllm.kv_cache.block.cache.duration", "vllm.kv_cache.block.idle.duration"):
        _, (point,) = points[name]
        assert point.count == evicted == sum(point.bucket_counts), name
        assert point.min >= 0
    _, duration_points = points["vllm.kv_cache.allocation.duration"]
    assert sum(p.count for p in duration_points) == after.allocation_attempts - before.allocation_attempts
    pipeline.provider.shutdown()

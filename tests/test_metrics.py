"""The metrics read through the OTel SDK equal the analyzer's snapshot."""

from __future__ import annotations

import random

import pytest
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, ObservableCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from test_spans import CapturingMetricExporter

from vllm_frag_otel import analyzer_for
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.sim import workloads
from vllm_frag_otel.plugin.hooks import guard
from vllm_frag_otel.core.state import ALLOCATION_BUCKETS
from vllm_frag_otel.export.telemetry import SCOPE, PointsExporter, KVCacheMetrics

GAUGE_FIELDS = {
    "vllm.kv_cache.block.limit": "num_blocks",
    "vllm.kv_cache.free_runs": "free_runs",
    "vllm.kv_cache.free_run.largest": "largest_free_run",
    "vllm.kv_cache.fragmentation.external": "external_fragmentation",
    "vllm.kv_cache.fragmentation.internal": "internal_fragmentation",
    "vllm.kv_cache.slot.utilization": "slot_utilization",
    "vllm.kv_cache.requests": "tracked_requests",
    "vllm.kv_cache.preemptions": "preemptions",
}


class Pipeline:
    """The plugin's instruments behind a real SDK reader and the histogram exporter."""

    def __init__(self, analyzer, attributes, delta: bool = False):
        self.captured = CapturingMetricExporter({Histogram: AggregationTemporality.DELTA} if delta else None)
        exporter = PointsExporter(self.captured)
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

    _, block_points = points["vllm.kv_cache.blocks"]
    assert _value(block_points, **{"vllm.kv_cache.block.state": "used"}) == snapshot.used_blocks
    assert _value(block_points, **{"vllm.kv_cache.block.state": "cached"}) == snapshot.cached_blocks
    assert _value(block_points, **{"vllm.kv_cache.block.state": "empty"}) == snapshot.free_blocks - snapshot.cached_blocks
    for name, field in GAUGE_FIELDS.items():
        _, pts = points[name]
        assert _value(pts) == getattr(snapshot, field), name
    _, slot_points = points["vllm.kv_cache.slots"]
    assert _value(slot_points, **{"vllm.kv_cache.slot.state": "used"}) == snapshot.used_slots
    assert _value(slot_points, **{"vllm.kv_cache.slot.state": "unused"}) == snapshot.unused_slots
    _, partial_points = points["vllm.kv_cache.partial_blocks"]
    assert _value(partial_points) == snapshot.partial_blocks

    _, queried = points["vllm.kv_cache.prefix_cache.queried"]
    _, hit = points["vllm.kv_cache.prefix_cache.hit"]
    assert _value(queried, **{"vllm.request.resumed": False}) == snapshot.prefix_queried_tokens
    assert _value(hit, **{"vllm.request.resumed": False}) == snapshot.prefix_hit_tokens
    assert _value(queried, **{"vllm.request.resumed": True}) == snapshot.prefix_resumed_queried_tokens
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


_DELTA_PREFERENCE = {
    Counter: AggregationTemporality.DELTA, ObservableCounter: AggregationTemporality.DELTA,
    Histogram: AggregationTemporality.DELTA,
}


def _sdk_twin(metrics: KVCacheMetrics, preference) -> tuple[MeterProvider, CapturingMetricExporter]:
    """The plugin's gauges and counters as the SDK's own observable instruments,
    observing the same points: what the SDK would export for them."""
    captured = CapturingMetricExporter(preference)
    provider = MeterProvider(metric_readers=[PeriodicExportingMetricReader(captured, 10**9)])
    meter = provider.get_meter(SCOPE, "test")
    for stream in metrics.streams:
        create = meter.create_observable_counter if stream.monotonic else meter.create_observable_gauge
        callback = lambda options, stream=stream: [Observation(value, attrs) for value, attrs in stream.points()]
        create(stream.name, [callback], stream.unit, stream.description)
    return provider, captured


def _encoded(data, names) -> dict:
    """The OTLP protobuf of the named metrics, times checked for presence and then cleared."""
    request = encode_metrics(data)
    found = {}
    for resource_metrics in request.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name not in names:
                    continue
                kind = metric.WhichOneof("data")
                points = getattr(metric, kind).data_points
                for point in points:
                    assert point.time_unix_nano > 0, metric.name
                    assert (point.start_time_unix_nano > 0) == (kind == "sum"), metric.name
                    point.time_unix_nano = point.start_time_unix_nano = 0
                ordered = sorted(points, key=lambda p: p.SerializeToString(deterministic=True))
                del points[:]
                points.extend(ordered)
                found[metric.name] = metric.SerializeToString(deterministic=True)
    return found


@pytest.mark.parametrize("preference", [None, _DELTA_PREFERENCE], ids=["cumulative", "delta"])
def test_points_are_exported_exactly_as_the_sdks_observable_instruments_would_export_them(pressured_run, preference):
    """The plugin builds its gauge and counter points itself (the SDK's
    observable instruments cost more than a million-block snapshot); the
    OTLP encoding must be what the SDK's instruments give for the same values,
    cumulative and delta (a second collection after more steps)."""
    analyzer = analyzer_for(pressured_run)
    captured = CapturingMetricExporter(preference)
    exporter = PointsExporter(captured)
    ours = MeterProvider(metric_readers=[PeriodicExportingMetricReader(exporter, 10**9)])
    exporter.metrics = KVCacheMetrics(ours.get_meter(SCOPE, "test"), guard(), regions=4)
    exporter.metrics.add_pool(analyzer, {"vllm.kv_cache.pool": "0"})
    twin, twin_captured = _sdk_twin(exporter.metrics, preference)
    names = {stream.name for stream in exporter.metrics.streams}
    rng = random.Random(5)
    for collection in range(3):
        ours.force_flush()  # a snapshot, then the points built from it
        twin.force_flush()  # the SDK's instruments observe the same snapshot
        expected = _encoded(twin_captured.exports[-1], names)
        assert set(expected) == names - {"vllm.frag_otel.requests.untraced"}  # no stories: no point
        assert _encoded(captured.exports[-1], names) == expected, f"collection {collection}"
        for _ in range(7):
            sim.step(pressured_run, rng)
    ours.shutdown()
    twin.shutdown()

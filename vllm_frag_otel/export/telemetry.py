"""The OpenTelemetry layer: instruments over pool states, providers, exporters.

Gauges and counters are read at collection time from one snapshot of each
pool's state, so the scheduler's hot path never calls into the OTel SDK.
Histogram values are buffered by the state and folded into bucket counts with
numpy at collection. All of them are added to each export as ready-made OTLP
points (`PointsExporter`).

The plugin keeps its own MeterProvider (vLLM owns the global tracer provider);
it starts once per process, in the process that builds a KV cache manager.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import inspect
import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from time import monotonic, time_ns
from typing import Any

import numpy as np

from opentelemetry._logs import Logger, SeverityNumber
from opentelemetry.context import Context
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, ConsoleLogRecordExporter, LogRecordExporter
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import ObservableCounter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ConsoleMetricExporter,
    Gauge,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.metrics._internal.exemplar import Exemplar
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanLimits,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext, SpanKind, Status, StatusCode, TraceFlags, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from vllm_frag_otel import __version__
from vllm_frag_otel.config import (
    OTLP_PROTOCOLS,
    PROMETHEUS,
    Settings,
    exporter_parts,
    load_settings,
    metrics_exporters,
    prometheus_address,
    unusable_otel_variables,
)
from vllm_frag_otel.core.layout import BLOCK_STATES, EVENT_NAME, BlockMap, region_counts
from vllm_frag_otel.core.state import BucketHistogram, FragmentationSnapshot, KVCacheState
from vllm_frag_otel.core.stories import RequestStories, RequestStory

logger = logging.getLogger("vllm.frag_otel")

SCOPE = "vllm_frag_otel"

POOL = "vllm.kv_cache.pool"
GROUP = "vllm.kv_cache.group"
GROUP_KIND = "vllm.kv_cache.group.kind"
STATE = "vllm.kv_cache.block.state"
REGION = "vllm.kv_cache.region"
SLOT_STATE = "vllm.kv_cache.slot.state"
SOURCE = "vllm.kv_cache.block.source"
REASON = "vllm.kv_cache.eviction.reason"
REUSED = "vllm.kv_cache.block.reused"
OUTCOME = "vllm.kv_cache.allocation.outcome"
SAMPLE_RATE = "vllm.kv_cache.allocation.sample_rate"
RESUMED = "vllm.request.resumed"
ENGINE_STOPPED = "vllm.kv_cache.engine_stopped"
ENGINE_STOPPED_STATUS = "engine_stopped"  # vllm.request.finish_status of a span ended by the engine's stop
ARRIVAL_TIME = "vllm.request.arrival_time"  # Unix seconds: vLLM's Request.arrival_time


# How long a collection waits for the scheduler's next step boundary, where the
# self-check compares the ledger with vLLM's pool before values are read (an idle
# engine has no step: nothing changed, the values are read as they are).
SELF_CHECK_WAIT_SECONDS = 0.25


@dataclass
class _Observed:
    attributes: dict[str, Any]
    state: KVCacheState
    snapshot: FragmentationSnapshot
    stories: RequestStories | None
    states: Any = None  # per-block state codes read with the snapshot, with the region metric on


Points = list[tuple[float, dict[str, Any]]]  # (value, attributes) of a metric's points


@dataclass(frozen=True)
class Stream:
    """One gauge or counter of the plugin, its points read from the latest snapshots."""

    name: str
    unit: str
    description: str
    monotonic: bool  # a counter (an OTLP monotonic sum), else a gauge
    points: Callable[[], Points]


class KVCacheMetrics:
    """The plugin's gauges, counters and histograms over every attached pool.

    Their points are built from one snapshot per pool at collection time
    (`collect`), not through the SDK's observable instruments: thirty-odd
    measurements through the SDK's callbacks, attribute checks and exemplar
    reservoirs cost more than the snapshot of a million-block pool. Only the
    liveness gauge `vllm.frag_otel.active` is an SDK instrument: it puts the
    plugin's scope into every collection the SDK hands to a reader.
    """

    def __init__(self, meter: Meter, guard=None, regions: int = 0, process_attributes: dict[str, Any] | None = None):
        self.regions = regions  # > 0: export vllm.kv_cache.region.blocks with that many regions
        self._pools: list[tuple[weakref.ref[KVCacheState], dict[str, Any], RequestStories | None]] = []
        self._latest: list[_Observed] = []
        self._guard = guard
        # on the process-wide points (liveness, hook errors): the engine the process was started for
        self._process_attributes = dict(process_attributes or {})
        self._lock = threading.Lock()
        # folds, and the reads of the folded counts: two readers (OTLP, Prometheus) may collect at once
        self.histogram_lock = threading.Lock()
        # a 0/1 flag, not a ratio: unit "{state}", so Prometheus gives it no "_ratio" suffix
        meter.create_observable_gauge("vllm.frag_otel.active", [self._observe_active], "{state}",
                                      "1 while the plugin's hooks are live, 0 once it disabled itself")

        def gauge(name: str, points: Callable[[], Points], unit: str, description: str) -> Stream:
            return Stream(name, unit, description, False, points)

        def counter(name: str, points: Callable[[], Points], unit: str, description: str) -> Stream:
            return Stream(name, unit, description, True, points)

        streams = [
            gauge("vllm.kv_cache.blocks", self._blocks, "{block}",
                  "KV-cache blocks by state: used (ref_cnt > 0), cached (ref_cnt 0, holding a reusable prefix), "
                  "empty (ref_cnt 0, no content)"),
        ]
        if regions > 0:
            streams.append(gauge("vllm.kv_cache.region.blocks", self._regions, "{block}",
                                 f"Blocks by state ({', '.join(BLOCK_STATES)}) in each of up to {regions} "
                                 "equal block-id regions of the pool (null block excluded)"))
        simple_gauges = {
            "vllm.kv_cache.block.limit": ("{block}", "Usable KV-cache blocks (null block excluded)", "num_blocks"),
            "vllm.kv_cache.free_runs": ("{run}", "Maximal runs of consecutive free (empty or cached) block ids",
                                        "free_runs"),
            "vllm.kv_cache.free_run.largest": ("{block}", "Length of the largest run of consecutive free blocks", "largest_free_run"),
            "vllm.kv_cache.fragmentation.external": ("1", "Free (empty or cached) blocks outside the largest free run "
                                                     "/ usable blocks", "external_fragmentation"),
            "vllm.kv_cache.fragmentation.internal": ("1", "Unused token slots / allocated token slots in used blocks", "internal_fragmentation"),
            "vllm.kv_cache.slot.utilization": ("1", "Token slots holding computed tokens / all token slots", "slot_utilization"),
            "vllm.kv_cache.requests": ("{request}", "Requests holding KV-cache blocks", "tracked_requests"),
        }
        streams += [gauge(name, self._field(field), unit, description)
                    for name, (unit, description, field) in simple_gauges.items()]
        streams += [
            gauge("vllm.kv_cache.group.blocks", self._group_blocks, "{block}",
                  "Blocks in requests' block tables, per KV-cache group (a Mamba group's are state blocks)"),
            gauge("vllm.kv_cache.slots", self._slots, "{token}",
                  "Token slots in used blocks: used (hold a computed token) or unused, per KV-cache group "
                  "with token slots"),
            gauge("vllm.kv_cache.partial_blocks", self._partial, "{block}",
                  "Used blocks that are partly filled, per KV-cache group with token slots"),
            counter("vllm.kv_cache.prefix_cache.queried", self._prefix(0), "{token}",
                    "Tokens looked up in the prefix cache at admission (resumed: re-admitted after preemption)"),
            counter("vllm.kv_cache.prefix_cache.hit", self._prefix(1), "{token}",
                    "Tokens found in the prefix cache at admission (resumed: re-admitted after preemption)"),
            counter("vllm.kv_cache.block.evictions", self._evictions, "{block}",
                    "Cached blocks whose prefix-cache entry was dropped, by reason and whether it was ever reused"),
            counter("vllm.kv_cache.block.allocations", self._sources, "{block}",
                    "Blocks handed to requests: fresh, recycled (evicting cached content) or prefix_hit (reused)"),
            counter("vllm.kv_cache.allocation.attempts", self._attempts, "{attempt}",
                    "allocate_slots calls by outcome (failure: not enough free blocks)"),
            counter("vllm.kv_cache.preemptions", self._field("preemptions"), "{preemption}",
                    "Requests preempted by the scheduler for lack of KV-cache blocks"),
            counter("vllm.frag_otel.measurements.dropped", self._dropped, "{measurement}",
                    "Histogram measurements dropped because the buffer between collections was full"),
            counter("vllm.frag_otel.requests.untraced", self._untraced, "{request}",
                    "Requests without a span because VLLM_FRAG_OTEL_MAX_OPEN_SPANS spans were already open"),
            counter("vllm.frag_otel.hook.errors", self._hook_errors, "{error}",
                    "Exceptions raised and contained inside the plugin's hooks"),
            counter("vllm.frag_otel.drift", self._field("drift_repairs"), "{repair}",
                    "Times the self-check found the ledger's block flags differing from vLLM's pool and "
                    "resynchronised"),
        ]
        self.streams: tuple[Stream, ...] = tuple(streams)

    def add_pool(self, state: KVCacheState, attributes: dict[str, Any], stories: RequestStories | None = None) -> None:
        with self._lock:
            self._pools.append((weakref.ref(state), dict(attributes), stories))

    def clear(self) -> None:
        with self._lock:
            self._pools.clear()
            self._latest = []

    # -- collection ----------------------------------------------------------------

    def collect(self) -> list[tuple[Stream, Points]]:
        """One snapshot of every pool (and the histograms folded), then every
        gauge's and counter's points from it; streams without points are left out."""
        self._refresh()
        return [(stream, points) for stream in self.streams if (points := stream.points())]

    def _tracking(self) -> bool:
        return self._guard is None or self._guard.active

    def _refresh(self) -> None:
        latest = []
        with self._lock:
            self._pools = [pool for pool in self._pools if pool[0]() is not None]
            pools = [(ref(), attrs, stories) for ref, attrs, stories in self._pools]
        if self._tracking():
            for state, attrs, stories in pools:
                if state is None:
                    continue
                state.check_before_reading(SELF_CHECK_WAIT_SECONDS)
                if self.regions > 0:  # one read of the pool for both: the region totals equal vllm.kv_cache.blocks
                    snapshot, states = state.snapshot_with_states()
                    latest.append(_Observed(attrs, state, snapshot, stories, states))
                else:
                    latest.append(_Observed(attrs, state, state.snapshot(), stories))
                with self.histogram_lock:
                    state.fold_histograms(time_ns())
        self._latest = latest

    def histogram_points(self) -> list[tuple[str, dict[str, Any], BucketHistogram]]:
        """(metric name, point attributes, histogram) of every pool, as of the last collection."""
        points = []
        for o in self._latest:
            for outcome, histogram in o.state.allocation_duration.items():
                attributes = {**o.attributes, OUTCOME: outcome, SAMPLE_RATE: o.state.allocation_sample_rate}
                points.append(("vllm.kv_cache.allocation.duration", attributes, histogram))
            points.append(("vllm.kv_cache.block.cache.duration", o.attributes, o.state.block_cache_duration))
            points.append(("vllm.kv_cache.block.idle.duration", o.attributes, o.state.block_idle_duration))
        return points

    def _blocks(self) -> Points:
        points = []
        for o in self._latest:
            s = o.snapshot
            points += [
                (s.used_blocks, {**o.attributes, STATE: "used"}),
                (s.cached_blocks, {**o.attributes, STATE: "cached"}),
                (s.empty_blocks, {**o.attributes, STATE: "empty"}),
            ]
        return points

    def _regions(self) -> Points:
        points = []
        for o in self._latest:
            if o.states is None:
                continue
            counts = region_counts(o.states, self.regions).tolist()
            for s, name in enumerate(BLOCK_STATES):
                points += [(count, {**o.attributes, REGION: r, STATE: name}) for r, count in enumerate(counts[s])]
        return points

    def _field(self, field: str) -> Callable[[], Points]:
        return lambda: [(getattr(o.snapshot, field), o.attributes) for o in self._latest]

    def _prefix(self, index: int) -> Callable[[], Points]:
        return lambda: [
            (totals[index], {**o.attributes, RESUMED: resumed})
            for o in self._latest for resumed, totals in dict(o.state.prefix_lookups).items()
        ]

    def _group_points(self, token_slots_only: bool):
        """(group snapshot, its point attributes) of every pool."""
        for o in self._latest:
            for g in o.snapshot.groups:
                if g.token_slots or not token_slots_only:
                    yield g, {**o.attributes, GROUP: g.group, GROUP_KIND: g.kind}

    def _group_blocks(self) -> Points:
        return [(g.used_blocks, attributes) for g, attributes in self._group_points(False)]

    def _slots(self) -> Points:
        points = []
        for g, attributes in self._group_points(True):
            points += [(g.used_slots, {**attributes, SLOT_STATE: "used"}),
                       (g.unused_slots, {**attributes, SLOT_STATE: "unused"})]
        return points

    def _partial(self) -> Points:
        return [(g.partial_blocks, attributes) for g, attributes in self._group_points(True)]

    def _evictions(self) -> Points:
        return [
            (count, {**o.attributes, REASON: reason, REUSED: reused})
            for o in self._latest for (reason, reused), count in dict(o.state.evictions).items()
        ]

    def _sources(self) -> Points:
        return [
            (count, {**o.attributes, SOURCE: source})
            for o in self._latest for source, count in dict(o.state.block_sources).items()
        ]

    def _attempts(self) -> Points:
        return [
            (count, {**o.attributes, OUTCOME: outcome})
            for o in self._latest for outcome, count in dict(o.state.allocations).items()
        ]

    def _dropped(self) -> Points:
        return [(o.state.dropped_measurements, o.attributes) for o in self._latest]

    def _untraced(self) -> Points:
        return [(o.stories.not_followed, o.attributes) for o in self._latest if o.stories is not None]

    def _hook_errors(self) -> Points:
        return [(self._guard.errors if self._guard else 0, dict(self._process_attributes))]

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(1 if self._tracking() else 0, self._process_attributes)]


# -- histograms ---------------------------------------------------------------------

HISTOGRAM_DESCRIPTIONS = {
    "vllm.kv_cache.allocation.duration": "Duration of KVCacheManager.allocate_slots",
    "vllm.kv_cache.block.cache.duration": "Time from a block's content being cached to its eviction (every evicted block)",
    "vllm.kv_cache.block.idle.duration": "Time from a cached block's last release to its eviction (every evicted block)",
}


class PointsExporter(MetricExporter):
    """Adds the plugin's points to every export, then hands it to `inner`.

    Gauges and counters come from one snapshot per pool (`KVCacheMetrics.collect`),
    counters cumulative or delta as `inner` prefers for observable counters.
    Histogram values are buffered by the state on the hot path (recording each
    through the SDK costs microseconds, and allocate_slots runs once per request
    per step) and folded into bucket counts with numpy at collection; they
    become OTLP histogram points (cumulative or delta, as `inner` prefers), with
    exemplars from the measured requests' sampled spans.
    """

    def __init__(self, inner: MetricExporter, exemplars: bool = True):
        super().__init__(
            preferred_temporality=inner._preferred_temporality,  # noqa: SLF001 - keep the inner choice
            preferred_aggregation=inner._preferred_aggregation,  # noqa: SLF001
        )
        self.inner = inner
        retry_log.quiet(type(inner))
        self.metrics: KVCacheMetrics | None = None
        self.exemplars = exemplars
        self._start_ns = time_ns()
        self._last_ns = self._start_ns
        self._exported: dict[tuple, tuple[np.ndarray, int, float]] = {}  # histograms' last cumulative values
        self._counted: dict[tuple, float] = {}  # counters' last cumulative values
        self.delivered_ns = 0  # when the last export that the exporter confirmed began

    def _is_delta(self, instrument_class: type) -> bool:
        return (self._preferred_temporality or {}).get(instrument_class) is AggregationTemporality.DELTA

    @property
    def delta(self) -> bool:
        return self._is_delta(SdkHistogram)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        began = time_ns()
        if self.metrics is not None:
            metrics_data = self.with_points(metrics_data)
        with retry_log.ours():
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        if result is MetricExportResult.SUCCESS:
            self.delivered_ns = began
            retry_log.delivered()
        return result

    def with_points(self, metrics_data: MetricsData) -> MetricsData:
        """`metrics_data` with the plugin's gauges, counters and histograms in its scope."""
        observed = self.metrics.collect()
        now = time_ns()
        extra = [self._metric(stream, points, now) for stream, points in observed]
        by_name: dict[str, list[HistogramDataPoint]] = {}
        with self.metrics.histogram_lock:
            for name, attributes, histogram in self.metrics.histogram_points():
                by_name.setdefault(name, []).append(self._histogram_point(name, attributes, histogram, now))
        self._last_ns = now
        temporality = AggregationTemporality.DELTA if self.delta else AggregationTemporality.CUMULATIVE
        extra += [
            Metric(name, HISTOGRAM_DESCRIPTIONS[name], "s", HistogramData(points, temporality))
            for name, points in by_name.items()
        ]
        resource_metrics = []
        for rm in metrics_data.resource_metrics:
            scopes = [
                ScopeMetrics(sm.scope, [*sm.metrics, *extra], sm.schema_url) if sm.scope.name == SCOPE else sm
                for sm in rm.scope_metrics
            ]
            resource_metrics.append(ResourceMetrics(rm.resource, scopes, rm.schema_url))
        return MetricsData(resource_metrics)

    def _metric(self, stream: Stream, points: Points, now: int) -> Metric:
        if not stream.monotonic:  # as the SDK's last-value aggregation: no start time
            return Metric(stream.name, stream.description, stream.unit,
                          Gauge([NumberDataPoint(attributes, None, now, value) for value, attributes in points]))
        if not self._is_delta(ObservableCounter):
            data_points = [NumberDataPoint(attributes, self._start_ns, now, value) for value, attributes in points]
            return Metric(stream.name, stream.description, stream.unit,
                          Sum(data_points, AggregationTemporality.CUMULATIVE, True))
        data_points = []
        for value, attributes in points:
            key = _point_key(stream.name, attributes)
            previous = self._counted.get(key, 0)
            self._counted[key] = value
            data_points.append(NumberDataPoint(attributes, self._last_ns, now, value - previous))
        return Metric(stream.name, stream.description, stream.unit, Sum(data_points, AggregationTemporality.DELTA, True))

    def _histogram_point(self, name: str, attributes: dict[str, Any], histogram: BucketHistogram, now: int) -> HistogramDataPoint:
        counts, count, total = histogram.counts.copy(), histogram.count, histogram.sum
        low, high = histogram.min, histogram.max
        start = self._start_ns
        if self.delta:
            key = _point_key(name, attributes)
            previous = self._exported.get(key)
            self._exported[key] = (counts, count, total)
            if previous is not None:
                counts, count, total = counts - previous[0], count - previous[1], total - previous[2]
            low, high = histogram.take_window_extremes()
            start = self._last_ns
        exemplars = [
            Exemplar({}, value, at, span_context.span_id, span_context.trace_id)
            for value, span_context, at in histogram.exemplars.values()
            if self.exemplars and (not self.delta or at > self._last_ns)
        ]
        return HistogramDataPoint(
            attributes=attributes,
            start_time_unix_nano=start,
            time_unix_nano=now,
            count=int(count),
            sum=float(total),
            bucket_counts=[int(c) for c in counts],
            explicit_bounds=list(histogram.bounds),
            min=low if count else 0.0,
            max=high if count else 0.0,
            exemplars=exemplars,
        )

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def _point_key(name: str, attributes: dict[str, Any]) -> tuple:
    """A point's identity across exports (its metric and attribute set): what a delta is taken against."""
    return name, tuple(sorted(attributes.items()))


class _Unexported(MetricExporter):
    """No exporter: under a PointsExporter that only builds points (for the Prometheus reader)."""

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        pass


# -- spans ------------------------------------------------------------------------

SPAN_NAME = "vllm.kv_cache.request"
_PROPAGATOR = TraceContextTextMapPropagator()


def _request_ids_randomized() -> bool:
    """Whether vLLM appends "-" and 8 random characters to the id a client sent
    (unless VLLM_DISABLE_REQUEST_ID_RANDOMIZATION is set)."""
    return os.environ.get("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "").lower() not in ("1", "true")


def external_request_id(request_id: str, randomized: bool = True) -> str:
    """The id the client sent, as on vLLM's `llm_request` span."""
    if not randomized:
        return request_id
    head, sep, tail = request_id.rpartition("-")
    return head if sep and len(tail) == 8 else request_id


@dataclass(slots=True)
class _OpenSpan:
    """A sampled request's span while the request runs: plain data, about 0.5 kB
    and two objects the GC tracks per request in flight, where a live SDK span
    held about 3 kB in twelve (its attribute and event containers, locks)."""

    parent: SpanContext | None  # from the trace headers
    attributes: dict[str, Any]  # those known at open (str and int only: a dict the GC does not track)
    start_ns: int
    context: SpanContext
    events: tuple[tuple[str, dict[str, Any], int], ...] = ()  # (name, attributes, time_ns); most have none


_NO_PARENT = Context()
# SDKs before 1.40 know no random-trace-id flag
_RANDOM_TRACE_ID = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)
# attributes a span gets at most: ours and a sampler's few
_SPAN_ATTRIBUTES = 32


class KVCacheSpans:
    """A StorySink: one span per request's KV-cache lifecycle, in the caller's trace.

    When a request opens, its span's ids are drawn and the sampler decides, as
    the SDK's tracer does when a span starts (its measurements carry the ids
    as exemplars, so those name exported spans only). When it ends, its span
    is built as the tracer would have built and ended it (the span limits
    applied) and handed to `processor`'s `on_end`. Built directly, not through
    a live SDK span, it skips the tracer's per-value attribute cleaning and
    locks: most of a span's cost on vLLM's scheduler thread (our values are
    str, int and bool already)."""

    def __init__(self, provider: TracerProvider, processor: SpanProcessor):
        self._ids = provider.id_generator
        self._sampler = provider.sampler
        self._resource = provider.resource
        self._processor = processor
        self._scope = InstrumentationScope(SCOPE, __version__)
        self._limits = limits = SpanLimits()  # OTEL_SPAN_* / OTEL_ATTRIBUTE_* limits, read as the tracer reads them
        # no value is cut and no attribute dropped: the span's attributes go as they are
        self._attributes_as_they_are = limits.max_span_attribute_length is None and (
            limits.max_span_attributes is None or limits.max_span_attributes >= _SPAN_ATTRIBUTES
        )
        self._randomized_ids = _request_ids_randomized()
        is_random = getattr(self._ids, "is_trace_id_random", None)
        self._random_root = _RANDOM_TRACE_ID if is_random is not None and is_random() else 0

    def opened(self, story: RequestStory, trace_headers) -> None:
        if trace_headers:
            parent = _PROPAGATOR.extract(trace_headers)
            parent_span = get_current_span(parent).get_span_context()
        else:  # most requests: no trace context to look into
            parent, parent_span = _NO_PARENT, INVALID_SPAN_CONTEXT
        if parent_span.is_valid:
            trace_id, flags = parent_span.trace_id, parent_span.trace_flags & _RANDOM_TRACE_ID
        else:
            parent_span, trace_id, flags = None, self._ids.generate_trace_id(), self._random_root
        attributes = {
            # vLLM's own span (`llm_request`) names the request `gen_ai.request.id` too: the join
            "gen_ai.request.id": external_request_id(story.request_id, self._randomized_ids),
            "vllm.request.id": story.request_id,
            "gen_ai.usage.input_tokens": story.prompt_tokens,  # was gen_ai.usage.prompt_tokens
            "vllm.kv_cache.group.count": story.num_groups,
        }
        if story.arrival_time is not None:  # the span starts at the first lookup; queueing began here
            attributes[ARRIVAL_TIME] = story.arrival_time
        sampling = self._sampler.should_sample(parent, trace_id, SPAN_NAME, SpanKind.INTERNAL, attributes)
        if not sampling.decision.is_recording():
            story.handle = story.exemplar = None
            return
        sampled = sampling.decision.is_sampled()
        context = SpanContext(trace_id, self._ids.generate_span_id(), False,
                              TraceFlags(flags | (TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)),
                              sampling.trace_state)
        story.handle = _OpenSpan(parent_span, dict(sampling.attributes) if sampling.attributes else {}, time_ns(),
                                 context)
        # exemplars (their trace and span ids) come from sampled spans only (OTEL_METRICS_EXEMPLAR_FILTER=trace_based)
        story.exemplar = context if sampled else None

    def event(self, story: RequestStory, name: str, attributes: dict[str, Any]) -> None:
        record = story.handle
        if record is not None:
            record.events += ((name, attributes, time_ns()),)

    def closed(self, story: RequestStory, failed: bool) -> None:
        record = story.handle
        if record is None:
            return
        attributes = record.attributes
        attributes.update({
            "vllm.kv_cache.prefix_cache.hit_tokens": story.hit_tokens,
            "gen_ai.usage.cache_read.input_tokens": story.hit_tokens,  # the same: prefix-cache hits at admission
            "vllm.kv_cache.block.peak": story.peak_blocks,
            "vllm.kv_cache.slot.allocated": story.allocated_slots,
            "vllm.kv_cache.slot.unused": story.unused_slots,
            "vllm.request.preemptions": story.preemptions,
            "vllm.kv_cache.allocation.failures": story.failed_allocations,
            "vllm.kv_cache.block.evicted": story.evicted_blocks,
            "gen_ai.usage.output_tokens": story.output_tokens,  # was gen_ai.usage.completion_tokens
            "vllm.request.finish_status": story.finish_status,
        })
        if story.finish_status == ENGINE_STOPPED_STATUS:
            attributes[ENGINE_STOPPED] = True  # status stays UNSET: the request did not fail
        self._processor.on_end(self._finished_span(record, failed, story.finish_status))

    def _finished_span(self, record: _OpenSpan, failed: bool, description: str) -> ReadableSpan:
        limits = self._limits
        attributes = record.attributes
        if not self._attributes_as_they_are:
            attributes = BoundedAttributes(limits.max_span_attributes, attributes, immutable=True,
                                           max_value_len=limits.max_span_attribute_length)
        events = tuple(  # few: most requests have none
            Event(name, BoundedAttributes(limits.max_event_attributes, event_attributes, immutable=True,
                                          max_value_len=limits.max_attribute_length), at)
            for name, event_attributes, at in record.events
        )
        if limits.max_events is not None and len(events) > limits.max_events:
            events = BoundedList.from_seq(limits.max_events, events)  # the latest, as the SDK keeps them
        return ReadableSpan(
            name=SPAN_NAME,
            context=record.context,
            parent=record.parent,
            resource=self._resource,
            attributes=attributes,
            events=events,
            kind=SpanKind.INTERNAL,
            status=Status(StatusCode.ERROR, description) if failed else _UNSET,
            start_time=record.start_ns,
            end_time=time_ns(),
            instrumentation_scope=self._scope,
        )


_UNSET = Status(StatusCode.UNSET)


# -- block-layout maps ---------------------------------------------------------------


class BlockMapSampler:
    """Opt-in block-layout maps: every pool's per-block states, binned to at
    most `max_cells` cells and compressed, emitted as one log record (event
    `vllm.kv_cache.block_map`) per pool per sample.

    Sampling runs on its own thread (or when `sample()` is called, as the
    simulator does per step), never on the scheduler's: the hot path only ever
    waits for the pool lock while the holder counts are read.
    """

    def __init__(self, otel_logger: Logger, max_cells: int, pools, guard=None):
        self._logger = otel_logger
        self.max_cells = max_cells
        self._pools = pools  # () -> [(state, attributes)]
        self._guard = guard
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.emitted = 0  # maps handed to the logger, ever

    def sample(self) -> int:
        """Emit one map per live pool; returns how many."""
        if self._guard is not None and not self._guard.active:
            return 0
        emitted = 0
        for state, attributes in self._pools():
            block_map = BlockMap.from_states(state.block_states(), time_ns(), self.max_cells)
            payload, map_attributes = block_map.encode()
            self._logger.emit(
                timestamp=block_map.time_unix_nano, body=payload, attributes={**attributes, **map_attributes},
                event_name=EVENT_NAME, severity_number=SeverityNumber.INFO,
            )
            emitted += 1
            self.emitted += 1
        return emitted

    def start(self, interval_s: float) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(interval_s,), name="vllm-frag-otel-block-map", daemon=True
        )
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.sample()
            except Exception as exc:  # contained like a hook error: vLLM never sees it
                if self._guard is None:
                    raise
                self._guard.failed(exc)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(0.0, timeout_s))


# -- delivery accounting (what a stop could not deliver) ----------------------------


class _RetryLog(logging.Filter):
    """The OTLP exporters log every failed attempt of every export ("Transient error ...,
    retrying", "Failed to export ... batch", "Shutdown in progress, aborting retry."): with
    the collector down, a line per retry for as long as it stays down. The first one is
    logged, saying it is the plugin's, and the rest are dropped: what a stop could not
    deliver is counted and reported by the stop itself. Only records logged inside the
    plugin's own exports (`ours`) are touched: vLLM's own OTLP tracing logs through the
    same loggers, and its lines stay as they are. When an export is delivered again, one
    line says so, and the next outage is announced in its turn."""

    PREFIXES = ("Transient error", "Failed to export", "Shutdown in progress, aborting retry",
                "Exporter already shutdown")  # a batch handed on while the stop shuts the exporter down
    EXTRA_LOGGERS = ("opentelemetry.exporter.otlp.common.http",)  # the HTTP exporters' shared client

    def __init__(self) -> None:
        super().__init__()
        self._logged = False
        self._loggers: set[str] = set()
        self._exporting = threading.local()

    @contextlib.contextmanager
    def ours(self) -> Iterator[None]:
        """Around one of the plugin's exports, on the exporting thread."""
        self._exporting.active = True
        try:
            yield
        finally:
            self._exporting.active = False

    def quiet(self, exporter_class: type) -> None:
        """Filter the loggers an exporter class logs its retries to (its module's and its bases'),
        whichever exporter the plugin wraps (built from the environment or handed to the Runtime)."""
        names = {c.__module__ for c in exporter_class.__mro__ if c.__module__.startswith("opentelemetry.exporter.")}
        for name in (names | set(self.EXTRA_LOGGERS)) - self._loggers:
            logging.getLogger(name).addFilter(self)
            self._loggers.add(name)

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(self._exporting, "active", False) or not isinstance(record.msg, str) or \
                not record.msg.startswith(self.PREFIXES):
            return True
        if self._logged:
            return False
        self._logged = True
        failure = record.getMessage()
        record.msg = ("vllm-frag-otel: cannot deliver to the OTLP collector (%s). The exporter retries in the "
                      "background; further failed attempts are not logged; what an engine stop cannot deliver "
                      "is reported when it stops.")
        record.args = (failure.rstrip(),)
        return True

    def delivered(self) -> None:
        """One of the plugin's exports reached the collector."""
        if self._logged:
            self._logged = False
            logger.info("vllm-frag-otel: the OTLP collector takes the telemetry again.")


retry_log = _RetryLog()


class _Delivery:
    """Wraps a span or log exporter: counts the items it confirmed delivered."""

    def __init__(self, inner):
        self.inner = inner
        retry_log.quiet(type(inner))
        self.delivered = 0

    def export(self, batch, *args, **kwargs):
        with retry_log.ours():
            result = self.inner.export(batch, *args, **kwargs)
        if getattr(result, "name", None) == "SUCCESS":
            self.delivered += len(batch)
            retry_log.delivered()
        return result

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: int = 30_000) -> None:
        # the batch processors pass the time left when the exporter takes it
        if "timeout_millis" in inspect.signature(self.inner.shutdown).parameters:
            self.inner.shutdown(timeout_millis=timeout_millis)
        else:
            self.inner.shutdown()

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _EndedSpans(SpanProcessor):
    """Counts the sampled spans ended (those the batch processor queues for export)."""

    def __init__(self):
        self.ended = 0

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled:
            self.ended += 1


# -- exporters and the per-process runtime ----------------------------------------

@dataclass(frozen=True)
class _SignalExporters:
    otlp_module: str  # under opentelemetry.exporter.otlp.proto.{grpc,http}
    otlp_class: str
    console: type
    file_class: str  # in vllm_frag_otel.export.otlp_json, imported only when used


SIGNALS = {
    "metrics": _SignalExporters("metric_exporter", "OTLPMetricExporter", ConsoleMetricExporter,
                                "OTLPJsonFileMetricExporter"),
    "traces": _SignalExporters("trace_exporter", "OTLPSpanExporter", ConsoleSpanExporter, "OTLPJsonFileSpanExporter"),
    "logs": _SignalExporters("_log_exporter", "OTLPLogExporter", ConsoleLogRecordExporter, "OTLPJsonFileLogExporter"),
}


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _endpoint(signal: str) -> str:
    """The signal's OTLP endpoint, else the common one, else ''."""
    return _env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")


def _otlp_protocol(signal: str = "metrics") -> str:
    # vLLM's own tracing copies --otlp-traces-endpoint (e.g. grpc://collector:4317)
    # into OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: a grpc:// endpoint means gRPC, as there
    if _endpoint(signal).lower().startswith("grpc://"):
        return "grpc"
    for name in (f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if _env(name).lower() in OTLP_PROTOCOLS:  # another value was reported at start-up
            return _env(name).lower()
    return "http/protobuf"


def exporter_choice(settings: Settings, signal: str) -> str:
    """otlp, file, console or none, for one signal: where it is pushed (see `serves_prometheus`)."""
    push, _ = exporter_parts(settings.exporter)
    if signal == "metrics":
        if settings.exporter == "auto" and (standard := metrics_exporters()) is not None:
            return next((name for name in standard if name != PROMETHEUS), "none")  # OTEL_METRICS_EXPORTER
        if push is None:
            return "none"  # prometheus alone: served, not pushed
    if push is not None and push != "auto":
        return push
    return "otlp" if _endpoint(signal) else "file"  # auto; spans and block maps with prometheus alone


def serves_prometheus(settings: Settings) -> bool:
    """VLLM_FRAG_OTEL_EXPORTER lists prometheus, or (left on auto) OTEL_METRICS_EXPORTER does."""
    if settings.exporter == "auto":
        return PROMETHEUS in (metrics_exporters() or ())
    return exporter_parts(settings.exporter)[1]


def build_exporter(settings: Settings, signal: str) -> MetricExporter | SpanExporter | LogRecordExporter | None:
    """The exporter `VLLM_FRAG_OTEL_EXPORTER` and the `OTEL_*` variables ask for."""
    choice = exporter_choice(settings, signal)
    exporters = SIGNALS[signal]
    if choice == "none":
        return None
    if choice == "console":
        return exporters.console()
    if choice == "otlp":
        transport = "grpc" if _otlp_protocol(signal) == "grpc" else "http"
        module = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{transport}.{exporters.otlp_module}")
        exporter_class = getattr(module, exporters.otlp_class)
        if _endpoint(signal).lower().startswith("grpc://") and not _env("OTEL_EXPORTER_OTLP_INSECURE"):
            return exporter_class(insecure=True)  # plaintext, as vLLM's own exporter
        if transport == "http" and (session := _certificate_session(signal)) is not None:
            return exporter_class(session=session)
        return exporter_class()
    from vllm_frag_otel.export import otlp_json

    file_exporter = getattr(otlp_json, exporters.file_class)
    return file_exporter(settings.file_dir, settings.file_max_bytes, settings.file_max_files)


def _certificate_session(signal: str):
    """A requests session for the OTLP/HTTP exporter that keeps the CA file it is given
    (OTEL_EXPORTER_OTLP_[<SIGNAL>_]CERTIFICATE). requests replaces a session's CA file on every
    request with REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE when either is set (many container images
    set them), so the collector's certificate would be checked against that bundle instead and
    refused. None without a configured certificate, or when a credential provider supplies the
    session (OTEL_PYTHON_EXPORTER_OTLP_HTTP_[<SIGNAL>_]CREDENTIAL_PROVIDER)."""
    prefix = f"OTEL_EXPORTER_OTLP_{signal.upper()}_"
    if not (_env(prefix + "CERTIFICATE") or _env("OTEL_EXPORTER_OTLP_CERTIFICATE")):
        return None
    if _env("OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER") or \
            _env(f"OTEL_PYTHON_EXPORTER_OTLP_HTTP_{signal.upper()}_CREDENTIAL_PROVIDER"):
        return None
    import requests

    class _KeepsItsCA(requests.Session):
        def merge_environment_settings(self, url, proxies, stream, verify, cert):
            merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if verify is None:  # the exporter never passes one: its session's CA file is the one
                merged["verify"] = self.verify
            return merged

    return _KeepsItsCA()


# vLLM's own label names on its Prometheus series (PrometheusStatLogger: model_name, engine):
# the pool's points carry them, so its series join vllm:* ones without relabelling
MODEL_NAME = "model_name"
ENGINE = "engine"


def join_attributes(engine_attributes: dict[str, Any]) -> dict[str, Any]:
    """The engine's attributes for a pool's points: the served model name and the engine
    index (the data-parallel rank, a string as in vLLM's label) under vLLM's label names."""
    attributes = {k: v for k, v in engine_attributes.items() if k not in ("vllm.model.name", "vllm.data_parallel.rank")}
    if "vllm.model.name" in engine_attributes:
        attributes[MODEL_NAME] = engine_attributes["vllm.model.name"]
    attributes[ENGINE] = str(engine_attributes.get("vllm.data_parallel.rank") or 0)
    return attributes


def build_resource(engine_attributes: dict[str, Any]) -> Resource:
    host = socket.gethostname()
    attributes: dict[str, Any] = {
        # the same engine after a restart is the same instance (its series continue); engines of
        # one host differ by data-parallel rank (others: OTEL_RESOURCE_ATTRIBUTES)
        "service.instance.id": f"{host}-dp{int(engine_attributes.get('vllm.data_parallel.rank') or 0)}",
        "host.name": host,
        "process.pid": os.getpid(),
        **engine_attributes,
    }
    attributes.setdefault("service.name", "vllm")
    # what the operator set in OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME wins over our defaults
    configured = OTELResourceDetector().detect().attributes
    return Resource.create({k: v for k, v in attributes.items() if k not in configured})


class Runtime:
    """This process's providers, readers and instruments.

    Exporters come from the settings and environment unless given (tests).
    """

    def __init__(
        self,
        settings: Settings,
        engine_attributes: dict[str, Any],
        guard,
        metric_exporter: MetricExporter | None = None,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        self.pid = os.getpid()
        self.settings = settings
        self.meter_provider: MeterProvider | None = None
        self.tracer_provider: TracerProvider | None = None
        self.metrics: KVCacheMetrics | None = None
        self.spans: KVCacheSpans | None = None
        self.logger_provider: LoggerProvider | None = None
        self.block_maps: BlockMapSampler | None = None
        self._guard = guard
        self._resource: Resource | None = None
        self._pools: list[tuple[weakref.ref[KVCacheState], dict[str, Any]]] = []
        self._pool_count = 0
        self._ledgers: list[tuple[weakref.ref[KVCacheState], RequestStories]] = []
        self._stopped_pools: weakref.WeakSet[KVCacheState] = weakref.WeakSet()
        self._stop_lock = threading.Lock()
        self.stopped = False
        self.undelivered: dict[str, int] | None = None  # what the stop could not deliver in time
        self._points_exporter: PointsExporter | None = None
        self.prometheus = None  # the Prometheus scrape reader (export/prometheus.py), when serving
        self._span_delivery: _Delivery | None = None
        self._ended_spans: _EndedSpans | None = None
        self._log_delivery: _Delivery | None = None
        if _env("OTEL_SDK_DISABLED").lower() == "true":
            logger.info("vllm-frag-otel: OTEL_SDK_DISABLED=true, no telemetry is exported.")
            return
        # the SDK counts spans its full queue drops only with its internal metrics on
        with _sdk_environment(unusable_otel_variables(), {"OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED": "true"}):
            self._start(engine_attributes, guard, metric_exporter, span_exporter)

    def _start(self, engine_attributes, guard, metric_exporter, span_exporter) -> None:
        settings = self.settings
        metric_exporter = metric_exporter or build_exporter(settings, "metrics")
        if settings.spans:
            span_exporter = span_exporter or build_exporter(settings, "traces")
        else:
            span_exporter = None
        if "file" in (exporter_choice(settings, "metrics"), exporter_choice(settings, "traces")):
            why, instead = ("VLLM_FRAG_OTEL_EXPORTER=file", "set VLLM_FRAG_OTEL_EXPORTER=otlp") \
                if exporter_parts(settings.exporter)[0] == "file" else \
                ("no OTLP endpoint configured", "set OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://localhost:4318)")
            logger.warning(
                "vllm-frag-otel: %s; writing KV-cache telemetry as OTLP/JSON lines to %s (at most %d files of "
                "%d bytes each per signal). To send it to a collector instead, %s.",
                why, settings.file_dir, settings.file_max_files, settings.file_max_bytes, instead,
            )
        resource = self._resource = build_resource(engine_attributes)
        if settings.block_map_interval > 0 and self.start_block_maps() is not None:
            self.block_maps.start(settings.block_map_interval)
        readers = []
        if metric_exporter is not None:
            exporter = self._points_exporter = PointsExporter(
                metric_exporter, exemplars=_env("OTEL_METRICS_EXEMPLAR_FILTER").lower() != "always_off"
            )
            readers.append(PeriodicExportingMetricReader(exporter))
        scrape = self.prometheus = self._scrape_reader() if serves_prometheus(settings) else None
        if scrape is not None:
            readers.append(scrape)
        if readers:
            # shutdown_on_exit=False on every provider: the SDK's exit handlers would retry a dead
            # collector without bound; the plugin's own stop (bounded) is the only shutdown path
            self.meter_provider = MeterProvider(resource=resource, metric_readers=readers, shutdown_on_exit=False)
            joined = join_attributes(engine_attributes)
            self.metrics = KVCacheMetrics(self.meter_provider.get_meter(SCOPE, __version__), guard,
                                          regions=settings.regions if settings.region_metric else 0,
                                          process_attributes={k: joined[k] for k in (MODEL_NAME, ENGINE) if k in joined})
            for points in (self._points_exporter, getattr(scrape, "points", None)):
                if points is not None:
                    points.metrics = self.metrics
            if scrape is not None:
                self._serve(scrape, engine_attributes)
        if span_exporter is not None:
            # the SDK's own processor metrics (queue size, spans dropped when full) go with ours
            self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
            self._ended_spans = _EndedSpans()
            self._span_delivery = _Delivery(span_exporter)
            # the spans go to these processors straight (KVCacheSpans); the provider flushes and stops them
            processors = SynchronousMultiSpanProcessor()
            processors.add_span_processor(self._ended_spans)
            processors.add_span_processor(BatchSpanProcessor(self._span_delivery, meter_provider=self.meter_provider))
            self.tracer_provider.add_span_processor(processors)
            self.spans = KVCacheSpans(self.tracer_provider, processors)

    @staticmethod
    def _scrape_reader():
        """The Prometheus reader (prometheus.ScrapeReader), or None without the prometheus extra."""
        try:
            from vllm_frag_otel.export import prometheus
        except ImportError as exc:
            logger.warning("vllm-frag-otel: serving metrics for Prometheus needs the prometheus extra (%s): "
                           "pip install 'vllm-frag-otel[prometheus]'. The metrics are not served; vLLM runs on.", exc)
            return None
        points = PointsExporter(_Unexported(), exemplars=False)  # cumulative, as Prometheus wants

        def add_points(data: MetricsData) -> MetricsData:
            return points.with_points(data) if points.metrics is not None else data

        reader = prometheus.ScrapeReader(add_points)
        reader.points = points
        return reader

    def _serve(self, reader, engine_attributes: dict[str, Any]) -> None:
        """Listen on OTEL_EXPORTER_PROMETHEUS_HOST, port OTEL_EXPORTER_PROMETHEUS_PORT + the
        engine's data-parallel rank; a port in use (or any other failure) is one warning."""
        host, base = prometheus_address()
        rank = int(engine_attributes.get("vllm.data_parallel.rank") or 0)
        port = base + rank
        shown = f"[{host}]" if ":" in host else host  # an IPv6 address
        where = f"{shown}:{port} (OTEL_EXPORTER_PROMETHEUS_PORT={base} + data-parallel rank {rank})"
        try:
            if port > 65535:
                raise OSError(f"port {port} is beyond 65535")
            reader.serve(host, port)
        except Exception as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            logger.warning(
                "vllm-frag-otel: cannot serve metrics for Prometheus on %s: %s. They are not served; vLLM runs on. "
                "Set OTEL_EXPORTER_PROMETHEUS_PORT to a free base port (each data-parallel rank listens on base + "
                "rank) or OTEL_EXPORTER_PROMETHEUS_HOST to an address of this host.", where, reason,
            )
            return
        logger.info("vllm-frag-otel: serving KV-cache metrics for Prometheus on http://%s/metrics (%s).",
                    where.split(" ", 1)[0], where.split(" ", 1)[1][1:-1])

    def start_block_maps(self) -> BlockMapSampler | None:
        """The block-layout map sampler, built on first use; None when nothing is exported."""
        if self.block_maps is None and self._resource is not None:
            with _sdk_environment(unusable_otel_variables(), {}):
                exporter = build_exporter(self.settings, "logs")
                if exporter is None:
                    return None
                self.logger_provider = LoggerProvider(resource=self._resource, shutdown_on_exit=False)
                self._log_delivery = _Delivery(exporter)
                self.logger_provider.add_log_record_processor(BatchLogRecordProcessor(self._log_delivery))
            self.block_maps = BlockMapSampler(
                self.logger_provider.get_logger(SCOPE, __version__), self.settings.block_map_max_cells,
                self._live_pools, self._guard,
            )
        return self.block_maps

    @contextlib.contextmanager
    def stepping_held(self) -> Iterator[None]:
        """Around a wait of the scheduler's thread for a collection it started on
        another thread: that collection's self-check runs here, first
        (`KVCacheState.hold`), so it does not wait for a step boundary."""
        held = [state for state, _ in self._live_pools() if state.hold()]
        try:
            yield
        finally:
            for state in held:
                state.release()

    def _live_pools(self) -> list[tuple[KVCacheState, dict[str, Any]]]:
        return [(state, attributes) for ref, attributes in list(self._pools) if (state := ref()) is not None]

    def add_pool(self, state: KVCacheState, engine_attributes: dict[str, Any]) -> RequestStories | None:
        """Export `state`; the story ledger for its requests when spans are on.

        Points carry the engine's attributes too (`join_attributes`: model, engine index):
        the resource names only the process, and one process may run several engines."""
        stories = RequestStories(self.spans, self.settings.max_open_spans) if self.spans is not None else None
        state.set_allocation_sample_rate(self.settings.allocation_sample_rate)
        attributes = {**join_attributes(engine_attributes), POOL: str(self._pool_count)}
        self._pools = [pool for pool in self._pools if pool[0]() is not None]
        self._pools.append((weakref.ref(state), attributes))
        if self.metrics is not None:
            self.metrics.add_pool(state, attributes, stories)
        if stories is not None:
            self._ledgers = [ledger for ledger in self._ledgers if ledger[0]() is not None]
            self._ledgers.append((weakref.ref(state), stories))
        self._pool_count += 1
        return stories

    def forget_pools(self) -> None:
        self._pools = []
        self._ledgers = []
        if self.metrics is not None:
            self.metrics.clear()

    def _providers(self) -> list:
        return [p for p in (self.tracer_provider, self.logger_provider, self.meter_provider) if p is not None]

    def force_flush(self) -> None:
        for provider in self._providers():
            provider.force_flush()

    def shutdown(self) -> None:
        with self._stop_lock:
            if self.stopped:
                return
            self.stopped = True
        if self.block_maps is not None:
            self.block_maps.stop()
        for provider in self._providers():
            provider.shutdown()

    # -- the engine's stop ------------------------------------------------------------

    def engine_stopped(self, state: KVCacheState | None, requests=None,
                       seconds: float | None = None) -> dict[str, int] | None:
        """vLLM stopped the engine whose pool is `state`: end its open spans; once
        every live pool's engine stopped, `stop()` this runtime within `seconds`
        (VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT unless given). Returns what the stop
        could not deliver, or None when no stop happened (now)."""
        deadline = monotonic() + (self.settings.shutdown_timeout if seconds is None else seconds)
        if state is not None:
            for ref, stories in list(self._ledgers):
                if ref() is state:
                    self._end_stories(state, stories, requests, deadline)
            self._stopped_pools.add(state)
        if any(pool not in self._stopped_pools for pool, _ in self._live_pools()):
            return None  # another engine in this process still runs
        return self.stop(deadline)

    def stop(self, deadline: float | None = None) -> dict[str, int] | None:
        """The last of everything, within VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT: end every
        open span (engine stopped), emit the last block maps, export one final
        metrics point and shut the providers down. What could not be delivered
        by the deadline is counted (returned, kept in `undelivered`) and logged
        once. A second call does nothing and returns None."""
        if deadline is None:
            deadline = monotonic() + self.settings.shutdown_timeout
        with self._stop_lock:
            if self.stopped:
                return None
            self.stopped = True
        began = time_ns()
        for ref, stories in list(self._ledgers):
            if (state := ref()) is not None:
                self._end_stories(state, stories, None, deadline)
        if self.block_maps is not None:
            self.block_maps.stop(deadline - monotonic())
            try:
                self.block_maps.sample()  # the layout at the moment of stop
            except Exception as exc:  # contained like a hook error
                if self._guard is not None:
                    self._guard.failed(exc)
        # each provider flushes and shuts down on its own daemon thread: a dead or
        # slow collector holds none of the others, nor vLLM past the deadline
        workers = [
            threading.Thread(target=self._shutdown_provider, args=(provider, deadline),
                             name="vllm-frag-otel-stop", daemon=True)
            for provider in self._providers()
        ]
        with self.stepping_held():
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(max(0.0, deadline - monotonic()))
        late = sum(worker.is_alive() for worker in workers)
        self.undelivered = self._count_undelivered(began)
        if late or any(self.undelivered.values()):
            logger.warning(
                "vllm-frag-otel: at engine stop, %s could not be delivered within "
                "VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT=%gs (%d exporter(s) still busy); it is lost.",
                ", ".join(f"{n} {what}" for what, n in self.undelivered.items() if n) or "nothing counted",
                self.settings.shutdown_timeout, late,
            )
        else:
            logger.info("vllm-frag-otel: at engine stop, the final KV-cache telemetry was delivered in %.2fs.",
                        (time_ns() - began) / 1e9)
        return self.undelivered

    def _end_stories(self, state: KVCacheState, stories: RequestStories, requests, deadline: float) -> int:
        """End every open story of one pool as stopped with the engine."""
        if not state.lock.acquire(timeout=max(0.0, deadline - monotonic())):
            return 0
        ended = 0
        try:
            requests = requests if requests is not None else getattr(state, "_requests", {})
            for request_id in list(stories.open):
                try:
                    allocated, used = state.request_slots(request_id)
                    request = requests.get(request_id)
                    output_tokens = getattr(request, "num_output_tokens", 0) if request is not None else 0
                    stories.finished(request_id, ENGINE_STOPPED_STATUS, allocated, allocated - used,
                                     output_tokens, failed=False)
                    ended += 1
                except Exception as exc:  # one bad story never keeps the others open
                    stories.open.pop(request_id, None)
                    if self._guard is not None:
                        self._guard.failed(exc)
        finally:
            state.lock.release()
        return ended

    @staticmethod
    def _shutdown_provider(provider, deadline: float) -> None:
        try:
            if isinstance(provider, MeterProvider):
                provider.shutdown(timeout_millis=max(0.0, deadline - monotonic()) * 1e3)
            else:
                provider.shutdown()
        except Exception as exc:  # never reaches vLLM
            logger.debug("vllm-frag-otel: provider shutdown failed", exc_info=exc)

    def _count_undelivered(self, began: int) -> dict[str, int]:
        undelivered = {}
        if self._points_exporter is not None:
            undelivered["final metrics points"] = int(self._points_exporter.delivered_ns < began)
        if self._ended_spans is not None and self._span_delivery is not None:
            undelivered["spans"] = max(0, self._ended_spans.ended - self._span_delivery.delivered)
        if self.block_maps is not None and self._log_delivery is not None:
            undelivered["block maps"] = max(0, self.block_maps.emitted - self._log_delivery.delivered)
        return undelivered


@contextlib.contextmanager
def _sdk_environment(hidden: list[str], defaults: dict[str, str]):
    """While the SDK reads its configuration (once per process): hide unusable
    variables, and supply defaults for variables the user did not set."""
    saved = {name: os.environ.pop(name) for name in hidden if name in os.environ}
    added = [name for name in defaults if name not in os.environ]
    os.environ.update({name: defaults[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
        os.environ.update(saved)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime | None:
    return _runtime if _runtime is not None and _runtime.pid == os.getpid() else None


def install(new_runtime: Runtime | None) -> Runtime | None:
    """Replace this process's runtime (tests); returns the previous one."""
    global _runtime
    with _runtime_lock:
        previous, _runtime = _runtime, new_runtime
    return previous


def attach(state: KVCacheState, engine_attributes: dict[str, Any], guard) -> RequestStories | None:
    """Export `state`, starting this process's telemetry on first use; `guard` is the
    hooks' error guard (its errors and liveness are exported)."""
    global _runtime

    with _runtime_lock:
        if runtime() is None or _runtime.stopped:
            settings = load_settings()
            if _runtime is None or _runtime.pid != os.getpid():
                atexit.register(_stop_at_exit)  # fallback: paths where vLLM's shutdown did not run
            try:
                _runtime = Runtime(settings, engine_attributes, guard)
            except Exception as exc:  # never let telemetry set-up reach vLLM; track without exporting
                logger.warning("vllm-frag-otel: telemetry could not start (%s: %s); nothing is exported.",
                               type(exc).__name__, exc)
                _runtime = Runtime(replace(settings, exporter="none", spans=False), engine_attributes, guard)
        return _runtime.add_pool(state, engine_attributes)


def engine_stopped(state: KVCacheState | None, requests=None, seconds: float | None = None) -> dict[str, int] | None:
    """vLLM stops the engine whose pool is `state`."""
    current = runtime()
    return current.engine_stopped(state, requests, seconds) if current is not None else None


def _stop_at_exit() -> None:
    current = runtime()
    if current is not None:
        try:
            current.stop()
        except Exception as exc:  # never at exit
            logger.debug("vllm-frag-otel: stop at exit failed", exc_info=exc)


def _forget_parent_runtime() -> None:
    """A forked child must not export the parent's pools under the parent's identity."""
    global _runtime
    if _runtime is not None:
        _runtime.forget_pools()
    _runtime = None


os.register_at_fork(after_in_child=_forget_parent_runtime)

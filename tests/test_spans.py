"""One `vllm.kv_cache.request` span per request, checked against what vLLM's
real scheduler did to each request; trace context from `traceparent`;
exemplars on the allocation-duration histogram."""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict

import pytest
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import StatusCode

from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.export import telemetry
from vllm_frag_otel.sim import workloads
from vllm_frag_otel.config import Settings
from vllm_frag_otel.core.stories import RequestStory
from vllm_frag_otel.plugin.hooks import guard

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
SHAPE = sim.EngineShape(num_blocks=110, block_size=16, max_num_seqs=12)
SPAN_KEYS = {
    "gen_ai.request.id", "vllm.request.id", "gen_ai.usage.input_tokens", "vllm.kv_cache.group.count",
    "vllm.kv_cache.prefix_cache.hit_tokens", "gen_ai.usage.cache_read.input_tokens", "vllm.kv_cache.block.peak",
    "vllm.kv_cache.slot.allocated", "vllm.kv_cache.slot.unused", "vllm.request.preemptions",
    "vllm.kv_cache.allocation.failures", "vllm.request.finish_status", "vllm.kv_cache.block.evicted",
    "gen_ai.usage.output_tokens", "vllm.request.arrival_time",
}


class CapturingMetricExporter(MetricExporter):
    def __init__(self, preferred_temporality=None):
        super().__init__(preferred_temporality=preferred_temporality)
        self.exports = []

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs):
        self.exports.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        pass


@pytest.fixture()
def traced(plugin, monkeypatch):
    """A runtime exporting into memory, installed for the schedulers the test builds."""

    def start(**settings):
        spans, metrics = InMemorySpanExporter(), CapturingMetricExporter()
        runtime = telemetry.Runtime(Settings(exporter="none", **settings), {}, guard(), metrics, spans)
        previous = telemetry.install(runtime)
        started.append((runtime, previous))
        return runtime, spans, metrics

    started = []
    yield start
    for runtime, previous in started:
        runtime.shutdown()
        telemetry.install(previous)


def _run(abort: str | None = None):
    """A pressured workload; request 0 carries a traceparent; `abort` is aborted mid-run.

    Returns the requests and, per request, what vLLM itself showed between steps."""
    from vllm.v1.request import RequestStatus

    scheduler = sim.build_scheduler(SHAPE)
    specs = workloads.generate("sharegpt", 36, seed=4, max_len=900)
    requests = sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], SHAPE.block_size)
    requests[0].trace_headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"}
    failures: Counter = Counter()  # failed attempts, and runs of consecutive failures
    failure_runs: Counter = Counter()
    last_failed: dict[str, bool] = {}
    evicted: Counter = Counter()  # cached blocks a request's own allocations took over
    allocate = scheduler.kv_cache_manager.allocate_slots
    pool = scheduler.kv_cache_manager.block_pool
    tables = scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks

    def counting_allocate(request, *args, **kwargs):
        cached = {b.block_id: b.block_hash for b in pool.blocks[1:] if b.ref_cnt == 0 and b.block_hash is not None}
        result = allocate(request, *args, **kwargs)
        # a prefix hit keeps its hash; a recycled block lost it (or got a new one)
        evicted[request.request_id] += sum(
            1 for b in tables.get(request.request_id, ()) if b.block_id in cached and b.block_hash != cached[b.block_id])
        failed = result is None
        failures[request.request_id] += failed
        failure_runs[request.request_id] += failed and not last_failed.get(request.request_id, False)
        last_failed[request.request_id] = failed
        return result

    scheduler.kv_cache_manager.allocate_slots = counting_allocate
    seen = defaultdict(dict)  # request id -> peak blocks, last slots, first-admission hits
    for request in requests:
        scheduler.add_request(request)
    rng = random.Random(0)
    step = 0
    while scheduler.has_requests():
        out = scheduler.schedule()
        manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        for request_id, table in manager.req_to_blocks.items():
            request = scheduler.requests[request_id]
            held = [b for b in table if not b.is_null]
            view = seen[request_id]
            view["peak"] = max(view.get("peak", 0), len(held))
            used = sum(min(16, max(0, request.num_computed_tokens - i * 16)) for i in range(len(table)))
            view["slots"] = (16 * len(held), 16 * len(held) - used)
        for new in out.scheduled_new_reqs:
            stats = scheduler.requests[new.req_id].prefill_stats
            if stats is not None and "hits" not in seen[new.req_id]:
                seen[new.req_id]["hits"] = stats.num_local_cached_tokens
        scheduler.update_from_output(out, sim.fake_model_output(out, scheduler, rng))
        step += 1
        if step == 150 and abort is not None:
            scheduler.finish_requests(abort, RequestStatus.FINISHED_ABORTED)
    return requests, seen, (failures, failure_runs), evicted


def test_one_span_per_request_tells_its_kv_story(traced):
    runtime, exporter, _ = traced()
    requests, seen, (failures, failure_runs), evicted = _run(abort="req-5")
    runtime.force_flush()
    spans = {s.attributes["vllm.request.id"]: s for s in exporter.get_finished_spans()}
    assert set(spans) == {r.request_id for r in requests}
    assert sum(r.num_preemptions for r in requests) > 0 and sum(failures.values()) > 0
    for request in requests:
        span = spans[request.request_id]
        attrs = span.attributes
        assert span.name == "vllm.kv_cache.request"
        assert set(attrs) == SPAN_KEYS  # nothing else: no prompt text, no token ids
        assert attrs["gen_ai.request.id"] == request.request_id  # no random suffix in these ids
        assert attrs["gen_ai.usage.input_tokens"] == request.num_prompt_tokens
        assert attrs["vllm.request.arrival_time"] == request.arrival_time  # vLLM's own stamp, not the first lookup
        assert attrs["vllm.request.arrival_time"] * 1e9 <= span.start_time
        assert attrs["vllm.request.preemptions"] == request.num_preemptions
        events = Counter(e.name for e in span.events)
        assert events["preempted"] == request.num_preemptions
        if request.request_id == "req-5":  # aborted: perhaps while preempted, never resumed
            assert events["resumed"] in (request.num_preemptions, request.num_preemptions - 1)
        else:
            assert events["resumed"] == request.num_preemptions
        assert attrs["vllm.kv_cache.allocation.failures"] == failures[request.request_id]
        assert attrs["vllm.kv_cache.block.evicted"] == evicted[request.request_id]
        assert attrs["gen_ai.usage.output_tokens"] == request.num_output_tokens
        assert events["allocation_failed"] == failure_runs[request.request_id]
        view = seen[request.request_id]
        hits = attrs["vllm.kv_cache.prefix_cache.hit_tokens"], attrs["gen_ai.usage.cache_read.input_tokens"]
        assert hits == (view["hits"], view["hits"])
        assert attrs["vllm.kv_cache.block.peak"] == view["peak"]
        assert (attrs["vllm.kv_cache.slot.allocated"], attrs["vllm.kv_cache.slot.unused"]) == view["slots"]
        assert span.end_time >= span.start_time
    assert any(spans[r.request_id].attributes["gen_ai.usage.cache_read.input_tokens"] > 0 for r in requests)
    assert sum(evicted.values()) > 0
    finished = [r for r in requests if r.request_id != "req-5"]
    assert all(spans[r.request_id].attributes["gen_ai.usage.output_tokens"] == r.max_tokens for r in finished)
    aborted = spans["req-5"]
    assert aborted.attributes["vllm.request.finish_status"] == "finished_aborted"
    assert aborted.status.status_code is StatusCode.ERROR
    assert spans["req-6"].attributes["vllm.request.finish_status"] == "finished_length_capped"
    assert spans["req-6"].status.status_code is StatusCode.UNSET


def test_traceparent_makes_the_span_a_child_in_the_callers_trace(traced):
    runtime, exporter, _ = traced()
    _run()
    runtime.force_flush()
    spans = {s.attributes["vllm.request.id"]: s for s in exporter.get_finished_spans()}
    child = spans["req-0"]
    assert format(child.context.trace_id, "032x") == TRACE_ID
    assert format(child.parent.span_id, "016x") == PARENT_SPAN_ID and child.parent.is_remote
    others = [s for rid, s in spans.items() if rid != "req-0"]
    assert all(s.parent is None for s in others)  # root spans, each its own trace
    assert len({s.context.trace_id for s in others}) == len(others)


def test_allocation_histogram_carries_exemplars_of_request_spans(traced):
    runtime, exporter, metrics = traced()
    _run()
    runtime.force_flush()
    span_ids = {(s.context.trace_id, s.context.span_id) for s in exporter.get_finished_spans()}
    exemplars = [
        e
        for data in metrics.exports
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "vllm.kv_cache.allocation.duration"
        for point in m.data.data_points
        for e in point.exemplars
    ]
    assert exemplars
    assert all((e.trace_id, e.span_id) in span_ids for e in exemplars)
    assert len({e.span_id for e in exemplars}) > 1


def _watch(runtime, monkeypatch) -> dict[str, dict]:
    """Per request id: the exemplar its story got, when its story opened (the clock
    before and after) and when its closing began."""
    seen: dict[str, dict] = defaultdict(dict)
    sink = runtime.spans
    opened, closed = sink.opened, sink.closed

    def watched_opened(story, trace_headers):
        before = time.time_ns()
        opened(story, trace_headers)
        seen[story.request_id].update(exemplar=story.exemplar, opened=(before, time.time_ns()))

    def watched_closed(story, failed):
        seen[story.request_id]["closing"] = time.time_ns()
        closed(story, failed)

    monkeypatch.setattr(sink, "opened", watched_opened)
    monkeypatch.setattr(sink, "closed", watched_closed)
    return seen


def test_each_requests_exemplar_is_its_exported_span(traced, monkeypatch):
    runtime, exporter, metrics = traced()
    seen = _watch(runtime, monkeypatch)
    requests, *_ = _run()
    runtime.force_flush()
    spans = {s.attributes["vllm.request.id"]: s for s in exporter.get_finished_spans()}
    assert set(spans) == set(seen) == {r.request_id for r in requests}
    for request_id, span in spans.items():
        exemplar = seen[request_id]["exemplar"]  # set when the request opened, long before its span exists
        assert (exemplar.trace_id, exemplar.span_id) == (span.context.trace_id, span.context.span_id), request_id
        assert exemplar.trace_flags.sampled and span.context.trace_flags.sampled
    assert format(seen["req-0"]["exemplar"].trace_id, "032x") == TRACE_ID  # the caller's trace
    histogram_exemplars = {
        (e.trace_id, e.span_id) for d in metrics.exports for rm in d.resource_metrics for sm in rm.scope_metrics
        for m in sm.metrics if m.name == "vllm.kv_cache.allocation.duration" for p in m.data.data_points
        for e in p.exemplars
    }
    assert histogram_exemplars and histogram_exemplars <= {(s.context.trace_id, s.context.span_id)
                                                           for s in spans.values()}


def test_span_times_are_when_things_happened_not_when_the_span_was_built(traced, monkeypatch):
    runtime, exporter, _ = traced()
    seen = _watch(runtime, monkeypatch)
    _run()
    runtime.force_flush()
    preempted = 0
    for span in exporter.get_finished_spans():
        times = seen[span.attributes["vllm.request.id"]]
        assert times["opened"][0] <= span.start_time <= times["opened"][1]
        assert span.end_time >= times["closing"]
        for event in span.events:
            assert span.start_time < event.timestamp < times["closing"], event.name
            preempted += event.name == "preempted"
    assert preempted > 0


class _Flipping(Sampler):
    """Samples every other call."""

    def __init__(self):
        self.calls = 0

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):
        self.calls += 1
        return SamplingResult(Decision.RECORD_AND_SAMPLE if self.calls % 2 == 0 else Decision.DROP, attributes)

    def get_description(self) -> str:
        return "flipping"


def _sink(sampler=None) -> tuple[telemetry.KVCacheSpans, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    return telemetry.KVCacheSpans(provider, processor), exporter


@pytest.mark.parametrize("flags", ["01", "00"])
def test_the_callers_sampling_decision_is_taken_when_the_request_opens(flags):
    sink, exporter = _sink()
    story = RequestStory("req-1", prompt_tokens=32, num_groups=1)
    sink.opened(story, {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-{flags}"})
    sink.event(story, "preempted", {"vllm.kv_cache.block.released": 2})
    sink.closed(story, failed=False)
    spans = exporter.get_finished_spans()
    if flags == "00":  # the caller did not sample its trace: no exemplar, no span
        assert story.exemplar is None and spans == ()
        return
    (span,) = spans
    assert (story.exemplar.trace_id, story.exemplar.span_id) == (span.context.trace_id, span.context.span_id)
    assert format(span.context.trace_id, "032x") == TRACE_ID and [e.name for e in span.events] == ["preempted"]


def test_the_sampler_decides_once_when_the_request_opens_so_every_exemplar_names_an_exported_span():
    sampler = _Flipping()
    sink, exporter = _sink(sampler)
    dropped, sampled = (RequestStory(f"req-{i}", prompt_tokens=32, num_groups=1) for i in range(2))
    sink.opened(dropped, None)  # the sampler drops it: no exemplar, and no span later
    sink.opened(sampled, None)
    for story in (dropped, sampled):
        sink.event(story, "preempted", {"vllm.kv_cache.block.released": 2})
        sink.closed(story, failed=False)  # the flipping sampler is not asked again
    assert dropped.exemplar is None and sampled.exemplar is not None and sampler.calls == 2
    (span,) = exporter.get_finished_spans()
    assert (span.context.trace_id, span.context.span_id) == (sampled.exemplar.trace_id, sampled.exemplar.span_id)


def _through_the_sdks_tracer(provider: TracerProvider, record, failed: bool, description: str):
    """The span as the SDK's own tracer builds it from the same record."""
    from opentelemetry.trace import NonRecordingSpan, SpanKind, Status, set_span_in_context

    class _Preset(provider.id_generator.__class__):
        def generate_span_id(self):
            return record.context.span_id

        def generate_trace_id(self):
            return record.context.trace_id

    provider.id_generator = _Preset()
    tracer = provider.get_tracer(telemetry.SCOPE, telemetry.__version__)
    parent = set_span_in_context(NonRecordingSpan(record.parent)) if record.parent is not None else None
    span = tracer.start_span(telemetry.SPAN_NAME, context=parent, kind=SpanKind.INTERNAL,
                             attributes=record.attributes, start_time=record.start_ns)
    for name, attributes, at in record.events:
        span.add_event(name, attributes, timestamp=at)
    if failed:
        span.set_status(Status(StatusCode.ERROR, description))
    span.end()


@pytest.mark.parametrize("limits", [{}, {"OTEL_SPAN_EVENT_COUNT_LIMIT": "2", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "5",
                                         "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "3"}])
@pytest.mark.parametrize("traceparent", [None, f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"])
@pytest.mark.parametrize("failed", [False, True])
def test_a_span_is_exported_exactly_as_the_sdks_tracer_would_export_it(monkeypatch, limits, traceparent, failed):
    """The span is built without a live SDK span (cheaper on vLLM's scheduler
    thread): its OTLP encoding must equal the tracer's, field by field, for any
    SDK installed, with the span limits of the environment."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    for name, value in limits.items():
        monkeypatch.setenv(name, value)
    sink, ours = _sink()
    story = RequestStory("req-1-abcdefgh", prompt_tokens=32, num_groups=2, arrival_time=1765170000.25)
    sink.opened(story, {"traceparent": traceparent} if traceparent else None)
    for i in range(3):
        sink.event(story, "preempted", {"vllm.kv_cache.block.released": i, "why": "the pool is full"})
    story.hit_tokens, story.peak_blocks, story.finish_status = 16, 7, "finished_aborted" if failed else "finished_stopped"
    record = story.handle
    sink.closed(story, failed=failed)
    sdk = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(sdk))
    _through_the_sdks_tracer(provider, record, failed, story.finish_status)
    (mine,), (theirs,) = ours.get_finished_spans(), sdk.get_finished_spans()
    assert mine.end_time >= mine.start_time
    assert (mine.context, mine.parent) == (theirs.context, theirs.parent)  # trace flags are not in OTLP
    encoded = [encode_spans([span]) for span in (mine, theirs)]
    for request in encoded:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    span.end_time_unix_nano = 0  # when each was ended
    assert encoded[0] == encoded[1]
    assert len(mine.events) == (2 if limits else 3) and len(mine.attributes) == (5 if limits else len(SPAN_KEYS))


def test_sampler_and_switch_are_honoured(traced, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    runtime, exporter, metrics = traced()
    _run()
    runtime.force_flush()
    assert exporter.get_finished_spans() == ()
    points = [p for d in metrics.exports for rm in d.resource_metrics for sm in rm.scope_metrics
              for m in sm.metrics if m.name == "vllm.kv_cache.allocation.duration" for p in m.data.data_points]
    assert points and not any(p.exemplars for p in points)  # not sampled: no exemplar
    monkeypatch.delenv("OTEL_TRACES_SAMPLER")
    runtime, exporter, _ = traced(spans=False)
    assert runtime.tracer_provider is None
    _run()
    assert exporter.get_finished_spans() == ()


def test_open_spans_are_bounded_and_the_rest_counted(traced):
    runtime, exporter, metrics = traced(max_open_spans=3)
    requests, *_ = _run()
    runtime.force_flush()
    traced_ids = {s.attributes["vllm.request.id"] for s in exporter.get_finished_spans()}
    assert 3 <= len(traced_ids) < len(requests)
    untraced = [
        p.value for d in metrics.exports for rm in d.resource_metrics for sm in rm.scope_metrics
        for m in sm.metrics if m.name == "vllm.frag_otel.requests.untraced" for p in m.data.data_points
    ]
    assert untraced and max(untraced) == len(requests) - len(traced_ids)  # requests, not lookups


# a pool too small for the batch (preemptions) and a small token budget per step: a
# re-admitted request recomputes its prompt a chunk at a time, so for several steps it
# holds fewer blocks than it held when it was preempted
PREEMPTING = sim.EngineShape(num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=96)


def _held(scheduler, request_id: str) -> int:
    """Blocks in the request's tables now, every group, null entries left out: vLLM's own tables."""
    return sum(sum(1 for b in m.req_to_blocks.get(request_id, ()) if not b.is_null)
               for m in scheduler.kv_cache_manager.coordinator.single_type_managers)


def _preempting_run(stop: bool):
    """vLLM's real scheduler, preempting. Per request: the blocks it held just before each
    preemption (read from vLLM's tables before vLLM frees them, by wrapping this scheduler's
    `_preempt_request`, which calls through the plugin's hook), and the most it held at once
    (between steps, and at each preemption: on full attention tables only grow in between).
    `stop`: stop the engine (vLLM's `Scheduler.shutdown`) at the first step boundary where a
    resumed request holds fewer blocks than its peak, while it runs."""
    scheduler = sim.build_scheduler(PREEMPTING)
    specs = workloads.generate("sharegpt", 30, seed=6, max_len=700)
    requests = sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], PREEMPTING.block_size)
    released: dict[str, list[int]] = defaultdict(list)
    peak: Counter = Counter()
    preempt = scheduler._preempt_request

    def recounting_preempt(request, *args, **kwargs):
        held = _held(scheduler, request.request_id)  # before vLLM frees them
        released[request.request_id].append(held)
        peak[request.request_id] = max(peak[request.request_id], held)
        return preempt(request, *args, **kwargs)

    scheduler._preempt_request = recounting_preempt
    for request in requests:
        scheduler.add_request(request)
    rng = random.Random(6)
    below_peak = []
    while scheduler.has_requests():
        sim.step(scheduler, rng)
        for request in scheduler.running:
            peak[request.request_id] = max(peak[request.request_id], _held(scheduler, request.request_id))
        below_peak = [r.request_id for r in scheduler.running if r.num_preemptions
                      and _held(scheduler, r.request_id) < peak[r.request_id]]
        if stop and below_peak:
            scheduler.shutdown()
            break
    return requests, released, peak, below_peak


def test_a_preempted_events_released_blocks_are_what_the_request_held_before_preemption(traced):
    """Each "preempted" event says how many blocks the request gave back: read before vLLM
    frees them (after, the request holds none and every event would say 0). Compared, event
    by event, with vLLM's own block tables read just before each preemption."""
    runtime, exporter, _ = traced()
    requests, released, _, _ = _preempting_run(stop=False)
    runtime.force_flush()
    spans = {s.attributes["vllm.request.id"]: s for s in exporter.get_finished_spans()}
    assert set(spans) == {r.request_id for r in requests}
    assert sum(len(v) for v in released.values()) >= 5 and all(n > 0 for v in released.values() for n in v)
    for request in requests:
        events = [e.attributes["vllm.kv_cache.block.released"] for e in spans[request.request_id].events
                  if e.name == "preempted"]
        assert events == released.get(request.request_id, []), request.request_id


def test_the_spans_block_peak_is_the_most_held_at_once_also_on_full_attention(traced):
    """On full attention a request's table only grows while it runs, but a preemption empties
    it and the re-admitted request recomputes its prompt a chunk per step: stopped in between,
    it holds fewer blocks than at its peak. `vllm.kv_cache.block.peak` is the most it held at
    once (vLLM's tables, recounted between steps and before each preemption), not the latest
    count; for every request, those that finished and those the engine stop ended."""
    runtime, exporter, _ = traced()
    requests, _, peak, below_peak = _preempting_run(stop=True)
    assert below_peak, "the run must stop while a resumed request is below its peak"
    spans = {s.attributes["vllm.request.id"]: s for s in exporter.get_finished_spans()}
    stopped = {rid for rid, s in spans.items() if s.attributes["vllm.request.finish_status"] == "engine_stopped"}
    assert set(below_peak) <= stopped and len(spans) > len(stopped)  # ended by the stop, and finished ones
    for request_id, span in spans.items():
        assert span.attributes["vllm.kv_cache.block.peak"] == peak[request_id], request_id

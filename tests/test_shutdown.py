"""Nothing lost when vLLM stops: the real `Scheduler.shutdown` (EngineCore.shutdown
calls it on every graceful stop) exports the last metrics point, ends every
open span as stopped with the engine, and shuts the providers down, within
VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT even when the collector never answers."""

from __future__ import annotations

import json
import logging
import random
import time

import pytest
from helpers import run_python
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from test_reliability import BlackHole
from test_spans import CapturingMetricExporter

from vllm_frag_otel import analyzer_for
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.export import telemetry
from vllm_frag_otel.sim import workloads
from vllm_frag_otel.config import Settings
from vllm_frag_otel.plugin.hooks import guard

SHAPE = sim.EngineShape(num_blocks=120, block_size=16, max_num_seqs=16)


def _mid_run(steps: int = 40):
    """A real scheduler with requests still running after `steps` steps."""
    scheduler = sim.build_scheduler(SHAPE)
    specs = workloads.generate("sharegpt", 40, seed=11, max_len=900)
    for request in sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], SHAPE.block_size):
        scheduler.add_request(request)
    rng = random.Random(11)
    for _ in range(steps):
        sim.step(scheduler, rng)
    assert scheduler.running, "the run must still be going when the engine stops"
    return scheduler


def _points(metrics_data) -> dict[tuple, float]:
    """(metric name, sorted attributes) -> value of one export's sum and gauge points."""
    points = {}
    for rm in metrics_data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    if hasattr(p, "value"):
                        points[(metric.name, tuple(sorted(p.attributes.items())))] = p.value
    return points


def _value(points: dict[tuple, float], name: str, **attributes) -> float:
    """Sum over the points of `name` carrying `attributes` (other attributes summed over)."""
    matching = [v for (n, attrs), v in points.items() if n == name
                and all(dict(attrs).get(k) == v for k, v in attributes.items())]
    assert matching, (name, attributes)
    return sum(matching)


def _assert_final_counters(value, snap) -> None:
    assert value("vllm.kv_cache.preemptions") == snap.preemptions > 0
    assert value("vllm.kv_cache.allocation.attempts") == snap.allocation_attempts
    assert value("vllm.kv_cache.allocation.attempts", **{"vllm.kv_cache.allocation.outcome": "failure"}) \
        == snap.allocation_failures
    assert value("vllm.kv_cache.block.evictions") == snap.evictions
    assert value("vllm.kv_cache.block.allocations", **{"vllm.kv_cache.block.source": "fresh"}) \
        == snap.blocks_allocated_fresh
    assert value("vllm.kv_cache.block.allocations", **{"vllm.kv_cache.block.source": "recycled"}) \
        == snap.blocks_allocated_recycled
    # gauges at the moment of stop
    assert value("vllm.kv_cache.block.count", **{"vllm.kv_cache.block.state": "used"}) == snap.used_blocks > 0
    assert value("vllm.kv_cache.block.count", **{"vllm.kv_cache.block.state": "cached"}) == snap.cached_blocks
    assert value("vllm.kv_cache.request.count") == snap.tracked_requests > 0


@pytest.fixture()
def installed(plugin, monkeypatch):
    """Install a runtime (no periodic export before the stop) for the schedulers the test builds."""
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    started = []

    def start(settings: Settings, metric_exporter, span_exporter):
        runtime = telemetry.Runtime(settings, {}, guard(), metric_exporter, span_exporter)
        started.append((runtime, telemetry.install(runtime)))
        return runtime

    yield start
    for runtime, previous in started:
        runtime.shutdown()
        telemetry.install(previous)


def test_scheduler_shutdown_exports_the_final_point_and_ends_open_spans(installed):
    metrics, spans = CapturingMetricExporter(), InMemorySpanExporter()
    runtime = installed(Settings(exporter="none"), metrics, spans)
    scheduler = _mid_run()
    stories = scheduler.kv_cache_manager.__dict__["_vllm_frag_otel"].stories
    still_open = set(stories.open)
    assert still_open
    assert not metrics.exports  # a run shorter than one export interval
    snap = analyzer_for(scheduler).snapshot()

    scheduler.shutdown()  # vLLM's own method, as EngineCore.shutdown calls it

    assert len(metrics.exports) == 1  # exactly one final point
    points = _points(metrics.exports[-1])
    _assert_final_counters(lambda name, **a: _value(points, name, **a), snap)
    finished = spans.get_finished_spans()
    ended = {s.attributes["vllm.request.id"]: s for s in finished if "vllm.kv_cache.engine_stopped" in s.attributes}
    assert set(ended) == still_open and not stories.open
    for span in ended.values():
        assert span.attributes["vllm.kv_cache.engine_stopped"] is True
        assert span.attributes["vllm.request.finish_status"] == "engine_stopped"
        assert span.status.status_code is StatusCode.UNSET
    # requests that finished before the stop say nothing about the engine: every span, once
    others = [s.attributes["vllm.request.id"] for s in finished if s.attributes["vllm.request.id"] not in ended]
    assert len(set(others)) == len(others) and not set(others) & still_open
    assert all(s.attributes["vllm.request.finish_status"] != "engine_stopped" for s in finished
               if s.attributes["vllm.request.id"] in others)
    assert runtime.stopped and runtime.undelivered == {"final metrics points": 0, "spans": 0}
    assert runtime.meter_provider._shutdown and spans._stopped  # noqa: SLF001 - providers shut down
    # a second stop is a no-op
    scheduler.shutdown()
    assert len(metrics.exports) == 1 and len(spans.get_finished_spans()) == len(finished)


def test_a_request_the_stop_ends_reports_its_slots_as_vllm_holds_them(installed):
    """A request still running when the engine stops ends its span with the slots it holds at
    that moment: allocated = block size x the blocks in its tables, unused = allocated minus
    the slots its computed tokens fill. Recounted here from vLLM's own block tables and each
    request's num_computed_tokens just before the stop (swapping used for unused would show
    204 unused of 208 where 4 are)."""
    spans = InMemorySpanExporter()
    installed(Settings(exporter="none"), CapturingMetricExporter(), spans)
    scheduler = _mid_run()
    size = SHAPE.block_size
    (manager,) = scheduler.kv_cache_manager.coordinator.single_type_managers
    expected = {}
    for request_id, request in scheduler.requests.items():
        table = manager.req_to_blocks.get(request_id, [])
        held = [i for i, b in enumerate(table) if not b.is_null]
        used = sum(min(size, max(0, request.num_computed_tokens - i * size)) for i in held)
        expected[request_id] = (size * len(held), size * len(held) - used)

    scheduler.shutdown()

    ended = {s.attributes["vllm.request.id"]: s.attributes for s in spans.get_finished_spans()
             if s.attributes["vllm.request.finish_status"] == "engine_stopped"}
    assert ended and set(ended) <= set(expected)
    for request_id, attributes in ended.items():
        shown = attributes["vllm.kv_cache.slot.allocated"], attributes["vllm.kv_cache.slot.unused"]
        assert shown == expected[request_id], request_id
    # not vacuous: requests holding blocks, mostly filled (unused far from used)
    holding = [rid for rid in ended if expected[rid][0]]
    assert len(holding) >= 3
    assert any(expected[rid][1] < expected[rid][0] - expected[rid][1] for rid in holding)


FILE_RUN = """
import json, os, random
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm_frag_otel import analyzer_for
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.sim import workloads
shape = sim.EngineShape(num_blocks=120, block_size=16, max_num_seqs=16)
scheduler = sim.build_scheduler(shape)
specs = workloads.generate("sharegpt", 40, seed=11, max_len=900)
for r in sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], shape.block_size):
    scheduler.add_request(r)
rng = random.Random(11)
for _ in range(40):
    sim.step(scheduler, rng)
snap = analyzer_for(scheduler).snapshot()
print("SNAPSHOT " + json.dumps({k: getattr(snap, k) for k in snap.numeric_fields()}), flush=True)
print("OPEN " + str(len(scheduler.kv_cache_manager.__dict__["_vllm_frag_otel"].stories.open)), flush=True)
scheduler.shutdown()
os._exit(0)  # as a multiprocessing child exits: no atexit handler runs
"""


def test_default_file_exporter_holds_the_final_point_after_a_short_run(tmp_path):
    proc = run_python(FILE_RUN, env={
        "VLLM_FRAG_OTEL_EXPORTER": "file", "VLLM_FRAG_OTEL_FILE_DIR": str(tmp_path),
        "OTEL_METRIC_EXPORT_INTERVAL": "600000", "OTEL_BSP_SCHEDULE_DELAY": "600000",
    })
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("SNAPSHOT", "OPEN")))
    final = json.loads(lines["SNAPSHOT"])
    files = list(tmp_path.glob("metrics-*.jsonl"))
    assert files, list(tmp_path.iterdir())
    exports = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    assert len(exports) == 1  # only the final point: the run was shorter than one interval
    points = {}
    for rm in exports[0]["resourceMetrics"]:
        for sm in rm["scopeMetrics"]:
            for metric in sm["metrics"]:
                data = metric.get("sum") or metric.get("gauge")
                for p in (data or {}).get("dataPoints", []):
                    attrs = tuple(sorted((a["key"], next(iter(a["value"].values()))) for a in p.get("attributes", [])))
                    points[(metric["name"], attrs)] = float(p.get("asInt", p.get("asDouble", 0)))

    class Snap:
        pass

    snap = Snap()
    snap.__dict__.update(final)
    _assert_final_counters(lambda name, **a: _value(points, name, **a), snap)
    stopped = [
        span for path in tmp_path.glob("traces-*.jsonl") for line in path.read_text().splitlines()
        for rs in json.loads(line)["resourceSpans"] for ss in rs["scopeSpans"] for span in ss["spans"]
        if any(a["key"] == "vllm.kv_cache.engine_stopped" for a in span["attributes"])
    ]
    assert len(stopped) == int(lines["OPEN"]) > 0


def test_a_black_holed_collector_holds_the_stop_no_longer_than_the_deadline(installed, caplog):
    hole = BlackHole()
    try:
        endpoint = f"http://127.0.0.1:{hole.port}"
        runtime = installed(
            Settings(exporter="none", shutdown_timeout=1.0),
            GrpcMetricExporter(endpoint=endpoint, insecure=True, timeout=30),
            GrpcSpanExporter(endpoint=endpoint, insecure=True, timeout=30),
        )
        scheduler = _mid_run(20)
        with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
            start = time.perf_counter()
            scheduler.shutdown()
            elapsed = time.perf_counter() - start
            scheduler.shutdown()
        assert elapsed < 1.0 + 0.5, elapsed
        assert runtime.undelivered["final metrics points"] == 1
        assert runtime.undelivered["spans"] > 0
        warnings = [r for r in caplog.records if "could not be delivered" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT=1s" in warnings[0].getMessage()
    finally:
        hole.close()

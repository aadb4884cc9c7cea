"""Nothing lost when vLLM stops: the real `Scheduler.shutdown` (EngineCore.shutdown
calls it on every graceful stop) exports the last metrics point, ends every
open span as stopped with the engine, and shuts the providers down, within
VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT even when the collector never answers."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from types import SimpleNamespace

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
    assert value("vllm.kv_cache.blocks", **{"vllm.kv_cache.block.state": "used"}) == snap.used_blocks > 0
    assert value("vllm.kv_cache.blocks", **{"vllm.kv_cache.block.state": "cached"}) == snap.cached_blocks
    assert value("vllm.kv_cache.requests") == snap.tracked_requests > 0


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


# -- vLLM's default stop (abort mode): the stop hooks of plugin/stop.py --------------------------

def test_engine_core_shutdown_flushes_before_vllm_tears_down(installed, monkeypatch):
    """vLLM's own EngineCore.shutdown, on the parts it tears down: the final point and every
    open span are out before the workers' exit begins (in abort mode the front end kills the
    process during that exit), and the Scheduler.shutdown later in the teardown adds nothing."""
    from vllm.v1.engine import core
    from vllm.v1.engine.core import EngineCore

    monkeypatch.setattr(core, "cleanup_dist_env_and_memory", lambda: None)  # a device's; there is none here

    metrics, spans = CapturingMetricExporter(), InMemorySpanExporter()
    installed(Settings(exporter="none"), metrics, spans)
    scheduler = _mid_run()
    still_open = set(scheduler.kv_cache_manager.__dict__["_vllm_frag_otel"].stories.open)
    snap = analyzer_for(scheduler).snapshot()
    at_workers_exit = {}

    class Executor:
        def shutdown(self):
            at_workers_exit["exports"] = len(metrics.exports)
            at_workers_exit["spans"] = len(spans.get_finished_spans())

    engine_core = SimpleNamespace(scheduler=scheduler, model_executor=Executor(),
                                  structured_output_manager=SimpleNamespace(clear_backend=lambda: None),
                                  vllm_config=SimpleNamespace(shutdown_timeout=0))
    EngineCore.shutdown(engine_core)

    assert at_workers_exit == {"exports": 1, "spans": len(spans.get_finished_spans())}
    assert len(metrics.exports) == 1
    points = _points(metrics.exports[-1])
    _assert_final_counters(lambda name, **a: _value(points, name, **a), snap)
    ended = {s.attributes["vllm.request.id"] for s in spans.get_finished_spans()
             if "vllm.kv_cache.engine_stopped" in s.attributes}
    assert ended == still_open


def test_the_flush_budget_ends_before_the_front_end_s_kill():
    from vllm_frag_otel.plugin.stop import ABORT_RESERVE_S, flush_seconds

    assert flush_seconds(0, 3.0) == 3.0 - ABORT_RESERVE_S  # abort mode: the front end kills at 3 s
    assert flush_seconds(None, 3.0) == 3.0 - ABORT_RESERVE_S  # vLLM's window unknown
    assert flush_seconds(15, 3.0) is None  # drain mode's window holds the whole timeout
    assert flush_seconds(0, 0.4) == pytest.approx(0.2)
    assert flush_seconds(0, 0.0) == 0.0
    # vLLM's stop path took 1 s from the first signal (a process-group SIGINT) to the flush
    assert flush_seconds(0, 3.0, since_signal=1.0) == 2.0 - ABORT_RESERVE_S
    assert flush_seconds(0, 3.0, since_signal=5.0) == 0.0


def test_an_engine_core_notes_its_first_stop_signal_and_vllm_s_handler_still_runs():
    proc = run_python(
        "import multiprocessing, os, signal\n"
        "from vllm_frag_otel.plugin import stop\n"
        "seen = []\n"
        "signal.signal(signal.SIGTERM, lambda n, f: seen.append(n))  # vLLM's handler\n"
        "stop.note_stop_signals()  # not an engine core: nothing changes\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print(len(stop._first_stop_signal), seen)\n"
        "multiprocessing.current_process().name = 'EngineCore_DP0'\n"
        "stop.note_stop_signals()\n"
        "stop.note_stop_signals()  # once\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print(len(stop._first_stop_signal), seen)\n",
        timeout=120,
    )
    assert proc.stdout.splitlines() == ["0 [15]", "1 [15, 15, 15]"], proc.stdout + proc.stderr


def _slow_to_stop(ready, marker: str) -> None:
    """An engine core stand-in: on SIGTERM it takes a second to flush, then exits."""
    def on_sigterm(signum, frame):
        time.sleep(1.0)
        with open(marker, "w") as out:
            out.write("flushed")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    ready.set()
    while True:
        time.sleep(0.05)


@pytest.mark.parametrize("plugin_timeout, flushed", [("3", True), ("0", False)])
def test_the_front_end_gives_the_engine_core_the_flush_s_time_before_its_kill(
        plugin, tmp_path, monkeypatch, plugin_timeout, flushed):
    """vLLM's own CoreEngineProcManager.shutdown with vLLM's default timeout 0 (abort mode):
    SIGTERM, then SIGKILL at once, unless the plugin gives VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT
    (0: no delay, the process is killed)."""
    import multiprocessing

    from vllm.v1.engine.utils import CoreEngineProcManager

    monkeypatch.setenv("VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT", plugin_timeout)
    context = multiprocessing.get_context("fork")
    ready, marker = context.Event(), tmp_path / "flushed"
    process = context.Process(target=_slow_to_stop, args=(ready, str(marker)), name="EngineCore_DP0")
    process.start()
    assert ready.wait(30)

    class Finalizer:  # what weakref.finalize.detach() returns before the first shutdown
        def detach(self):
            return True

    manager = SimpleNamespace(manager_stopped=threading.Event(), _finalizer=Finalizer(),
                              _request_shutdown_timeout=0, processes=[process])
    CoreEngineProcManager.shutdown(manager, timeout=0)
    process.join(10)
    if flushed:
        assert process.exitcode == 0 and marker.read_text() == "flushed"
    else:
        assert process.exitcode == -signal.SIGKILL and not marker.exists()


def test_a_sigterm_during_the_flush_waits_for_its_end():
    """A process-group SIGINT reaches the engine core first; the front end's SIGTERM follows
    while the engine core flushes, after vLLM restored SIGTERM's default action."""
    proc = run_python(
        "import os, signal, sys\n"
        "from vllm_frag_otel.plugin.stop import sigterm_deferred\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "with sigterm_deferred():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('flushed', flush=True)\n"
        "print('not reached', flush=True)\n",
        timeout=120,
    )
    assert proc.stdout == "flushed\n", proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGTERM  # then the SIGTERM's default action, as vLLM wanted

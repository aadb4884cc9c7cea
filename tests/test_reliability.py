"""Faults never hurt vLLM and lose nothing silently: collectors that refuse,
black-hole or restart; several engines in one process; fork and spawn."""

from __future__ import annotations

import json
import multiprocessing
import os
import logging
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from helpers import closed_port
from otlp_receiver import RotelReceiver

from vllm_frag_otel import analyzer_for
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.export import telemetry
from vllm_frag_otel.sim import workloads
from vllm_frag_otel.config import Settings
from vllm_frag_otel.plugin.hooks import guard

SHAPE = sim.EngineShape(num_blocks=120, block_size=16, max_num_seqs=16)


class BlackHole:
    """A TCP server that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture()
def runtime_for(plugin, monkeypatch):
    """Install a runtime exporting over OTLP gRPC to `endpoint` every 100 ms."""
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    started = []

    def start(endpoint: str, timeout_s: float = 1.0, metric_exporter=None):
        runtime = telemetry.Runtime(
            Settings(exporter="none"), {}, guard(),
            metric_exporter or GrpcMetricExporter(endpoint=endpoint, insecure=True, timeout=timeout_s),
            GrpcSpanExporter(endpoint=endpoint, insecure=True, timeout=timeout_s),
        )
        started.append((runtime, telemetry.install(runtime)))
        return runtime

    yield start
    for runtime, previous in started:
        runtime.shutdown()
        telemetry.install(previous)


def _step_times(until, seed: int = 3, limit_s: float = 30.0) -> list[float]:
    """Wall time of each scheduler step (schedule + update) on a pressured workload, at
    least 250 steps and until `until()` holds (new requests arrive whenever it drains)."""
    scheduler = sim.build_scheduler(SHAPE)
    rng = random.Random(seed)
    times: list[float] = []
    deadline = time.monotonic() + limit_s
    while len(times) < 250 or not until():
        if time.monotonic() > deadline:
            break
        if not scheduler.has_requests():
            specs = workloads.generate("sharegpt", 60, seed=seed + len(times), max_len=900)
            batch = [(s.prompt_tokens, s.output_len) for s in specs]
            for request in sim.make_requests(batch, SHAPE.block_size, id_prefix=f"batch{len(times)}"):
                scheduler.add_request(request)
        start = time.perf_counter()
        sim.step(scheduler, rng)
        times.append(time.perf_counter() - start)
    return times


@pytest.mark.parametrize("fault", ["refused", "black_hole"])
def test_an_unusable_collector_costs_the_scheduler_nothing(runtime_for, fault):
    """Exports (each blocking for up to its 1 s timeout) run on the exporter's thread, never on
    the scheduler's: no step waits for one."""
    hole = BlackHole()
    try:
        endpoint = f"http://127.0.0.1:{hole.port if fault == 'black_hole' else closed_port()}"
        exporter = _ThreadRecordingExporter(endpoint=endpoint, insecure=True, timeout=1.0)
        runtime = runtime_for(endpoint, timeout_s=1.0, metric_exporter=exporter)
        faulty = _step_times(until=lambda: exporter.threads)
        assert exporter.threads, "no export was attempted while the scheduler ran"
        assert threading.get_ident() not in exporter.threads, "an export ran on the scheduler's thread"
        assert max(faulty) < 0.5, max(faulty)  # no step waited for an export's 1 s timeout
        # shutdown is bounded by the export timeout, not by the dead collector
        start = time.perf_counter()
        runtime.shutdown()
        assert time.perf_counter() - start < 5.0
    finally:
        hole.close()


class _ThreadRecordingExporter(GrpcMetricExporter):
    """The real OTLP/gRPC exporter, noting which threads call export()."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.threads: set[int] = set()

    def export(self, *args, **kwargs):
        self.threads.add(threading.get_ident())
        return super().export(*args, **kwargs)


def test_export_resumes_after_the_collector_restarts(runtime_for, caplog):
    """The scheduler runs on while the collector is down; exports catch up when it is back.
    The log: one line when the outage starts, one when it ends, none per retry."""
    caplog.set_level(logging.INFO)
    receiver = RotelReceiver().start()
    try:
        runtime = runtime_for(receiver.grpc_endpoint, timeout_s=0.5)
        scheduler = sim.build_scheduler(SHAPE)
        specs = workloads.generate("alpaca", 200, seed=5)
        for request in sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], SHAPE.block_size):
            scheduler.add_request(request)
        rng = random.Random(0)
        for _ in range(50):
            sim.step(scheduler, rng)
        receiver.wait_for_metric("vllm.kv_cache.blocks", timeout=10)
        receiver.stop_agent()
        for _ in range(100):  # the scheduler keeps going while the collector is down
            sim.step(scheduler, rng)
            time.sleep(0.005)
        receiver.clear()
        receiver.start_agent()
        while scheduler.has_requests():
            sim.step(scheduler, rng)
        final = analyzer_for(scheduler).snapshot()
        runtime.force_flush()

        def caught_up(points):
            attempts = [p["value"] for p in points if p["name"] == "vllm.kv_cache.allocation.attempts"]
            return sum(attempts) >= final.allocation_attempts  # cumulative: the full count arrived

        receiver.wait_for(caught_up, timeout=15)
        spans = receiver.received_spans()
        assert spans and all(s["name"] == "vllm.kv_cache.request" for s in spans)
        told = ["down" if "cannot deliver" in m else "up" for m in (r.getMessage() for r in caplog.records)
                if "vllm-frag-otel" in m and "OTLP collector" in m]
        # one line as an outage starts, one as it ends: they alternate, whatever the exports in between, and
        # the last says the collector is back. (The log is process-wide: an earlier test's outage, or an
        # export that timed out before the stop, may have begun the outage this line ends.)
        assert told and told[-1] == "up", told
        assert all(a != b for a, b in zip(told, told[1:])), told
        assert not [r for r in caplog.records if r.getMessage().startswith("Transient error")]
    finally:
        receiver.stop()


def test_spans_queue_is_bounded_and_drops_are_counted(runtime_for, monkeypatch):
    from test_spans import CapturingMetricExporter

    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8")
    hole = BlackHole()
    metrics = CapturingMetricExporter()
    try:
        runtime = runtime_for(f"http://127.0.0.1:{hole.port}", timeout_s=5.0, metric_exporter=metrics)
        scheduler = sim.build_scheduler(SHAPE)
        specs = workloads.generate("alpaca", 150, seed=6)
        sim.run_to_completion(
            scheduler, sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], SHAPE.block_size)
        )
        runtime.meter_provider.force_flush()
    finally:
        hole.close()
    # the SDK's own span-processor metrics go through the plugin's meter provider
    dropped = [
        p.value
        for d in metrics.exports for rm in d.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        if m.name == "otel.sdk.processor.span.processed"
        for p in m.data.data_points if p.attributes.get("error.type") == "queue_full"
    ]
    assert dropped and max(dropped) > 100  # 150 spans into a queue of 8 that never drains


def test_two_engines_in_one_process_are_told_apart(runtime_for):
    from test_spans import CapturingMetricExporter

    exporter = CapturingMetricExporter()
    runtime = telemetry.Runtime(Settings(exporter="none", spans=False), {}, guard(), exporter)
    previous = telemetry.install(runtime)
    try:
        schedulers = [sim.build_scheduler(SHAPE), sim.build_scheduler(sim.EngineShape(num_blocks=64))]
        runtime.force_flush()
    finally:
        runtime.shutdown()
        telemetry.install(previous)
    limits = {
        p.attributes["vllm.kv_cache.pool"]: p.value
        for d in exporter.exports for rm in d.resource_metrics for sm in rm.scope_metrics
        for m in sm.metrics if m.name == "vllm.kv_cache.block.limit" for p in m.data.data_points
    }
    assert limits == {"0": SHAPE.num_blocks - 1, "1": 63}
    assert len(schedulers) == 2


def _child(out_dir: str, queue) -> None:
    """Runs in a forked or spawned process: build an engine, step it, flush."""
    os.environ["VLLM_FRAG_OTEL_FILE_DIR"] = out_dir
    os.environ["VLLM_FRAG_OTEL_EXPORTER"] = "file"
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what vLLM does at the top of EngineCore.__init__
    from vllm_frag_otel.sim import simulator as child_sim
    from vllm_frag_otel.export import telemetry as child_telemetry

    scheduler = child_sim.build_scheduler(child_sim.EngineShape(num_blocks=77))
    requests = child_sim.make_requests([([7] * 50, 5)], 16, "child")
    child_sim.run_to_completion(scheduler, requests)
    child_telemetry.runtime().force_flush()
    queue.put(os.getpid())


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_exporters_start_in_forked_and_spawned_children(plugin, tmp_path, method, monkeypatch):
    # the parent already exports (its own runtime and pool), as vLLM's front end might
    parent_dir = tmp_path / "parent"
    child_dir = tmp_path / "child"
    monkeypatch.setenv("VLLM_FRAG_OTEL_EXPORTER", "file")
    monkeypatch.setenv("VLLM_FRAG_OTEL_FILE_DIR", str(parent_dir))
    previous = telemetry.install(None)
    try:
        sim.build_scheduler(SHAPE)
        parent_runtime = telemetry.runtime()
        assert parent_runtime is not None and parent_runtime.meter_provider is not None
        context = multiprocessing.get_context(method)
        queue = context.Queue()
        process = context.Process(target=_child, args=(str(child_dir), queue))
        process.start()
        child_pid = queue.get(timeout=240)
        process.join(timeout=60)
        assert process.exitcode == 0
    finally:
        parent_runtime.shutdown()
        telemetry.install(previous)
    lines = [json.loads(line) for path in child_dir.glob("metrics-*.jsonl") for line in path.read_text().splitlines()]
    assert lines
    pids, limits = set(), set()
    for line in lines:
        for rm in line["resourceMetrics"]:
            resource = {a["key"]: a["value"] for a in rm["resource"]["attributes"]}
            pids.add(int(resource["process.pid"]["intValue"]))
            for sm in rm["scopeMetrics"]:
                for m in sm["metrics"]:
                    if m["name"] == "vllm.kv_cache.block.limit":
                        limits |= {p["asInt"] for p in m["gauge"]["dataPoints"]}
    assert pids == {child_pid} and child_pid != os.getpid()
    assert limits == {"76"}  # only the child's own pool, not a copy of the parent's
    assert list(Path(parent_dir).glob("metrics-*.jsonl"))  # the parent's exporter still works


class DiscardingSpanExporter:
    """Accepts and forgets spans: a collector that keeps up."""

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


@pytest.mark.cpu_heavy
def test_soak_100k_requests_state_returns_to_empty_and_memory_stays_flat(plugin):
    """100k requests through the real scheduler, with preemptions and evictions,
    exported as they go (metrics and spans): invariants hold at every checked
    instant, per-request state drains to empty, memory does not grow."""
    import tracemalloc

    from oracle import brute_force
    from test_oracle import _check
    from test_spans import CapturingMetricExporter

    total, wave = 100_000, 1_000
    shape = sim.EngineShape(num_blocks=300, block_size=16, max_num_seqs=64, max_model_len=1024)
    metrics = CapturingMetricExporter()
    runtime = telemetry.Runtime(Settings(exporter="none"), {}, guard(), metrics, DiscardingSpanExporter())
    previous = telemetry.install(runtime)
    try:
        scheduler = sim.build_scheduler(shape)
        analyzer = analyzer_for(scheduler)
        stories = scheduler.kv_cache_manager.__dict__["_vllm_frag_otel"].stories
        specs = workloads.generate("alpaca", wave, seed=1, max_len=512)
        prompts = [(s.prompt_tokens, s.output_len) for s in specs]
        rng = random.Random(0)
        added = steps = checks = 0
        memory = {}
        while added < total or scheduler.has_requests():
            if added < total and len(scheduler.waiting) < 200:
                for request in sim.make_requests(prompts, shape.block_size, f"w{added}"):
                    scheduler.add_request(request)
                added += wave
                # tracemalloc slows every allocation of the process: it traces the last tenth only
                if added == 90 * wave:
                    tracemalloc.start()  # plugin allocations alive from here on
                if added == 92 * wave:
                    memory["before"] = _plugin_bytes(tracemalloc.take_snapshot())
            sim.step(scheduler, rng)
            steps += 1
            if steps % 2_000 == 0:
                runtime.force_flush()  # an export, as the periodic reader would do
                metrics.exports.clear()
            if steps % 5_000 == 0:
                expected = brute_force(scheduler)
                snapshot = analyzer.snapshot()
                _check(snapshot, expected, f"step {steps}")
                checks += 1
        runtime.force_flush()
        memory["after"] = _plugin_bytes(tracemalloc.take_snapshot())
        tracemalloc.stop()
        final = analyzer.snapshot()
        _check(final, brute_force(scheduler), "drained")
    finally:
        runtime.shutdown()
        telemetry.install(previous)
    print(f"\nsoak: {total} requests, {steps} steps, {final.preemptions} preemptions, {final.evictions} evictions, "
          f"plugin memory {memory['before']} -> {memory['after']} bytes")
    assert checks >= 10 and final.preemptions > 1_000 and final.evictions > 10_000
    assert final.tracked_requests == 0 and not stories.open and final.used_blocks == 0
    assert final.allocation_attempts > total
    # 8k requests later, in-flight ones included at "before": no per-request growth (2 bytes each: 16 kB)
    assert memory["after"] - memory["before"] < 16 * 1024


def _plugin_bytes(snapshot) -> int:
    import tracemalloc

    traces = snapshot.filter_traces([tracemalloc.Filter(True, "*vllm_frag_otel*")])
    return sum(stat.size for stat in traces.statistics("filename"))

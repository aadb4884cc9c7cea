"""Block-layout maps leave the plugin as OTLP log records: opt-in, bounded,
sampled off the scheduler's thread, and equal to the pool's real state.

Each map is checked against a brute-force walk over vLLM's own block pool and
block tables (tests/oracle.py), binned here with plain loops.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time

import pytest
from oracle import block_states
from otlp_receiver import RotelReceiver

from vllm_frag_otel import analyzer_for
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.export import telemetry
from vllm_frag_otel.sim import workloads
from vllm_frag_otel.config import Settings
from vllm_frag_otel.plugin.hooks import guard
from vllm_frag_otel.core.layout import BLOCK_STATES, EVENT_NAME, BlockMap

SHAPE = sim.EngineShape(num_blocks=110, block_size=16, max_num_seqs=12)
THREAD = "vllm-frag-otel-block-map"


@pytest.fixture()
def installed(plugin):
    """Install a runtime for the schedulers the test builds; shut it down after."""
    started = []

    def install(runtime: telemetry.Runtime) -> telemetry.Runtime:
        started.append((runtime, telemetry.install(runtime)))
        return runtime

    yield install
    for runtime, previous in started:
        if telemetry.runtime() is runtime:  # not shut down by the test
            runtime.shutdown()
        telemetry.install(previous)


def _binned(names: list[str], max_cells: int) -> list[list[int]]:
    """Per-state counts per cell, the definition spelled out: cells of
    ceil(n / max_cells) consecutive blocks."""
    bin_size = -(-len(names) // max_cells)
    cells = -(-len(names) // bin_size)
    counts = [[0] * cells for _ in BLOCK_STATES]
    for i, name in enumerate(names):
        counts[BLOCK_STATES.index(name)][i // bin_size] += 1
    return counts


def _scheduler_with_requests(seed: int = 4, count: int = 36):
    scheduler = sim.build_scheduler(SHAPE)
    specs = workloads.generate("sharegpt", count, seed=seed, max_len=900)
    for request in sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], SHAPE.block_size):
        scheduler.add_request(request)
    return scheduler


def _file_maps(directory) -> list[tuple[BlockMap, dict, str]]:
    """(map, record attributes, event name) from the OTLP/JSON logs files, read with json alone."""
    found = []
    for path in sorted(directory.glob("logs-*.jsonl")):
        for line in path.read_text().splitlines():
            for resource_logs in json.loads(line)["resourceLogs"]:
                for scope_logs in resource_logs["scopeLogs"]:
                    for record in scope_logs["logRecords"]:
                        attributes = {a["key"]: str(next(iter(a["value"].values()))) for a in record["attributes"]}
                        payload = base64.b64decode(record["body"]["bytesValue"])
                        block_map = BlockMap.decode(payload, attributes, int(record["timeUnixNano"]))
                        found.append((block_map, attributes, record.get("eventName")))
    return found


@pytest.mark.parametrize("max_cells", [16, 4096])
def test_maps_on_disk_equal_the_pool_state_binned_to_at_most_max_cells(installed, tmp_path, max_cells):
    runtime = installed(telemetry.Runtime(
        Settings(exporter="file", file_dir=str(tmp_path), spans=False, block_map_max_cells=max_cells), {}, guard()))
    scheduler = _scheduler_with_requests()
    sampler = runtime.start_block_maps()
    assert sampler is not None and runtime.start_block_maps() is sampler
    expected, rng, step = [], random.Random(0), 0
    while scheduler.has_requests():
        sim.step(scheduler, rng)
        step += 1
        if step % 7 == 0:
            assert sampler.sample() == 1
            expected.append(_binned(block_states(scheduler), max_cells))
    runtime.force_flush()

    maps = _file_maps(tmp_path)
    assert len(maps) == len(expected) > 10
    held_states_seen = set()
    for (block_map, attributes, event_name), counts in zip(sorted(maps, key=lambda m: m[0].time_unix_nano), expected):
        assert event_name == EVENT_NAME
        assert attributes["vllm.kv_cache.pool"] == "0"
        assert block_map.num_blocks == SHAPE.num_blocks - 1
        assert block_map.cells <= max_cells
        assert block_map.counts.tolist() == counts
        held_states_seen.update(s for s, row in zip(BLOCK_STATES, counts) if sum(row))
    assert held_states_seen >= {"empty", "cached", "full", "partial"}
    assert not any(t.name == THREAD for t in threading.enumerate())  # sampled on demand only


def test_maps_are_off_by_default(installed, tmp_path):
    runtime = installed(telemetry.Runtime(Settings(exporter="file", file_dir=str(tmp_path), spans=False), {}, guard()))
    sim.run_to_completion(_scheduler_with_requests(count=8), [])
    runtime.force_flush()
    assert runtime.block_maps is None and runtime.logger_provider is None
    assert not list(tmp_path.glob("logs-*.jsonl")) and list(tmp_path.glob("metrics-*.jsonl"))
    assert not any(t.name == THREAD for t in threading.enumerate())


def test_periodic_maps_reach_a_real_collector_over_otlp(installed, monkeypatch):
    with RotelReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.http_endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "100")
        runtime = installed(telemetry.Runtime(
            Settings(exporter="otlp", spans=False, block_map_interval=0.05), {}, guard()))
        assert any(t.name == THREAD for t in threading.enumerate())
        scheduler = _scheduler_with_requests()
        rng = random.Random(0)
        while scheduler.has_requests():
            sim.step(scheduler, rng)
            time.sleep(0.002)  # let a few maps fall while requests run
        final = _binned(block_states(scheduler), 4096)
        time.sleep(0.3)  # maps of the drained pool
        runtime.shutdown()
        telemetry.install(None)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not receiver.received_logs():
            time.sleep(0.1)
        records = sorted(receiver.received_logs(), key=lambda r: r["time_unix_nano"])

    assert not any(t.name == THREAD for t in threading.enumerate())  # stopped with the runtime
    assert len(records) >= 5
    assert {r["event_name"] for r in records} == {EVENT_NAME}
    assert {r["attributes"]["model_name"] for r in records} == {sim.TINY_MODEL_DIR}  # the engine's
    maps = [BlockMap.decode(r["body"], {k: str(v) for k, v in r["attributes"].items()}, r["time_unix_nano"])
            for r in records]
    gaps = [(b.time_unix_nano - a.time_unix_nano) / 1e9 for a, b in zip(maps, maps[1:])]
    assert 0.04 <= sorted(gaps)[len(gaps) // 2] < 0.5  # about every 50 ms
    assert any(m.counts[BLOCK_STATES.index("full")].sum() for m in maps)  # sampled while requests ran
    assert maps[-1].counts.tolist() == final  # and after they drained: all unheld


def test_a_failing_sampler_is_contained_and_counted(plugin, monkeypatch):
    hook_guard = guard()
    saved = (hook_guard.errors, hook_guard.active, hook_guard.max_errors)
    hook_guard.max_errors = 10_000
    scheduler = _scheduler_with_requests(count=8)
    state = analyzer_for(scheduler)

    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(state, "block_states", broken)
    sampler = telemetry.BlockMapSampler(_NullLogger(), 64, lambda: [(state, {})], hook_guard)
    try:
        sampler.start(0.01)
        steps = sim.run_to_completion(scheduler, [])
        time.sleep(0.1)
    finally:
        sampler.stop()
        counted = hook_guard.errors - saved[0]
        hook_guard.errors, hook_guard.active, hook_guard.max_errors = saved
    assert steps > 0 and not scheduler.has_requests()  # vLLM ran on, undisturbed
    assert counted >= 3  # the sampler kept trying, each failure contained and counted
    assert not any(t.name == THREAD for t in threading.enumerate())


class _NullLogger:
    def emit(self, **kwargs) -> None:
        pass

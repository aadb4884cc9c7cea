"""The plugin's tap on vLLM's per-block seam (`hooks.BlockEvents`).

A BlockPool reports every block it hands out, every prefix hit and every
dropped cache entry to its `metrics_collector`; the plugin sits there instead
of wrapping those methods. These tests check what rides on that: vLLM's own
collector keeps working behind it, a collector vLLM replaces is found and the
tap put back, a tap is not left buffering when the plugin turns off, and the
ledger stays exact throughout (recounted from vLLM's pool).
"""

from __future__ import annotations

import logging
import random

from oracle import brute_force
from test_non_interference import unhooked  # noqa: F401  (fixture)
from test_oracle import _check

from vllm_frag_otel import analyzer_for
from vllm_frag_otel.plugin import hooks
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.sim.workloads import generate

# small enough to evict and preempt
SHAPE = sim.EngineShape(num_blocks=96, block_size=16, max_num_seqs=8)


def _serve(shape: sim.EngineShape, on_step=None):
    scheduler = sim.build_scheduler(shape)
    specs = generate("sharegpt", 24, seed=5, max_len=700)
    requests = sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], shape.block_size)
    evictions = []  # vLLM's own collector's eviction events, as its stats drain them
    collector = scheduler.kv_metrics_collector
    if collector is not None:
        drain = collector.drain_events
        collector.drain_events = lambda: evictions.extend(drained := drain()) or drained

    def step(*args):
        if on_step is not None:
            on_step(scheduler)

    sim.run_to_completion(scheduler, requests, on_step=step, arrival_steps=[2 * i for i in range(len(requests))])
    if collector is not None:
        collector.drain_events()
    return scheduler, evictions


def test_vllm_s_own_kv_cache_metrics_keep_working_behind_the_tap(plugin, unhooked):
    """--kv-cache-metrics at sample rate 1: vLLM's collector sees every block
    event through the tap, so it reports what it reports without the plugin."""
    shape = sim.EngineShape(num_blocks=96, block_size=16, max_num_seqs=8, kv_metrics_sample=1.0)
    _, without = _serve(shape)
    assert plugin.instrument()
    checked = []

    def exact(scheduler):
        _check(analyzer_for(scheduler).snapshot(), brute_force(scheduler), "with vLLM's collector")
        checked.append(1)

    scheduler, with_plugin = _serve(shape, exact)
    tap = scheduler.kv_cache_manager.block_pool.metrics_collector
    assert isinstance(tap, hooks.BlockEvents) and tap.chained is scheduler.kv_metrics_collector
    assert len(without) > 20 and len(with_plugin) == len(without)
    assert sorted(len(e.reuse_gaps_seconds) for e in with_plugin) == sorted(len(e.reuse_gaps_seconds) for e in without)
    assert checked


def test_a_collector_made_only_because_of_the_tap_is_not_chained(plugin):
    """vLLM builds a HiSparse host pool's collector from the device pool's
    `sample_rate`: with no collector of vLLM's behind the device pool's tap,
    that one exists only because of the tap and is left out (nobody asked
    for vLLM's sampled metrics)."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_metrics import KVCacheMetricsCollector

    device = BlockPool(16, True, 4)
    assert device.metrics_collector.chained is None
    host = BlockPool(16, True, 4, metrics_collector=KVCacheMetricsCollector(device.metrics_collector.sample_rate))
    assert isinstance(host.metrics_collector, hooks.BlockEvents) and host.metrics_collector.chained is None
    asked_for = KVCacheMetricsCollector(0.5)
    assert BlockPool(16, True, 4, metrics_collector=asked_for).metrics_collector.chained is asked_for


def test_a_replaced_collector_is_found_by_the_self_check_and_the_tap_put_back(plugin, caplog, monkeypatch):
    monkeypatch.setattr(hooks, "_drift_logged", False)
    replaced = []

    def replace_once(scheduler):
        pool, analyzer = scheduler.kv_cache_manager.block_pool, analyzer_for(scheduler)
        if not replaced and pool.get_num_free_blocks() < 40:
            pool.metrics_collector = None  # vLLM rebinds it: block events stop reaching the ledger
            replaced.append(analyzer.drift_repairs)
            return
        if replaced and len(replaced) == 1:
            analyzer.check_due = True  # as a collection asks
            replaced.append("asked")
            return
        if len(replaced) == 2:
            assert isinstance(pool.metrics_collector, hooks.BlockEvents)
            assert analyzer.drift_repairs > replaced[0]
            replaced.append("repaired")
        _check(analyzer.snapshot(), brute_force(scheduler), "after the tap was put back")

    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        _serve(SHAPE, replace_once)
    assert replaced[1:] == ["asked", "repaired"]
    (warning,) = [r.getMessage() for r in caplog.records if "drifted" in r.getMessage()]
    assert "vLLM replaced the block pool's metrics collector" in warning


def test_a_plugin_that_turns_itself_off_gives_the_pools_their_collectors_back(plugin, monkeypatch):
    guard = hooks.guard()
    monkeypatch.setattr(guard, "max_errors", guard.errors + 1)
    scheduler = sim.build_scheduler(SHAPE)
    pool = scheduler.kv_cache_manager.block_pool
    tap = pool.metrics_collector
    try:
        guard.failed(RuntimeError("the last contained error"))
        assert not guard.active and pool.metrics_collector is None
        scheduler.add_request(sim.make_requests([([7] * 64, 4)], SHAPE.block_size, "after")[0])
        sim.step(scheduler, random.Random(0))
        assert not tap.allocated and not tap.accessed and not tap.evicted  # nothing buffers without bound
    finally:
        guard.active = True

"""The runtime self-check: a ledger that drifted from vLLM's pool is found
before a collection reads it (at the scheduler's next step boundary), logged
once per process, counted and resynchronised, on vLLM's real scheduler. And
layouts the plugin does not know are named in a warning instead of being
counted wrongly."""

from __future__ import annotations

import logging
import random
import threading

import pytest
from oracle import brute_force
from test_oracle import _check, _check_possible

from vllm_frag_otel import analyzer_for
from vllm_frag_otel.plugin import hooks
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.sim.workloads import generate

SHAPE = sim.EngineShape(num_blocks=200, block_size=16, max_num_seqs=8, layout="full,sliding_window:48")


def _running_scheduler():
    scheduler = sim.build_scheduler(SHAPE)
    specs = generate("sharegpt", 12, seed=3, max_len=800)
    for request in sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], scheduler.hash_block_size):
        scheduler.add_request(request)
    rng = random.Random(0)
    for _ in range(5):
        sim.step(scheduler, rng)
    return scheduler, rng


def _collect_while_stepping(scheduler, rng) -> bool:
    """What an exporter thread does: ask for the check before reading the
    ledger, while the scheduler steps on this thread. True if it was checked."""
    analyzer = analyzer_for(scheduler)
    result = []
    collector = threading.Thread(target=lambda: result.append(analyzer.check_before_reading(30.0)))
    collector.start()
    while collector.is_alive():
        if analyzer.check_due:
            sim.step(scheduler, rng)  # the step boundary runs the check
        collector.join(0.01)
    return result == [True]


def _lose_releases(analyzer, pool, count: int) -> int:
    """A lost event: the ledger believes `count` held blocks were released."""
    held = [b.block_id for b in pool.blocks[1:] if b.ref_cnt > 0]
    assert len(held) > count
    with analyzer.lock:
        analyzer.on_blocks_released(held[:count], now=0.0)
    return analyzer.snapshot().free_blocks


def test_drift_is_found_before_the_collection_reads_and_logged_once(plugin, caplog, monkeypatch):
    monkeypatch.setattr(hooks, "_drift_logged", False)
    scheduler, rng = _running_scheduler()
    analyzer = analyzer_for(scheduler)
    pool = scheduler.kv_cache_manager.block_pool
    wrong_free = _lose_releases(analyzer, pool, 4)
    assert wrong_free != brute_force(scheduler)["free_blocks"]
    _check_possible(analyzer.snapshot(), "drifted")  # wrong, but never impossible
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        assert _collect_while_stepping(scheduler, rng)
    lines = [r.getMessage() for r in caplog.records if "drifted" in r.getMessage()]
    assert len(lines) == 1
    assert f"free blocks {wrong_free}, the allocator has {wrong_free - 4}" in lines[0]
    repaired = analyzer.snapshot()  # what the collection reads after its check
    assert repaired.drift_repairs == 1
    _check(repaired, brute_force(scheduler), "after the repair")
    # nothing drifted since: the next check finds nothing and logs nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        assert _collect_while_stepping(scheduler, rng)
    assert analyzer.snapshot().drift_repairs == 1 and not caplog.records
    # a second drift is repaired and counted, not logged again
    _lose_releases(analyzer, pool, 2)
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        assert _collect_while_stepping(scheduler, rng)
    assert analyzer.drift_repairs == 2 and not caplog.records
    _check(analyzer.snapshot(), brute_force(scheduler), "after the second repair")


def test_a_collection_on_the_schedulers_thread_checks_at_once(plugin):
    """A flush at stop (or the simulator's exports) runs on the scheduler's
    thread: waiting for a step boundary there would wait for itself."""
    scheduler, _ = _running_scheduler()
    analyzer = analyzer_for(scheduler)
    _lose_releases(analyzer, scheduler.kv_cache_manager.block_pool, 3)
    assert analyzer.check_before_reading(30.0)
    assert analyzer.drift_repairs == 1 and not analyzer.check_due
    _check(analyzer.snapshot(), brute_force(scheduler), "after the repair")


def test_a_collection_the_schedulers_thread_waits_for_is_checked_first_and_not_waited_for(plugin):
    """The simulator's flushes and the stop's exporters collect on another thread
    while the scheduler's thread waits for them: no step boundary can come, so
    the check runs before that wait (`hold`) and the collection reads at once."""
    scheduler, _ = _running_scheduler()
    analyzer = analyzer_for(scheduler)
    _lose_releases(analyzer, scheduler.kv_cache_manager.block_pool, 3)
    assert analyzer.hold()
    try:
        assert analyzer.drift_repairs == 1  # checked and repaired here, before the wait
        result = []
        collector = threading.Thread(target=lambda: result.append(analyzer.check_before_reading(30.0)))
        collector.start()
        collector.join(10)
        assert result == [True]  # read at once: it did not wait for a step
    finally:
        analyzer.release()
    _check(analyzer.snapshot(), brute_force(scheduler), "after the repair")
    held_elsewhere = []
    other = threading.Thread(target=lambda: held_elsewhere.append(analyzer.hold()))
    other.start()
    other.join(10)
    assert held_elsewhere == [False]  # only the scheduler's own thread can promise no step comes


def test_an_idle_scheduler_lets_the_collection_go_on(plugin):
    scheduler, _ = _running_scheduler()
    analyzer = analyzer_for(scheduler)
    result = []
    collector = threading.Thread(target=lambda: result.append(analyzer.check_before_reading(0.05)))
    collector.start()
    collector.join(30)
    assert result == [False] and analyzer.drift_repairs == 0


def test_a_corrupted_cached_flag_alone_is_found_by_the_probes(plugin):
    """The free count can agree while a flag is wrong: the sampled probes catch
    it (every block is probed when the pool has fewer blocks than probes)."""
    shape = sim.EngineShape(num_blocks=48, block_size=16, max_num_seqs=4)
    scheduler = sim.build_scheduler(shape)
    analyzer = analyzer_for(scheduler)
    pool = scheduler.kv_cache_manager.block_pool
    free_block = next(b.block_id for b in pool.blocks[1:] if b.ref_cnt == 0 and b.block_hash is None)
    with analyzer.lock:
        analyzer.on_block_hashed(free_block, now=0.0)
    assert analyzer.snapshot().cached_blocks == 1
    found = hooks.self_check(analyzer, pool)
    assert found == [f"block {free_block} free=True cached=True, the allocator has free=True cached=False"]
    assert analyzer.snapshot().cached_blocks == 0 and analyzer.drift_repairs == 1


def test_no_check_runs_unless_a_collection_asks(plugin, monkeypatch):
    """The check costs nothing on steps where no collection asked for it."""
    scheduler, rng = _running_scheduler()
    analyzer = analyzer_for(scheduler)
    calls = []
    monkeypatch.setattr(hooks, "self_check", lambda state, pool: calls.append(state) or state.check_done() or [])
    sim.step(scheduler, rng)
    analyzer.snapshot()  # reading alone asks for nothing
    sim.step(scheduler, rng)
    assert calls == []
    analyzer.check_due = True  # what check_before_reading sets on an exporter thread
    sim.step(scheduler, rng)
    sim.step(scheduler, rng)
    assert len(calls) == 1


class FancyManager:
    """A per-group manager this plugin version has never seen."""

    def __init__(self, spec, pool):
        self.kv_cache_spec, self.block_size, self.block_pool = spec, spec.block_size, pool


def test_unknown_managers_and_foreign_pools_are_named_and_not_counted_as_slots(plugin, caplog):
    scheduler = sim.build_scheduler(sim.EngineShape(num_blocks=32, block_size=16))
    group_manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    pool = scheduler.kv_cache_manager.block_pool
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        unknown = hooks._group_layout(3, FancyManager(group_manager.kv_cache_spec, pool), pool)
        foreign = hooks._group_layout(4, group_manager, object())
    assert (unknown.kind, unknown.token_slots) == ("full_attention", False)
    assert not foreign.token_slots
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "group 3 (full_attention) uses FancyManager" in messages
    assert "group 4 (full_attention) allocates from another block pool" in messages


@pytest.mark.parametrize(
    ("layout", "kinds"),
    [
        ("gpt-oss", ["full_attention", "sliding_window"]),
        ("llama4", ["full_attention", "chunked_local_attention"]),
        ("qwen3-next", ["full_attention", "mamba"]),
        ("mla,sliding_window_mla:64", ["mla_attention", "sliding_window_mla"]),
        ("full,rswa:64,circular_buffer:32", ["full_attention", "rswa", "circular_buffer"]),
    ],
)
def test_groups_carry_vllms_kind_names(plugin, layout, kinds):
    snapshot = analyzer_for(sim.build_scheduler(sim.EngineShape(num_blocks=64, layout=layout))).snapshot()
    assert [g.kind for g in snapshot.groups] == kinds
    assert [g.token_slots for g in snapshot.groups] == [k not in ("mamba", "circular_buffer") for k in kinds]


def test_a_table_edited_in_place_without_a_report_is_found_and_read_again(plugin, monkeypatch, caplog):
    """A vLLM path the plugin does not hook rewrites a table in place: the
    self-check compares the tables as last read with vLLM's and reads the
    differing ones again."""
    from vllm_frag_otel.core.state import KVCacheState

    monkeypatch.setattr(hooks, "_drift_logged", False)
    scheduler, rng = _running_scheduler()
    analyzer = analyzer_for(scheduler)
    monkeypatch.setattr(KVCacheState, "on_table_edited", lambda self, request_id: None)
    monkeypatch.setattr(KVCacheState, "_blocks_moved", lambda self, request_id, recycled: None)  # both reports
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        for _ in range(400):
            analyzer.snapshot()
            analyzer.check_due = True
            sim.step(scheduler, rng)
            if analyzer.drift_repairs:
                break
    assert analyzer.drift_repairs >= 1
    assert any("read as" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    for _ in range(3):  # edits made unreported before the undo are found by the following checks
        analyzer.snapshot()
        analyzer.check_due = True
        sim.step(scheduler, rng)
    _check(analyzer.snapshot(), brute_force(scheduler), "after the tables were read again")

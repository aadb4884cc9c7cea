"""The runtime self-check: a ledger that drifted from vLLM's pool is found at the
next step boundary after a collection, logged once, counted and resynchronised,
on vLLM's real scheduler. And layouts the plugin does not know are named in a
warning instead of being counted wrongly."""

from __future__ import annotations

import logging
import random

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


def test_drift_is_found_logged_counted_and_repaired(plugin, caplog):
    scheduler, rng = _running_scheduler()
    analyzer = analyzer_for(scheduler)
    pool = scheduler.kv_cache_manager.block_pool
    held = [b.block_id for b in pool.blocks[1:] if b.ref_cnt > 0]
    assert len(held) > 4
    # a lost event: the ledger believes four held blocks were released
    with analyzer.lock:
        analyzer.on_blocks_released(held[:4], now=0.0)
    wrong = analyzer.snapshot()  # a collection: the check is now due
    assert wrong.free_blocks != brute_force(scheduler)["free_blocks"]
    _check_possible(wrong, "drifted")  # wrong, but never impossible
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        sim.step(scheduler, rng)  # the next step boundary runs the check
    lines = [r.getMessage() for r in caplog.records if "drifted" in r.getMessage()]
    assert len(lines) == 1
    assert f"free blocks {wrong.free_blocks}, the allocator has {wrong.free_blocks - 4}" in lines[0]
    repaired = analyzer.snapshot()
    assert repaired.drift_repairs == 1
    _check(repaired, brute_force(scheduler), "after the repair")
    # nothing drifted since: the next check finds nothing and logs nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        sim.step(scheduler, rng)
    assert analyzer.snapshot().drift_repairs == 1 and not caplog.records


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


def test_no_check_runs_without_a_collection(plugin, monkeypatch):
    """The check costs nothing on steps where no collection asked for it."""
    scheduler, rng = _running_scheduler()
    analyzer = analyzer_for(scheduler)
    calls = []
    monkeypatch.setattr(hooks, "self_check", lambda *args: calls.append(args) or [])
    analyzer.check_due = False
    sim.step(scheduler, rng)
    assert calls == []
    analyzer.snapshot()
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

    scheduler, rng = _running_scheduler()
    analyzer = analyzer_for(scheduler)
    monkeypatch.setattr(KVCacheState, "on_table_edited", lambda self, request_id: None)
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        for _ in range(400):
            analyzer.snapshot()
            sim.step(scheduler, rng)
            if analyzer.drift_repairs:
                break
    assert analyzer.drift_repairs >= 1
    assert any("read as" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    for _ in range(3):  # edits made unreported before the undo are found by the following checks
        analyzer.snapshot()
        sim.step(scheduler, rng)
    _check(analyzer.snapshot(), brute_force(scheduler), "after the tables were read again")

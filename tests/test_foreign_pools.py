"""Several block pools in one engine, on vLLM's real objects: each ledger counts
its own pool's blocks only.

vLLM moves a group to another pool after the KV-cache manager is built (a
HiSparse source group gets a host pool when the KV connector binds it), and
hands a table's blocks of another pool on to that pool when it frees them.
The ledger follows which groups use its pool, and every hook ignores blocks
that are not its pool's own.
"""

from __future__ import annotations

import logging
import random

from oracle import brute_force
from test_oracle import _check, _check_block_states, _check_requests

from vllm_frag_otel import analyzer_for
from vllm_frag_otel.plugin import hooks
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.sim.workloads import generate

SHAPE = sim.EngineShape(num_blocks=120, block_size=16, max_num_seqs=8, layout="full,sliding_window:48",
                        enable_prefix_caching=False)


def _second_pool(num_blocks: int = 400):
    from vllm.v1.core.block_pool import BlockPool

    return BlockPool(num_gpu_blocks=num_blocks, enable_caching=True, hash_block_size=SHAPE.block_size)


def _move_group(scheduler, group: int, pool) -> None:
    """What HiSparseSourceManager.bind_host_pool does to its group."""
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[group]
    manager.block_pool = pool
    manager._null_block = pool.null_block


def _add_requests(scheduler, count: int = 20) -> None:
    specs = generate("sharegpt", count, seed=3, max_len=600)
    for request in sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], scheduler.hash_block_size):
        scheduler.add_request(request)


def test_a_group_moved_to_another_pool_after_the_manager_is_built_is_left_out_with_one_warning(plugin, caplog):
    scheduler = sim.build_scheduler(SHAPE)
    host = _second_pool()
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        _move_group(scheduler, 1, host)
        _add_requests(scheduler)
        analyzer, rng, steps = analyzer_for(scheduler), random.Random(0), 0
        while scheduler.has_requests():
            sim.step(scheduler, rng)
            snapshot = analyzer.snapshot()
            _check(snapshot, brute_force(scheduler), f"step {steps}")  # no value negative, none counted twice
            _check_block_states(analyzer, scheduler, f"step {steps}")
            _check_requests(analyzer, scheduler, f"step {steps}")
            host_blocks = sum(1 for b in host.blocks[1:] if b.ref_cnt > 0)
            assert analyzer_for(host).snapshot().used_blocks == host_blocks, f"step {steps}: the host pool's own ledger"
            steps += 1
    assert steps > 10 and snapshot.groups[1].used_blocks == 0 and not snapshot.groups[1].token_slots
    moved = [r.getMessage() for r in caplog.records if "group 1 (sliding_window) allocates from another" in r.getMessage()]
    assert len(moved) == 1, moved


def test_the_self_check_finds_a_group_that_moved_and_attaches_again(plugin, monkeypatch):
    monkeypatch.setattr(hooks, "_drift_logged", False)
    scheduler = sim.build_scheduler(SHAPE)
    analyzer = analyzer_for(scheduler)
    _move_group(scheduler, 1, _second_pool())
    found = hooks.self_check(analyzer, scheduler.kv_cache_manager.block_pool)
    assert found == ["a KV-cache group moved to another block pool"] and analyzer.drift_repairs == 1
    assert hooks.self_check(analyzer, scheduler.kv_cache_manager.block_pool) == []  # attached once, stays so


def test_blocks_of_another_pool_are_ignored_by_every_hook(plugin):
    """vLLM hands another pool's blocks on to it (free); a pool that caches or
    touches them (a connector's mistake) must not count them as its own blocks
    of the same id."""
    scheduler = sim.build_scheduler(sim.EngineShape(num_blocks=40, block_size=SHAPE.block_size))
    pool, other = scheduler.kv_cache_manager.block_pool, _second_pool(40)
    ledger, other_ledger = analyzer_for(pool), analyzer_for(other)
    held = pool.get_new_blocks(3)  # the same ids as three of the foreign blocks, held here
    foreign = other.get_new_blocks(6)
    assert other_ledger.snapshot().used_blocks == 6
    assert {b.block_id for b in held} < {b.block_id for b in foreign}
    [request] = sim.make_requests([(list(range(3, 3 + 6 * SHAPE.block_size)), 1)], scheduler.hash_block_size)
    pool.cache_full_blocks(request, foreign, 0, 6, SHAPE.block_size, 0)
    pool.touch(foreign[:2])  # vLLM raises or not, depending on the release; the ledger must stay right
    pool.free_blocks(foreign[:2])
    pool.free_blocks(list(reversed(foreign)))  # vLLM hands them on to `other`
    expected = brute_force(scheduler)
    assert expected["used_blocks"] == 3
    _check(ledger.snapshot(), expected, "the scheduler's pool")
    after = ledger.snapshot()
    assert (after.cached_blocks, after.evictions, after.blocks_prefix_hit) == (0, 0, 0)
    assert other_ledger.snapshot().free_blocks == other.get_num_free_blocks() == 39

"""Hook paths and exported values that mutation testing found unchecked.

Every number is compared with a count the plugin cannot influence: `PoolLedger`
wraps the methods of one real BlockPool *instance* (outside the plugin's
class-level hooks, so it sees each call as vLLM makes it) and reads vLLM's own
block objects before and after; the brute force of tests/oracle.py walks the
allocator's blocks and tables; vLLM's KV events count removed hashes. Nothing
here mocks vLLM's allocator.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict

import numpy as np
import pytest
import vllm
from packaging.version import Version
from oracle import block_states, brute_force
from test_metrics import Pipeline
from test_spans import traced  # noqa: F401  (fixture)

from vllm_frag_otel import analyzer_for
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.sim import workloads
from vllm_frag_otel.plugin.hooks import guard
from vllm_frag_otel.core.layout import BLOCK_STATES
from vllm_frag_otel.core.state import ALLOCATION_BUCKETS

# Pool methods after which a block that had a prefix-cache entry and lost it
# was evicted, and why; any other method losing one is a surprise.
EVICTING = {"get_new_blocks": "capacity", "evict_blocks": "explicit", "reset_prefix_cache": "reset",
            "_maybe_evict_cached_block": "replaced", "cache_partial_block": "replaced"}
WATCHED = ("get_new_blocks", "touch", "cache_full_blocks", "cache_partial_block", "move_block_hashes",
           "evict_blocks", "reset_prefix_cache", "_maybe_evict_cached_block")


class PoolLedger:
    """What vLLM's pool did, per block, from vLLM's own block objects.

    A block is cached while `block.block_hash` is set. It was hit when a
    request touched it; a fresh cache entry clears that. When its entry goes,
    that is one eviction, reason from the pool method that dropped it.
    """

    def __init__(self, pool):
        self.pool = pool
        self.hit = [False] * len(pool.blocks)  # hit since its current cache entry was made
        self.evictions: Counter = Counter()  # (reason, hit since cached) -> blocks
        self.evicted: dict[int, list[bool]] = defaultdict(list)  # block -> hit flag at each eviction
        self.held_evictions = 0  # evicted while a request held it
        self.sources: Counter = Counter()  # fresh / recycled / prefix_hit
        self.new_entries: Counter = Counter()  # method -> blocks that gained an entry in it
        self.moves = 0
        self.calls: Counter = Counter()
        self._depth = 0
        for name in WATCHED:
            self._wrap(name)

    def _flags(self) -> list[bool]:
        return [b.block_hash is not None for b in self.pool.blocks]

    def _wrap(self, name: str) -> None:
        inner = getattr(self.pool, name)  # the class's method, as the plugin hooked it

        def outer(*args, **kwargs):
            if self._depth:  # called from another watched method: that call accounts for it
                return inner(*args, **kwargs)
            if name == "touch":
                args = (list(args[0]), *args[1:])
            before = self._flags()
            self._depth += 1
            try:
                result = inner(*args, **kwargs)
            finally:
                self._depth -= 1
            self.calls[name] += 1
            self._settle(name, before, args, kwargs, result)
            return result

        setattr(self.pool, name, outer)

    def _settle(self, name, before, args, kwargs, result) -> None:
        after = self._flags()
        if name == "touch":
            for block in args[0]:
                if not block.is_null:
                    self.hit[block.block_id] = True
                    self.sources["prefix_hit"] += 1
        if name == "get_new_blocks":
            for block in result:
                self.sources["recycled" if before[block.block_id] else "fresh"] += 1
        lost = [b for b, (was, now) in enumerate(zip(before, after)) if was and not now]
        gained = [b for b, (was, now) in enumerate(zip(before, after)) if now and not was]
        replacing = args[5] if len(args) > 5 else kwargs.get("replace_existing_hashes", False)
        if name == "cache_partial_block" and replacing:
            block = args[1] if len(args) > 1 else kwargs["block"]
            if before[block.block_id] and after[block.block_id]:  # new content keyed in place of the old
                lost.append(block.block_id)
                gained.append(block.block_id)
        if name == "move_block_hashes":
            src, dst = (args + (kwargs.get("src_block"), kwargs.get("dst_block")))[:2]
            assert (lost, gained) == ([src.block_id], [dst.block_id])
            self.hit[dst.block_id] = self.hit[src.block_id]
            self.moves += 1
            return
        for b in lost:
            self.evictions[(EVICTING.get(name, f"unexpected in {name}"), self.hit[b])] += 1
            self.evicted[b].append(self.hit[b])
            self.held_evictions += self.pool.blocks[b].ref_cnt > 0
        for b in gained:
            self.hit[b] = False
            self.new_entries[name] += 1

    def total_evictions(self) -> int:
        return sum(self.evictions.values())


def _nonzero(counts) -> dict:
    return {k: v for k, v in counts.items() if v}


def _check_pool(analyzer, scheduler, ledger: PoolLedger, where: str, reasons: bool = True) -> None:
    """Block counts against the brute force, eviction counts against the ledger."""
    snapshot = analyzer.snapshot()
    analyzer.check_due = True  # as a collection asks: the self-check runs at the next step boundary
    expected = brute_force(scheduler)
    for field in ("used_blocks", "cached_blocks", "free_blocks"):
        assert getattr(snapshot, field) == expected[field], f"{where}: {field}"
    if reasons:
        assert _nonzero(analyzer.evictions) == _nonzero(ledger.evictions), where
    assert snapshot.evictions == ledger.total_evictions(), f"{where}: evictions"
    assert snapshot.drift_repairs == 0, f"{where}: the plugin's self-check had to repair its ledger"


def _check_histograms(analyzer, ledger: PoolLedger) -> None:
    """One cache-duration and one idle-duration value per evicted block."""
    analyzer.fold_histograms(0)
    assert analyzer.block_cache_duration.count == ledger.total_evictions()
    assert analyzer.block_idle_duration.count == ledger.total_evictions()


def _prompts(seed: int, n: int, prefix_lens: list[int], body: tuple[int, int], output: tuple[int, int]):
    """(prompt, output length) pairs; every other request starts with a shared prefix."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 30000) for _ in range(length)] for length in prefix_lens]
    prompts = []
    for i in range(n):
        shared = prefixes[i // 2 % len(prefixes)] if i % 2 == 0 else []
        prompts.append((shared + [rng.randrange(3, 30000) for _ in range(rng.randint(*body))], rng.randint(*output)))
    return prompts


def build_variant(shape: sim.EngineShape, prefix_match_unit: int | None = None, kv_transfer_config=None,
                  mamba_checkpoints: bool = False):
    """sim.build_scheduler plus settings it does not expose: a prefix-match unit
    finer than the block size (partial-block cache entries, Mamba copy-on-write),
    a KV connector, and Mamba prefill checkpoint blocks (what vLLM's MambaMixer2
    layers declare)."""
    import dataclasses

    from vllm.config import CacheConfig, DeviceConfig, KVEventsConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    cache_config = CacheConfig(
        block_size=shape.block_size, cache_dtype="auto", enable_prefix_caching=shape.prefix_caching,
        mamba_cache_mode=shape.mamba_cache_mode, prefix_match_unit=prefix_match_unit,
    )
    cache_config.num_gpu_blocks = shape.num_blocks
    vllm_config = VllmConfig(
        model_config=sim._model_config(ModelConfig, shape.max_model_len),
        scheduler_config=SchedulerConfig(
            max_model_len=shape.max_model_len, is_encoder_decoder=False, max_num_seqs=shape.max_num_seqs,
            max_num_batched_tokens=shape.max_num_batched_tokens, enable_chunked_prefill=True, async_scheduling=False,
        ),
        cache_config=cache_config,
        device_config=DeviceConfig(device="cpu"),
        kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="null") if shape.kv_events else None,
        kv_transfer_config=kv_transfer_config,
    )
    kv_cache_config = KVCacheConfig(
        num_blocks=shape.num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec([f"layer.{i}"], sim._group_spec(group, shape)) for i, group in enumerate(shape.groups)
        ],
    )
    if mamba_checkpoints:
        for group in kv_cache_config.kv_cache_groups:
            if group.kv_cache_spec.__class__.__name__ == "MambaSpec":
                group.kv_cache_spec = dataclasses.replace(
                    group.kv_cache_spec, num_prefill_checkpoint_blocks=1, prefill_checkpoint_alignment=1)
    block_size, hash_block_size = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
    return Scheduler(
        vllm_config=vllm_config, kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size, hash_block_size=hash_block_size, log_stats=True,
    )


# -- 1, 2: reuse flags and block sources ----------------------------------------------


@pytest.fixture(scope="module")
def churn(plugin):
    """Shared prefixes through a small pool, arrivals staggered: cached blocks are
    hit, evicted, re-cached with other content and evicted again. After every
    step: the plugin's counters and the ledger's, and vLLM's removed-hash count."""
    shape = sim.EngineShape(num_blocks=40, block_size=8, max_num_seqs=4, max_num_batched_tokens=256,
                            max_model_len=1024, kv_events=True)
    scheduler = sim.build_scheduler(shape)
    analyzer = analyzer_for(scheduler)
    ledger = PoolLedger(scheduler.kv_cache_manager.block_pool)
    removed = Counter()
    publish = scheduler.kv_event_publisher.publish

    def counting_publish(batch):
        removed["hashes"] += sum(len(e.block_hashes) for e in batch.events if type(e).__name__ == "BlockRemoved")
        return publish(batch)

    scheduler.kv_event_publisher.publish = counting_publish
    prompts = _prompts(seed=7, n=48, prefix_lens=[24, 40, 16], body=(4, 90), output=(2, 30))
    steps = []

    def record(*_):
        steps.append((analyzer.snapshot(), dict(analyzer.evictions), Counter(ledger.evictions),
                      Counter(ledger.sources), removed["hashes"]))

    sim.run_to_completion(scheduler, sim.make_requests(prompts, shape.block_size), on_step=record,
                          arrival_steps=[3 * i for i in range(len(prompts))])
    return ledger, steps


def test_reuse_flag_resets_when_a_block_is_cached_again(churn):
    """A block hit under one cache entry and evicted, then cached with other
    content and evicted unhit, counts as never reused the second time."""
    ledger, steps = churn
    for i, (snapshot, evictions, expected, _, removed) in enumerate(steps):
        assert _nonzero(evictions) == _nonzero(expected), f"step {i}"
        assert snapshot.evicted_never_reused == expected[("capacity", False)], f"step {i}"
        assert sum(expected.values()) == removed, f"step {i}: the ledger disagrees with vLLM's KV events"
    # the workload really does it: a block evicted after a hit, then cached again and evicted unhit
    assert any(any(a and not b for a, b in zip(flags, flags[1:])) for flags in ledger.evicted.values())
    assert ledger.evictions[("capacity", True)] > 0 and ledger.evictions[("capacity", False)] > 0


def test_block_sources_equal_what_the_pool_handed_out(churn):
    """fresh: popped without a cache entry; recycled: popped holding one;
    prefix_hit: a non-null block a request touched."""
    _, steps = churn
    for i, (snapshot, _, _, sources, _) in enumerate(steps):
        assert snapshot.blocks_allocated_fresh == sources["fresh"], f"step {i}"
        assert snapshot.blocks_allocated_recycled == sources["recycled"], f"step {i}"
        assert snapshot.blocks_prefix_hit == sources["prefix_hit"], f"step {i}"
    final = steps[-1][3]
    assert min(final.values()) > 0 and final["fresh"] != final["recycled"], final


# -- 3: several KV-cache groups through the hooks -------------------------------------


@pytest.mark.parametrize("layout", ["full,sliding_window:32", "full,mamba_align"])
def test_each_group_counts_its_own_blocks(plugin, layout):
    """Per group, used blocks are the distinct non-null blocks in that group's
    own live tables (vLLM's single-type manager), after schedule and after update."""
    shape = sim.EngineShape(num_blocks=160, block_size=16, max_num_seqs=8, layout=layout)
    scheduler = sim.build_scheduler(shape)
    analyzer = analyzer_for(scheduler)
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    specs = workloads.generate("sharegpt", 16, seed=2, max_len=600)
    for request in sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], scheduler.hash_block_size):
        scheduler.add_request(request)
    seen = []

    def check(where):
        expected = [len({b.block_id for table in m.req_to_blocks.values() for b in table if not b.is_null})
                     for m in managers]
        got = [g.used_blocks for g in analyzer.snapshot().groups]
        assert got == expected, where
        seen.append(expected)

    rng = random.Random(0)
    step = 0
    while scheduler.has_requests():
        out = scheduler.schedule()
        check(f"step {step} after schedule")
        scheduler.update_from_output(out, sim.fake_model_output(out, scheduler, rng))
        check(f"step {step} after update")
        step += 1
    assert len(managers) == 2
    assert all(any(counts[g] for counts in seen) for g in range(2)), "some group never held a block"
    assert any(counts[0] != counts[1] for counts in seen), "the groups never differed: a mix-up would pass"


# -- 4: pool methods no other test drives ---------------------------------------------


def test_reset_prefix_cache_through_the_scheduler(plugin):
    """Scheduler.reset_prefix_cache -> KVCacheManager -> coordinator -> pool: refused
    while blocks are held (nothing counted), then with the running requests
    preempted, then idle after the run. Every dropped entry is a "reset" eviction."""
    shape = sim.EngineShape(num_blocks=64, block_size=8, max_num_seqs=6, max_num_batched_tokens=256,
                            max_model_len=1024)
    scheduler = sim.build_scheduler(shape)
    analyzer = analyzer_for(scheduler)
    ledger = PoolLedger(scheduler.kv_cache_manager.block_pool)
    prompts = _prompts(seed=3, n=24, prefix_lens=[24, 32], body=(4, 60), output=(4, 30))
    for request in sim.make_requests(prompts, shape.block_size):
        scheduler.add_request(request)
    rng = random.Random(1)
    for _ in range(12):
        sim.step(scheduler, rng)
    _check_pool(analyzer, scheduler, ledger, "before reset")
    assert scheduler.reset_prefix_cache() is False  # blocks are held: vLLM refuses, nothing dropped
    _check_pool(analyzer, scheduler, ledger, "refused reset")
    assert ledger.evictions[("reset", False)] + ledger.evictions[("reset", True)] == 0
    cached_before = brute_force(scheduler)["cached_blocks"]
    assert scheduler.reset_prefix_cache(reset_running_requests=True) is True
    _check_pool(analyzer, scheduler, ledger, "reset with preemption")
    assert analyzer.snapshot().cached_blocks == 0
    first = Counter(ledger.evictions)
    assert first[("reset", False)] + first[("reset", True)] > cached_before > 0
    sim.run_to_completion(scheduler, [], on_step=lambda *_: _check_pool(analyzer, scheduler, ledger, "step"))
    assert brute_force(scheduler)["cached_blocks"] > 0
    assert scheduler.reset_prefix_cache() is True  # idle
    _check_pool(analyzer, scheduler, ledger, "idle reset")
    assert analyzer.snapshot().cached_blocks == 0 and analyzer.snapshot().free_blocks == shape.num_blocks - 1
    assert ledger.evictions[("reset", True)] > 0 and ledger.evictions[("reset", False)] > first[("reset", False)]
    _check_histograms(analyzer, ledger)


def test_evict_blocks_through_a_kv_load_failure(plugin, tmp_path):
    """A KV connector's worker reports blocks that failed to load; with the "fail"
    policy the scheduler evicts them and everything after them in the request's
    table (KVCacheManager.evict_blocks -> BlockPool.evict_blocks), held or not.
    Then KVCacheManager.evict_blocks on idle cached blocks. Both are "explicit"."""
    from vllm.config import KVTransferConfig
    from vllm.v1.outputs import KVConnectorOutput

    shape = sim.EngineShape(num_blocks=48, block_size=4, max_num_seqs=4, max_num_batched_tokens=128)
    connector = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both", kv_load_failure_policy="fail",
                                 kv_connector_extra_config={"shared_storage_path": str(tmp_path)})
    scheduler = build_variant(shape, kv_transfer_config=connector)
    analyzer = analyzer_for(scheduler)
    pool = scheduler.kv_cache_manager.block_pool
    ledger = PoolLedger(pool)
    tables = scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks
    prompts = _prompts(seed=5, n=10, prefix_lens=[12], body=(5, 14), output=(8, 16))
    requests = sim.make_requests(prompts, shape.block_size)
    for request in requests:
        scheduler.add_request(request)
    rng = random.Random(2)
    step = failed_at = 0
    while scheduler.has_requests():
        out = scheduler.schedule()
        model_output = sim.fake_model_output(out, scheduler, rng)
        victim = next((r for r in scheduler.running if r.num_computed_tokens >= 3 * shape.block_size), None)
        if not failed_at and victim is not None and step >= 3:
            # the worker could not load the victim's second block
            second_block = tables[victim.request_id][1].block_id
            model_output.kv_connector_output = KVConnectorOutput(invalid_block_ids={second_block})
            failed_at = step
        scheduler.update_from_output(out, model_output)
        _check_pool(analyzer, scheduler, ledger, f"step {step}")
        step += 1
    assert failed_at and ledger.calls["evict_blocks"] == 1
    assert ledger.held_evictions > 0  # evicted while requests still held them
    cached = [b.block_id for b in pool.blocks[1:] if b.block_hash is not None][:3]
    assert len(cached) == 3
    scheduler.kv_cache_manager.evict_blocks(set(cached))
    _check_pool(analyzer, scheduler, ledger, "idle eviction")
    assert ledger.evictions[("explicit", True)] > 0 and ledger.evictions[("explicit", False)] > 0
    _check_histograms(analyzer, ledger)
    # a block evicted while held was never idle
    assert analyzer.block_idle_duration.counts[0] >= ledger.held_evictions


def test_partial_entries_and_copy_on_write_moves(plugin):
    """A prefix-match unit (4 tokens) finer than the blocks (16) on a hybrid
    full-attention + Mamba "align" model: both managers key partly written tail
    blocks (BlockPool.cache_partial_block), and a running Mamba request that
    keyed its state block moves the entry to a copy-on-write block
    (BlockPool.move_block_hashes). Checked block by block after every step."""
    shape = sim.EngineShape(num_blocks=64, block_size=16, max_num_seqs=6, max_num_batched_tokens=256,
                            max_model_len=1024, layout="full,mamba_align")
    scheduler = build_variant(shape, prefix_match_unit=4)
    assert scheduler.hash_block_size == 4
    analyzer = analyzer_for(scheduler)
    ledger = PoolLedger(scheduler.kv_cache_manager.block_pool)
    prompts = _prompts(seed=11, n=24, prefix_lens=[36, 52], body=(3, 80), output=(2, 24))

    def check(*_):
        _check_pool(analyzer, scheduler, ledger, "step")
        got = [BLOCK_STATES[code] for code in analyzer.block_states()]
        assert got == block_states(scheduler)

    sim.run_to_completion(scheduler, sim.make_requests(prompts, scheduler.hash_block_size), on_step=check,
                          arrival_steps=[2 * i for i in range(len(prompts))])
    assert ledger.new_entries["cache_partial_block"] > 0  # blocks first keyed by a partial entry
    assert ledger.moves > 0
    assert analyzer.snapshot().cached_blocks > 0
    _check_histograms(analyzer, ledger)


def test_mamba_prefill_checkpoint_evictions_are_seen(plugin):
    """Mamba2 layers (vLLM's MambaMixer2) declare a prefill checkpoint block; with
    a prefix-match unit finer than the block, vLLM keys each checkpoint and drops
    the key of a transient one straight through the pool's private
    `_maybe_evict_cached_block`, and re-keys a checkpoint whose content changed
    (`cache_partial_block(..., replace_existing_hashes=True)`). Every dropped
    entry is an eviction, reason "replaced", counted at the step it happens (no
    self-check repair)."""
    shape = sim.EngineShape(num_blocks=64, block_size=16, max_num_seqs=6, max_num_batched_tokens=64,
                            max_model_len=1024, layout="full,mamba_align")
    scheduler = build_variant(shape, prefix_match_unit=4, mamba_checkpoints=True)
    analyzer = analyzer_for(scheduler)
    ledger = PoolLedger(scheduler.kv_cache_manager.block_pool)
    prompts = _prompts(seed=11, n=24, prefix_lens=[36, 52], body=(3, 80), output=(2, 24))
    problems = []  # per step: what was wrong, or None

    def check(*_):  # as a live exporter would: one collection per step
        try:
            _check_pool(analyzer, scheduler, ledger, f"step {len(problems)}")
            assert analyzer.snapshot().blocks_allocated_recycled == ledger.sources["recycled"], "recycled"
            problems.append(None)
        except AssertionError as exc:
            problems.append(" ".join(str(exc).split())[:160])

    sim.run_to_completion(scheduler, sim.make_requests(prompts, scheduler.hash_block_size), on_step=check,
                          arrival_steps=[2 * i for i in range(len(prompts))])
    assert [p for p in problems if p] == []
    if Version(vllm.__version__) >= Version("0.32"):  # 0.30/0.31 keep those keys on this workload
        assert ledger.calls["_maybe_evict_cached_block"] > 0  # vLLM did drop checkpoint entries directly
        assert ledger.evictions[("replaced", False)] + ledger.evictions[("replaced", True)] > 0


def test_only_pools_that_a_group_drops_entries_from_directly_carry_that_hook(plugin):
    """get_new_blocks calls `_maybe_evict_cached_block` for every block it hands
    out and counts those evictions itself: the hook that catches a Mamba
    group's direct calls sits on the pools such a group allocates from, not on
    the class (a frame per block handed out elsewhere). Unhooking takes it off."""
    method = "_maybe_evict_cached_block"
    attention = sim.build_scheduler(sim.EngineShape(num_blocks=64, block_size=16, max_num_seqs=4))
    mamba = build_variant(sim.EngineShape(num_blocks=64, block_size=16, max_num_seqs=4, max_num_batched_tokens=64,
                                          max_model_len=1024, layout="full,mamba_align"),
                          prefix_match_unit=4, mamba_checkpoints=True)
    from vllm.v1.core.block_pool import BlockPool

    assert not getattr(vars(BlockPool)[method], "__vllm_frag_otel_hook__", False)
    assert method not in vars(attention.kv_cache_manager.block_pool)
    assert getattr(vars(mamba.kv_cache_manager.block_pool)[method], "__vllm_frag_otel_hook__", False)
    plugin.uninstrument()
    try:
        assert method not in vars(mamba.kv_cache_manager.block_pool)
    finally:
        assert plugin.instrument()


def test_unpin_blocks_releases_to_the_free_list(plugin):
    """BlockPool.unpin_blocks' only caller is vLLM's HiSparse coordinator, which
    unpins GPU pages once a worker has spilled them to a host pool: that needs
    HiSparse KV-cache specs, a host pool and a GPU worker confirming spills, so
    it cannot run here. The pool method is called directly instead, on the real
    pool of a real scheduler, as the coordinator calls it: on pages the pool
    handed out, one of them with a second reader. The pool then hands the
    unpinned blocks out again (last, after every other free block)."""
    shape = sim.EngineShape(num_blocks=32, block_size=8, max_num_seqs=4, max_num_batched_tokens=256)
    scheduler = sim.build_scheduler(shape)
    analyzer = analyzer_for(scheduler)
    pool = scheduler.kv_cache_manager.block_pool
    ledger = PoolLedger(pool)
    pages = pool.get_new_blocks(6)
    pool.touch(pages[:2])  # a second reader (ref_cnt 2), as when the coordinator adopts a copy
    reused = []
    pool.unpin_blocks(pages, reused.append)
    _check_pool(analyzer, scheduler, ledger, "unpinned once")
    assert analyzer.snapshot().free_blocks == shape.num_blocks - 1 - 2
    pool.unpin_blocks(iter(pages[:2]), reused.append)  # the second reader lets go; a one-shot iterator
    _check_pool(analyzer, scheduler, ledger, "unpinned twice")
    assert analyzer.snapshot().free_blocks == shape.num_blocks - 1
    prompts = _prompts(seed=2, n=6, prefix_lens=[8], body=(60, 70), output=(4, 8))
    sim.run_to_completion(scheduler, sim.make_requests(prompts, shape.block_size),
                          on_step=lambda *_: _check_pool(analyzer, scheduler, ledger, "step"))
    assert sorted(b.block_id for b in reused) == sorted(b.block_id for b in pages)  # handed out again
    assert ledger.sources["fresh"] == analyzer.snapshot().blocks_allocated_fresh > 6


# -- 5: exported values ---------------------------------------------------------------


def _metric_points(points: dict, name: str) -> list:
    return points[name][1]


def test_delta_allocation_histogram_covers_each_window(plugin):
    """Delta temporality: each export's allocation-duration point holds exactly
    the allocate_slots calls since the previous export. Bounds come from the
    test side: each call timed around the plugin's hook (an upper bound on what
    the hook measured) and a sleep injected inside vLLM's allocate_slots,
    timed on its own (a lower bound): one 50 ms call in the first window,
    1 ms in every call of the second."""
    shape = sim.EngineShape(num_blocks=60, block_size=16, max_num_seqs=8)
    scheduler = sim.build_scheduler(shape)
    analyzer = analyzer_for(scheduler)
    pipeline = Pipeline(analyzer, {}, delta=True)
    manager = scheduler.kv_cache_manager
    calls = []  # per allocate_slots call: (outcome, time around the hook, time slept inside vLLM)
    sleep = {"each": 0.0, "once": 0.0, "inside": False, "slept": 0.0}
    allocate, remove_skipped = manager.allocate_slots, manager.coordinator.remove_skipped_blocks

    def sleepy_remove_skipped(*args, **kwargs):  # runs inside vLLM's allocate_slots
        if sleep["inside"]:
            wanted, sleep["once"] = max(sleep["each"], sleep["once"]), 0.0
            if wanted:
                start = time.perf_counter()
                time.sleep(wanted)
                sleep["slept"] += time.perf_counter() - start
        return remove_skipped(*args, **kwargs)

    def timed_allocate(*args, **kwargs):
        sleep["inside"], sleep["slept"] = True, 0.0
        start = time.perf_counter()
        try:
            result = allocate(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            sleep["inside"] = False
        calls.append(("success" if result is not None else "failure", elapsed, sleep["slept"]))
        return result

    manager.coordinator.remove_skipped_blocks = sleepy_remove_skipped
    manager.allocate_slots = timed_allocate
    specs = workloads.generate("sharegpt", 30, seed=3, max_len=700)
    for request in sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], shape.block_size):
        scheduler.add_request(request)
    rng = random.Random(0)

    def window(steps: int) -> tuple[list, dict]:
        first = len(calls)
        for _ in range(steps):
            sim.step(scheduler, rng)
        return calls[first:], pipeline.collect()

    sleep["once"] = 0.05
    windows = [window(25)]  # the first export holds every call since the pool was built
    sleep["each"] = 0.001
    windows.append(window(20))
    assert {o for o, _, _ in windows[0][0]} == {"success", "failure"}  # both outcomes in the first window
    for i, (window_calls, points) in enumerate(windows):
        for point in _metric_points(points, "vllm.kv_cache.allocation.duration"):
            outcome = point.attributes["vllm.kv_cache.allocation.outcome"]
            mine = [(outer, slept) for o, outer, slept in window_calls if o == outcome]
            where = f"export {i + 1}, {outcome}"
            assert point.count == len(mine) == sum(point.bucket_counts), where
            if not mine:
                continue
            outer = [t for t, _ in mine]
            slept = [s for _, s in mine]
            assert min(slept) <= point.min <= min(outer), where
            assert max(slept) <= point.max <= max(outer), where
            assert sum(slept) <= point.sum <= sum(outer), where
            assert point.count * point.min <= point.sum * (1 + 1e-9) <= point.count * point.max * (1 + 2e-9)
            # no value below the least any call slept: those buckets are empty
            floor = int(np.searchsorted(ALLOCATION_BUCKETS, min(slept), side="left"))
            assert sum(point.bucket_counts[:floor]) == 0, where
    success = [p for p in _metric_points(windows[1][1], "vllm.kv_cache.allocation.duration")
               if p.attributes["vllm.kv_cache.allocation.outcome"] == "success"][0]
    assert success.count and success.min >= 0.0009  # the first window's fast calls are not in the second
    pipeline.provider.shutdown()


def test_active_and_hook_errors_follow_the_guard(plugin, monkeypatch):
    """hook.errors is the number of failures injected into a hook; active is 1
    until the guard has contained max_errors of them, then 0 (and the hooks
    stop calling in, so no further failure is injected or counted)."""
    g = guard()
    monkeypatch.setattr(g, "active", True)
    monkeypatch.setattr(g, "errors", 0)
    monkeypatch.setattr(g, "max_errors", 5)
    scheduler = sim.build_scheduler(sim.EngineShape(num_blocks=80, block_size=16, max_num_seqs=8))
    analyzer = analyzer_for(scheduler)
    pipeline = Pipeline(analyzer, {})
    specs = workloads.generate("alpaca", 40, seed=1)
    for request in sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], 16):
        scheduler.add_request(request)
    injected = {"budget": 0, "raised": 0}
    record = analyzer.on_blocks_allocated

    def failing_on_blocks_allocated(*args, **kwargs):  # called by the get_new_blocks hook
        if injected["budget"]:
            injected["budget"] -= 1
            injected["raised"] += 1
            raise RuntimeError("injected hook failure")
        return record(*args, **kwargs)

    monkeypatch.setattr(analyzer, "on_blocks_allocated", failing_on_blocks_allocated)
    rng = random.Random(0)

    def exported() -> tuple[int, int]:
        points = pipeline.collect()
        (active,) = _metric_points(points, "vllm.frag_otel.active")
        (errors,) = _metric_points(points, "vllm.frag_otel.hook.errors")
        return active.value, errors.value

    sim.step(scheduler, rng)
    assert exported() == (1, 0)
    injected["budget"] = 3
    while injected["budget"] and scheduler.has_requests():
        sim.step(scheduler, rng)
    assert injected["raised"] == 3 and exported() == (1, 3)
    injected["budget"] = 100
    while g.active and scheduler.has_requests():
        sim.step(scheduler, rng)
    assert injected["raised"] == g.max_errors  # the guard stopped the hooks calling in at its limit
    assert exported() == (0, injected["raised"])
    while scheduler.has_requests():  # vLLM runs on untouched
        sim.step(scheduler, rng)
    assert exported() == (0, injected["raised"])
    pipeline.provider.shutdown()


def test_span_block_peak_on_a_sliding_window(traced):  # noqa: F811
    """On a sliding-window layout a request's held blocks fall once its prompt
    is computed (blocks outside the window go back to the pool): the span's
    block peak is the most it held at once, across groups, not what it ended with."""
    runtime, exporter, _ = traced()
    shape = sim.EngineShape(num_blocks=400, block_size=16, max_num_seqs=8, layout="full,sliding_window:32")
    scheduler = sim.build_scheduler(shape)
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    prompts = _prompts(seed=4, n=10, prefix_lens=[48], body=(100, 300), output=(2, 12))
    requests = sim.make_requests(prompts, shape.block_size)
    peak, last = Counter(), {}

    def held(request_id: str) -> int:
        return sum(sum(1 for b in m.req_to_blocks.get(request_id, ()) if not b.is_null) for m in managers)

    for request in requests:
        scheduler.add_request(request)
    rng = random.Random(0)
    while scheduler.has_requests():
        out = scheduler.schedule()  # allocation happens here
        for request_id in out.num_scheduled_tokens:
            peak[request_id] = max(peak[request_id], held(request_id))
            last[request_id] = held(request_id)
        scheduler.update_from_output(out, sim.fake_model_output(out, scheduler, rng))
    runtime.force_flush()
    spans = {s.attributes["vllm.request.id"]: s for s in exporter.get_finished_spans()}
    assert set(spans) == {r.request_id for r in requests}
    assert sum(r.num_preemptions for r in requests) == 0  # every allocation is seen by the step loop above
    for request in requests:
        assert spans[request.request_id].attributes["vllm.kv_cache.block.peak"] == peak[request.request_id]
    assert any(peak[r] > last[r] for r in peak)


def test_a_compiled_hook_passes_every_argument_and_default_on_unchanged():
    """The hottest hooks take the original's own parameters (no *args/**kwargs
    on the hot path): positional, keyword, defaults, keyword-only and varargs
    must all reach the original as given."""
    from vllm_frag_otel.plugin.hooks import _compile, _Forwarder

    def original(self, a, b=[1], /, c=None, *rest, d, e=(), **extra):
        return self, a, b, c, rest, d, e, extra

    hooked = _compile(original, _Forwarder("return original({arguments})"))
    default_b, default_e = original.__defaults__[0], original.__kwdefaults__["e"]
    assert hooked("s", 1, d=2) == ("s", 1, default_b, None, (), 2, default_e, {})
    assert hooked("s", 1, 2, 3, 4, 5, d=6, e=7, f=8) == ("s", 1, 2, 3, (4, 5), 6, 7, {"f": 8})
    assert hooked("s", 1, c=3, d=4)[3] == 3
    with pytest.raises(TypeError):
        hooked("s", a=1, d=2)  # positional-only stays positional-only

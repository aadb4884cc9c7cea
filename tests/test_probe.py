"""The start-up probe (vllm_frag_otel.plugin.probe) on the installed vLLM, and on
fakes of a newer vLLM whose hook points keep their names and parameters but
change what they do.

Each fake is a change vLLM could ship that leaves vLLM itself correct; each
makes the real ledger wrong, which the old version gate (names and parameters
only) would have let through: its second test runs vLLM with the probe
switched off and finds a number the plugin would have exported wrong.
"""

from __future__ import annotations

import gc
import logging
import random
import re
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import vllm
from oracle import brute_force
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from vllm_frag_otel import analyzer_for
from vllm_frag_otel.export import telemetry
from vllm_frag_otel.plugin import hooks, probe
from vllm_frag_otel.plugin.versions import SUPPORTED_VLLM
from vllm_frag_otel.sim import simulator as sim

NEWER_VLLM = "0.99.0"


@pytest.fixture
def probing(monkeypatch):
    """What `instrument()` sets around the probe: managers built meanwhile start no telemetry."""
    monkeypatch.setattr(hooks.probing, "active", True)


@pytest.fixture
def vllm_changed(plugin, monkeypatch):
    """vLLM uninstrumented, for the test to change (through the monkeypatch it
    gets) and instrument; afterwards vLLM's own classes, instrumented again."""
    max_errors = hooks.guard().max_errors
    hooks.instrumentor.uninstrument()
    monkeypatch.setattr(hooks.instrumentor, "_warned", False)  # its warnings are once per process
    yield monkeypatch
    hooks.instrumentor.uninstrument()
    monkeypatch.undo()
    assert hooks.instrumentor.instrument(max_hook_errors=max_errors)


def _hooked_methods() -> list[str]:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    return [f"{cls.__name__}.{name}" for cls in (BlockPool, KVCacheManager, Scheduler)
            for name, value in vars(cls).items() if hasattr(value, "__vllm_frag_otel_hook__")]


# -- the installed vLLM --------------------------------------------------------------


def test_the_probe_finds_the_ledger_exact_on_the_installed_vllm(plugin, probing):
    assert probe.first_difference() is None


def test_the_probe_starts_no_telemetry_and_keeps_nothing(plugin, probing, monkeypatch):
    def attach(*args):
        raise AssertionError("the probe's KV-cache manager started telemetry")

    monkeypatch.setattr(telemetry, "attach", attach)
    built: list[weakref.ref] = []

    class Watched(probe._ScriptedRun):
        def __init__(self) -> None:
            super().__init__()
            built.extend(weakref.ref(o) for o in (self.manager, self.manager.block_pool, self.second_pool))

    monkeypatch.setattr(probe, "_ScriptedRun", Watched)
    errors = hooks.guard().errors
    assert probe.first_difference() is None
    assert hooks.guard().errors == errors
    gc.collect()
    assert len(built) == 3 and all(ref() is None for ref in built)


def test_the_probe_costs_little_at_start_up(plugin, probing):
    probe.first_difference()  # vLLM's lazily built parts, once
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        probe.first_difference()
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 0.05  # the target; on the 2-core VM ~9 ms cold, ~4 ms warm


def test_the_plugin_probes_only_an_untested_vllm(vllm_changed):
    calls = []
    vllm_changed.setattr(probe, "first_difference", lambda: calls.append(hooks.probing.active))
    assert hooks.instrumentor.instrument()
    tested = Version(Version(vllm.__version__).base_version) in SpecifierSet(SUPPORTED_VLLM)
    assert calls == ([] if tested else [True])
    assert not hooks.probing.active


def test_an_untested_vllm_that_passes_the_probe_is_instrumented(vllm_changed, caplog):
    vllm_changed.setattr(vllm, "__version__", NEWER_VLLM)
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        assert hooks.instrumentor.instrument()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "vllm.frag_otel"]
    assert f"vLLM {NEWER_VLLM} is newer" in warning and "kept the ledger exact" in warning
    assert "BlockPool.free_blocks" in _hooked_methods() and not hooks.probing.active


# -- the comparison fails when a hook is wrong -------------------------------------------


def test_the_probe_finds_a_hook_that_does_not_know_its_pools_blocks(plugin, probing, monkeypatch):
    monkeypatch.setattr(hooks, "_owned", lambda pool_blocks, block: False)
    assert probe.first_difference() == (
        "after partial, moved and evicted entries in the second pool: a second pool: evictions 1 in the ledger, "
        "2 in vLLM"
    )


# The release hook before issue 21: it told the pool's own blocks by `block.pool is self`.
_RELEASE_BEFORE_ISSUE_21 = hooks._Forwarder(hooks._POOL_STATE + """
    {first} = list({first})
    result = original({arguments})
    with state.lock:
        state.on_blocks_released(
            [b.block_id for b in {first} if b.ref_cnt == 0 and not b.is_null and getattr(b, "pool", self) is self],
            monotonic(),
        )
    return result
""")


def test_the_probe_refuses_the_release_hook_that_dropped_every_free_on_vllm_0_34(vllm_changed, probing):
    """vLLM 0.34's blocks hold a weak reference to their pool: that hook counted no free at all."""
    from vllm.v1.core.block_pool import BlockPool

    for point in ("BlockPool.free_blocks", "BlockPool.unpin_blocks"):
        vllm_changed.setitem(hooks.WRAPPERS, point, _RELEASE_BEFORE_ISSUE_21)
    assert hooks.instrumentor.instrument()
    difference = probe.first_difference()
    if isinstance(BlockPool(2, True, 4).blocks[1].pool, weakref.ref):
        assert difference == (
            "after freeing request A: the KV-cache manager's pool: free blocks 17, the allocator has 22")
    else:  # up to 0.33 a block holds its pool: that hook was right
        assert difference is None


# -- fakes of a newer vLLM: same hook points, another meaning ------------------------


def _frees_applied_later(monkeypatch) -> None:
    """free_blocks queues the blocks; the pool releases them (dropping the
    references, refilling the free queue) in one pass when it next counts or
    hands out blocks. The hook, after free_blocks, finds every block still
    referenced: the ledger never sees a block freed."""
    from vllm.v1.core.block_pool import BlockPool

    free_blocks, get_new_blocks, get_num_free_blocks = (
        BlockPool.__dict__[name] for name in ("free_blocks", "get_new_blocks", "get_num_free_blocks"))

    def release_queued(pool) -> None:
        for blocks, args, kwargs in pool.__dict__.pop("_queued_frees", ()):
            free_blocks(pool, blocks, *args, **kwargs)

    def queue_frees(self, ordered_blocks, *args, **kwargs):
        self.__dict__.setdefault("_queued_frees", []).append((list(ordered_blocks), args, kwargs))

    def count_free(self):
        release_queued(self)
        return get_num_free_blocks(self)

    def hand_out(self, num_blocks):
        release_queued(self)
        return get_new_blocks(self, num_blocks)

    monkeypatch.setattr(BlockPool, "free_blocks", queue_frees)
    monkeypatch.setattr(BlockPool, "get_num_free_blocks", count_free)
    monkeypatch.setattr(BlockPool, "get_new_blocks", hand_out)


def _prefix_hits_acquire_without_touch(monkeypatch) -> None:
    """A prefix hit's blocks are taken by a new pool method, `acquire_cached`,
    which the KV-cache managers call instead of touch (touch stays, for other
    callers). The ledger never sees a hit: hit blocks taken off the free list
    stay free in it."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager

    touch = BlockPool.__dict__["touch"]
    add_local_computed_blocks = SingleTypeKVCacheManager.__dict__["add_local_computed_blocks"]
    monkeypatch.setattr(BlockPool, "acquire_cached", touch, raising=False)

    def add_hit_blocks(self, *args, **kwargs):
        pool = self.block_pool
        pool.touch = pool.acquire_cached  # the managers' calls name the new method
        try:
            return add_local_computed_blocks(self, *args, **kwargs)
        finally:
            del pool.touch

    monkeypatch.setattr(SingleTypeKVCacheManager, "add_local_computed_blocks", add_hit_blocks)


def _cache_entries_inserted_later(monkeypatch) -> None:
    """cache_full_blocks queues the new prefix-cache entries; the pool inserts
    them when it next looks a hash up, hands out or frees blocks (no work for
    a request that finishes before anyone looks). The hook, after
    cache_full_blocks, finds no hash: the ledger never sees a block cached."""
    from vllm.v1.core.block_pool import BlockPool

    cache_full_blocks, get_cached_block, get_new_blocks, free_blocks = (
        BlockPool.__dict__[name] for name in ("cache_full_blocks", "get_cached_block", "get_new_blocks", "free_blocks"))

    def insert_queued(pool) -> None:
        for args, kwargs in pool.__dict__.pop("_queued_entries", ()):
            cache_full_blocks(pool, *args, **kwargs)

    def queue_entries(self, request, blocks, num_cached_blocks, num_full_blocks, *args, **kwargs):
        entry = ((request, list(blocks), num_cached_blocks, num_full_blocks, *args), kwargs)
        self.__dict__.setdefault("_queued_entries", []).append(entry)

    def look_up(self, *args, **kwargs):
        insert_queued(self)
        return get_cached_block(self, *args, **kwargs)

    def hand_out(self, num_blocks):
        insert_queued(self)
        return get_new_blocks(self, num_blocks)

    def free(self, ordered_blocks, *args, **kwargs):
        insert_queued(self)
        return free_blocks(self, ordered_blocks, *args, **kwargs)

    monkeypatch.setattr(BlockPool, "cache_full_blocks", queue_entries)
    monkeypatch.setattr(BlockPool, "get_cached_block", look_up)
    monkeypatch.setattr(BlockPool, "get_new_blocks", hand_out)
    monkeypatch.setattr(BlockPool, "free_blocks", free)


def _evicting_ahead(monkeypatch) -> None:
    """get_new_blocks also drops the entries of the blocks next in the free
    queue, so the next allocation finds them clean. It evicts them through
    `_maybe_evict_cached_block` while get_new_blocks runs, where the hook
    leaves the counting to get_new_blocks, which counts only the blocks it
    hands out: the ledger keeps them cached."""
    from vllm.v1.core.block_pool import BlockPool

    get_new_blocks = BlockPool.__dict__["get_new_blocks"]

    def hand_out_evicting_ahead(self, num_blocks):
        blocks = get_new_blocks(self, num_blocks)
        if self.enable_caching:
            queue = self.free_block_queue
            block = queue.fake_free_list_head.next_free_block
            for _ in range(num_blocks):
                if block is None or block is queue.fake_free_list_tail:
                    break
                self._maybe_evict_cached_block(block)
                block = block.next_free_block
        return blocks

    monkeypatch.setattr(BlockPool, "get_new_blocks", hand_out_evicting_ahead)


def _other_pools_blocks_released_directly(monkeypatch) -> None:
    """free_blocks sorts blocks by the pool each names (0.34: through a weak
    reference) and releases another pool's blocks through that pool's shared
    release code, not its free_blocks: the other pool's ledger never sees them freed."""
    from vllm.v1.core.block_pool import BlockPool

    release = BlockPool.__dict__["free_blocks"]

    def free_by_owner(self, ordered_blocks, *args, **kwargs):
        by_owner: dict = {}
        for block in ordered_blocks:
            owner = block.pool() if isinstance(block.pool, weakref.ref) else block.pool
            by_owner.setdefault(owner if owner is not None else self, []).append(block)
        for owner, blocks in by_owner.items():
            release(owner, blocks, *args, **kwargs)

    monkeypatch.setattr(BlockPool, "free_blocks", free_by_owner)


def _wrong_in_serving() -> str | None:
    """The first number the plugin exported wrong while a real scheduler served
    shared prefixes through a small pool (hits on freed blocks, evictions)."""
    shape = sim.EngineShape(num_blocks=40, block_size=8, max_num_seqs=4, max_num_batched_tokens=256,
                            max_model_len=1024)
    rng = random.Random(3)
    prefix = [rng.randrange(3, 30000) for _ in range(40)]
    prompts = [((prefix if i % 2 == 0 else []) + [rng.randrange(3, 30000) for _ in range(rng.randint(8, 80))],
                rng.randint(2, 20)) for i in range(16)]
    scheduler = sim.build_scheduler(shape)
    analyzer = analyzer_for(scheduler)
    wrong: list[str] = []

    def compare(*_) -> None:
        snapshot, expected = analyzer.snapshot(), brute_force(scheduler)
        wrong.extend(f"{name} {getattr(snapshot, name)}, vLLM {expected[name]}"
                     for name in ("free_blocks", "used_blocks", "cached_blocks")
                     if getattr(snapshot, name) != expected[name])

    sim.run_to_completion(scheduler, sim.make_requests(prompts, shape.block_size), on_step=compare,
                          arrival_steps=[3 * i for i in range(len(prompts))])
    return wrong[0] if wrong else None


def _wrong_with_two_pools() -> str | None:
    """A table holding another pool's blocks (a HiSparse host group) freed through the engine's pool."""
    from vllm.v1.core.block_pool import BlockPool

    pool, other = BlockPool(16, True, 4), BlockPool(16, True, 4)
    pool.free_blocks(other.get_new_blocks(3))
    exported, actual = analyzer_for(other).snapshot().free_blocks, other.get_num_free_blocks()
    return f"free_blocks {exported}, vLLM {actual}" if exported != actual else None


@dataclass(frozen=True)
class MeaningChange:
    install: Callable[[pytest.MonkeyPatch], None]
    difference: str  # what the probe finds first (a regular expression)
    wrong_export: Callable[[], str | None]  # what the plugin would have exported wrong without the probe


CHANGES = {
    "frees applied later": MeaningChange(
        _frees_applied_later,
        r"after freeing request A: the KV-cache manager's pool: free blocks 17, the allocator has 22",
        _wrong_in_serving,
    ),
    "prefix hits acquired without touch": MeaningChange(
        _prefix_hits_acquire_without_touch,
        r"after request B's prefix hit on A's blocks: the KV-cache manager's pool: "
        r"blocks_prefix_hit 0 in the ledger, 5 in vLLM",
        _wrong_in_serving,
    ),
    "cache entries inserted later": MeaningChange(
        _cache_entries_inserted_later,
        r"after request B's prefix hit on A's blocks: the KV-cache manager's pool: block 1 free=False cached=False, "
        r"the allocator has free=False cached=True",
        _wrong_in_serving,
    ),
    "evicting ahead": MeaningChange(
        _evicting_ahead,
        r"after an allocation that evicts cached blocks: the KV-cache manager's pool: block \d+ free=True cached=True, "
        r"the allocator has free=True cached=False",
        _wrong_in_serving,
    ),
    "other pools' blocks released directly": MeaningChange(
        _other_pools_blocks_released_directly,
        r"after a second pool's blocks freed through the first pool: a second pool: free blocks 5, the allocator has 7",
        _wrong_with_two_pools,
    ),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_newer_vllm_whose_hook_points_changed_meaning_is_refused_with_one_warning(change, vllm_changed, caplog):
    CHANGES[change].install(vllm_changed)
    vllm_changed.setattr(vllm, "__version__", NEWER_VLLM)
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        assert not hooks.instrumentor.instrument()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "vllm.frag_otel"]
    assert warning.startswith(f"vllm-frag-otel: not instrumenting vLLM: vLLM {NEWER_VLLM} is newer than the versions")
    expected = r"does not behave as the plugin expects: " + CHANGES[change].difference + r"\. vLLM runs untouched"
    assert re.search(expected, warning), warning
    assert _hooked_methods() == [] and not hooks.probing.active


@pytest.mark.parametrize("change", CHANGES)
def test_without_the_probe_the_plugin_would_have_exported_wrong_numbers(change, vllm_changed):
    CHANGES[change].install(vllm_changed)
    vllm_changed.setattr(vllm, "__version__", NEWER_VLLM)
    vllm_changed.setattr(probe, "first_difference", lambda: None)  # the version gate before the probe
    assert hooks.instrumentor.instrument()
    assert CHANGES[change].wrong_export() is not None


def test_a_newer_vllm_on_which_a_hook_raises_is_refused_even_with_exact_numbers(vllm_changed, caplog):
    """A hook error is contained and counted, so the ledger can still be right:
    the probe counts the error as a difference all the same."""
    from vllm_frag_otel.core.state import KVCacheState

    on_prefix_lookup = KVCacheState.on_prefix_lookup

    def counted_then_raises(self, *args):
        on_prefix_lookup(self, *args)
        raise KeyError("a renamed attribute")

    vllm_changed.setattr(KVCacheState, "on_prefix_lookup", counted_then_raises)
    vllm_changed.setattr(vllm, "__version__", NEWER_VLLM)
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        assert not hooks.instrumentor.instrument()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "vllm.frag_otel"]
    assert "does not behave as the plugin expects: its hooks raised 1 error(s) in the scripted run" in warning
    assert _hooked_methods() == []

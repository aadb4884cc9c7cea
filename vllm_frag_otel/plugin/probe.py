"""The start-up probe: a short scripted run through the installed vLLM's own
block pools and KV-cache manager, hooks on, comparing the ledger with vLLM's
state after every phase.

The version gate compares hook points' names and parameters, but a release can
change what a method does and keep both (vLLM 0.34: a block's `pool` became a
weak reference, and the hook that told a pool's own blocks from another's by
it stopped counting frees). So before instrumenting a vLLM newer than the
tested ones, the hooks meet what that vLLM really does (10-20 ms cold on a
2-core VM, ~5 ms warm).

The caller (`KVCacheInstrumentor.instrument`) sets `hooks.probing` for the
run: the manager built here starts no telemetry. Everything built here is
dropped when the run returns.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from vllm_frag_otel import analyzer_for
from vllm_frag_otel.core.state import FragmentationSnapshot, KVCacheState

BLOCK_SIZE = 4
SLIDING_WINDOW = 2 * BLOCK_SIZE  # tokens
NUM_BLOCKS = 32  # the manager's pool, null block included
SECOND_POOL_BLOCKS = 8
MAX_MODEL_LEN = 64

PROMPT_A = list(range(1000, 1020))  # 5 blocks
PROMPT_B = PROMPT_A[: 3 * BLOCK_SIZE] + list(range(2000, 2006))  # A's first 3 blocks, then its own
# 10 blocks a group: of the 22 blocks free by then, the 17 without a cache entry and 3 cached ones
PROMPT_C = list(range(3000, 3040))

# What the ledger counts from the hooks, counted here from vLLM's blocks.
EVENT_COUNTS = ("evictions", "blocks_allocated_fresh", "blocks_allocated_recycled", "blocks_prefix_hit")


def first_difference() -> str | None:
    """Where the ledger first disagreed with vLLM in the scripted run ("after
    PHASE: WHAT"), or None. Never raises: a run that fails is a difference too,
    as the plugin cannot then vouch for its hooks."""
    try:
        return _ScriptedRun().first_difference()
    except Exception as exc:
        return f"the scripted run failed ({type(exc).__name__}: {exc})"


class _WatchedPool:
    """One block pool and its ledger, and what its blocks went through, counted
    from vLLM's block objects around each scripted call (not from the hooks)."""

    def __init__(self, name: str, pool) -> None:
        self.name = name
        self.pool = pool
        self.state: KVCacheState = analyzer_for(pool)
        self.events: Counter[str] = Counter()

    def read(self) -> list[tuple[int, Any]]:
        return [(b.ref_cnt, b.block_hash) for b in self.pool.blocks]

    def count(self, before: list[tuple[int, Any]]) -> None:
        """Count what one call did, from each block's reference count and hash
        before and after it (the null block's are not maintained). An entry
        that went to another block moved; one that changed on a held block
        grew in place (a partial entry promoted); any other lost entry was
        evicted."""
        blocks = list(zip(self.pool.blocks[1:], before[1:]))
        new_entries = {b.block_hash for b, (_, old) in blocks if b.block_hash is not None and b.block_hash != old}
        for block, (ref_cnt, block_hash) in blocks:
            lost_entry = block_hash is not None and block.block_hash != block_hash
            grew = ref_cnt > 0 and block.block_hash is not None
            self.events["evictions"] += lost_entry and block_hash not in new_entries and not grew
            gained = block.ref_cnt - ref_cnt
            if gained <= 0:
                continue
            if ref_cnt == 0 and block_hash is None:
                self.events["blocks_allocated_fresh"] += 1
            elif ref_cnt == 0 and lost_entry:
                self.events["blocks_allocated_recycled"] += 1
            else:  # a cached block gained a holder
                self.events["blocks_prefix_hit"] += gained

    def difference(self, snapshot: FragmentationSnapshot) -> str | None:
        """The first block flag or count of this pool the ledger (its `snapshot`) has wrong."""
        blocks = self.pool.blocks[1:]
        num_free = self.pool.get_num_free_blocks()
        drift = self.state.drift(num_free, [(b.block_id, b.ref_cnt == 0, b.block_hash is not None) for b in blocks])
        if drift:
            return f"{self.name}: {drift[0]}"
        expected = {
            "free_blocks": num_free,
            "used_blocks": sum(b.ref_cnt > 0 for b in blocks),
            "cached_blocks": sum(b.ref_cnt == 0 and b.block_hash is not None for b in blocks),
            **{name: self.events[name] for name in EVENT_COUNTS},
        }
        for name, value in expected.items():
            if getattr(snapshot, name) != value:
                return f"{self.name}: {name} {getattr(snapshot, name)} in the ledger, {value} in vLLM"
        return None


class _ScriptedRun:
    """A KV-cache manager over full-attention and sliding-window groups, its
    pool and a second pool, driven as a scheduler would drive them."""

    def __init__(self) -> None:
        import torch
        from vllm.v1.core.block_pool import BlockPool
        from vllm.v1.core.kv_cache_manager import KVCacheManager
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec

        attention = {"block_size": BLOCK_SIZE, "num_kv_heads": 1, "head_size": 1, "dtype": torch.float32}
        config = KVCacheConfig(
            num_blocks=NUM_BLOCKS,
            kv_cache_tensors=[],
            kv_cache_groups=[
                KVCacheGroupSpec(["probe.full"], FullAttentionSpec(**attention)),
                KVCacheGroupSpec(["probe.sliding"], SlidingWindowSpec(**attention, sliding_window=SLIDING_WINDOW)),
            ],
        )
        # only arguments every release since 0.30 takes under these names (the optional ones moved)
        self.manager = KVCacheManager(
            kv_cache_config=config, max_model_len=MAX_MODEL_LEN, scheduler_block_size=BLOCK_SIZE,
            hash_block_size=BLOCK_SIZE, enable_caching=True, log_stats=True,
        )
        self.second_pool = BlockPool(SECOND_POOL_BLOCKS, True, BLOCK_SIZE)
        self.pools = (
            _WatchedPool("the KV-cache manager's pool", self.manager.block_pool),
            _WatchedPool("a second pool", self.second_pool),
        )
        self.second_pool_blocks: list = []
        self.requests: dict[str, Any] = {}  # the running requests, by id, as the scheduler keeps them
        self.pools[0].state.attach_requests(self.requests)

    def first_difference(self) -> str | None:
        phases: Sequence[tuple[str, Callable[[], str | None]]] = (
            ("allocating request A", self._allocate_a),
            ("request B's prefix hit on A's blocks", self._prefix_hit_b),
            ("freeing request A", self._free_a),
            ("an allocation that evicts cached blocks", self._evict),
            ("request B decoding past its sliding window", self._slide_b),
            ("freeing every request", self._free_all),
            ("a second pool's blocks freed through the first pool", self._free_through_first_pool),
            ("a prefix hit in the second pool", self._hit_second_pool),
            ("partial, moved and evicted entries in the second pool", self._entries_in_second_pool),
        )
        for phase, run in phases:
            difference = run() or self._difference()
            if difference:
                return f"after {phase}: {difference}"
        return None

    def _call(self, method: Callable, *args, **kwargs) -> Any:
        """A scripted call into vLLM, its block events counted from the blocks."""
        before = [watched.read() for watched in self.pools]
        result = method(*args, **kwargs)
        for watched, blocks in zip(self.pools, before):
            watched.count(blocks)
        return result

    # -- phases: each returns what went other than scripted, if anything ----------

    def _allocate_a(self) -> str | None:
        return self._prefill(_request("A", PROMPT_A))

    def _prefix_hit_b(self) -> str | None:
        b = _request("B", PROMPT_B)
        computed_blocks, hit_tokens = self._call(self.manager.get_computed_blocks, b)[:2]
        if not hit_tokens:
            return "request B found none of the prompt it shares with A cached"
        self._call(self.manager.record_prefix_cache_stats, b, hit_tokens)
        return self._prefill(b, hit_tokens, computed_blocks)

    def _free_a(self) -> None:
        self._call(self.manager.free, self.requests.pop("A"))

    def _evict(self) -> str | None:
        evictions = self.pools[0].events["evictions"]
        failed = self._prefill(_request("C", PROMPT_C))
        if not failed and self.pools[0].events["evictions"] == evictions:
            return "request C's allocation evicted no cached block"
        return failed

    def _slide_b(self) -> str | None:
        """One decode step (vLLM retires the entry that left the window in
        allocate_slots), then a KV connector's call retiring the next one."""
        b = self.requests["B"]
        sliding = self.manager.coordinator.single_type_managers[1].req_to_blocks["B"]
        retired = sum(block.is_null for block in sliding)
        b.append_output_token_ids(4000)
        if self._call(self.manager.allocate_slots, b, 1) is None:
            return "request B's decode step got no slots"
        b.num_computed_tokens += 1
        self._call(self.manager.remove_skipped_blocks, b.request_id, b.num_computed_tokens)
        if sum(block.is_null for block in sliding) == retired:
            return f"request B's sliding-window table is {[block.block_id for block in sliding]}: no entry was retired"
        return None

    def _free_all(self) -> None:
        for request_id in list(self.requests):
            self._call(self.manager.free, self.requests.pop(request_id))

    def _free_through_first_pool(self) -> None:
        """A block table can hold another pool's blocks: vLLM hands them to their own pool."""
        blocks = self._call(self.second_pool.get_new_blocks, 2)
        self._call(self.second_pool.cache_full_blocks, _request("D", PROMPT_A), blocks, 0, 2, BLOCK_SIZE, 0)
        self._call(self.manager.block_pool.free_blocks, reversed(blocks))
        self.second_pool_blocks = blocks

    def _hit_second_pool(self) -> None:
        hit = self.second_pool_blocks[:1]
        self._call(self.second_pool.touch, hit)
        self._call(self.second_pool.free_blocks, hit)

    def _entries_in_second_pool(self) -> None:
        """Entries a finer prefix-match unit or a Mamba state makes: a partial
        block's entry, moved to a copy of the block, dropped when the copy is
        overwritten in place; and a KV connector invalidating a cached block."""
        pool = self.second_pool
        source, copy = self._call(pool.get_new_blocks, 2)
        self._call(pool.cache_partial_block, _request("D", PROMPT_A), source, BLOCK_SIZE, 0, 2 * BLOCK_SIZE)
        self._call(pool.move_block_hashes, source, copy)
        self._call(pool._maybe_evict_cached_block, copy)
        self._call(pool.evict_blocks, {self.second_pool_blocks[1].block_id})
        self._call(pool.free_blocks, [source, copy])

    # -- helpers -------------------------------------------------------------------

    def _prefill(self, request, hit_tokens: int = 0, computed_blocks=None) -> str | None:
        """The whole prompt in one step, after the prefix hit's tokens; the request runs."""
        new_tokens = request.num_tokens - hit_tokens
        if self._call(self.manager.allocate_slots, request, new_tokens, hit_tokens, computed_blocks) is None:
            return f"request {request.request_id} got no slots for its {request.num_tokens} tokens"
        request.num_computed_tokens = request.num_tokens
        self.requests[request.request_id] = request
        return None

    def _difference(self) -> str | None:
        snapshots = [watched.state.snapshot() for watched in self.pools]
        for watched, snapshot in zip(self.pools, snapshots):
            difference = watched.difference(snapshot)
            if difference:
                return difference
        return self._manager_difference(snapshots[0])

    def _manager_difference(self, snapshot: FragmentationSnapshot) -> str | None:
        """Per group, the blocks the requests' tables hold and the token slots
        they computed; the prefix-cache tokens vLLM's stats counted."""
        managers = self.manager.coordinator.single_type_managers
        for group, (layout, manager) in enumerate(zip(snapshot.groups, managers)):
            fill: dict[int, int] = {}  # held block -> the most tokens a holder computed in it
            for request_id, table in manager.req_to_blocks.items():
                request = self.requests.get(request_id)
                computed = request.num_computed_tokens if request is not None else 0
                for i, block in enumerate(table):
                    if not block.is_null:
                        tokens = min(BLOCK_SIZE, max(0, computed - i * BLOCK_SIZE))
                        fill[block.block_id] = max(fill.get(block.block_id, 0), tokens)
            for name, value in (("used_blocks", len(fill)), ("used_slots", sum(fill.values()))):
                ledger = getattr(layout, name)
                if ledger != value:
                    return f"group {group} ({layout.kind}): {name} {ledger} in the ledger, {value} in vLLM"
        stats = self.manager.prefix_cache_stats
        for name, value in (("prefix_queried_tokens", stats.queries), ("prefix_hit_tokens", stats.hits)):
            if getattr(snapshot, name) != value:
                return f"{name} {getattr(snapshot, name)} in the ledger, {value} in vLLM's prefix-cache stats"
        return None


def _request(request_id: str, prompt: list[int]):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    return Request(
        request_id=request_id, prompt_token_ids=list(prompt), sampling_params=SamplingParams(max_tokens=8),
        pooling_params=None, block_hasher=_block_hashes,
    )


def _block_hashes(request) -> list[bytes]:
    """The hashes of the request's full blocks not hashed yet, each chained over
    its prefix. vLLM's own hasher reads a process-wide seed (`NONE_HASH`) that
    its engine sets later, from its configuration: the probe must not set it."""
    tokens = request.all_token_ids
    hashes: list[bytes] = []
    parent = request.block_hashes[-1] if request.block_hashes else b""
    for start in range(len(request.block_hashes) * BLOCK_SIZE, len(tokens) - BLOCK_SIZE + 1, BLOCK_SIZE):
        parent = hashlib.sha256(parent + repr(tuple(tokens[start : start + BLOCK_SIZE])).encode()).digest()
        hashes.append(parent)
    return hashes

"""The vLLM versions this plugin instruments and the hook points it needs.

One place to update when vLLM moves: the version is checked at run time
(vLLM is not an install requirement), and every hook point's leading
parameter names are compared with the installed vLLM before anything is
wrapped. If one point is missing or changed, nothing is wrapped. A vLLM older
than `OLDEST_VLLM` is refused; one newer than `SUPPORTED_VLLM` (the tested
versions) is instrumented when every point matches, with one warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.version import Version

_instruments = ("vllm >= 0.30",)
# tested; a newer vLLM is instrumented too when every hook point below matches (one warning)
SUPPORTED_VLLM = ">=0.30,<0.35"
OLDEST_VLLM = Version("0.30")


@dataclass(frozen=True)
class HookPoint:
    module: str
    qualname: str  # "Class.method"
    params: tuple[str, ...]  # leading parameter names, after self


HOOK_POINTS: tuple[HookPoint, ...] = (
    HookPoint("vllm.v1.core.block_pool", "BlockPool.__init__", ("num_gpu_blocks", "enable_caching", "hash_block_size")),
    HookPoint("vllm.v1.core.block_pool", "BlockPool.get_new_blocks", ("num_blocks",)),
    HookPoint("vllm.v1.core.block_pool", "BlockPool.touch", ("blocks",)),
    HookPoint("vllm.v1.core.block_pool", "BlockPool.free_blocks", ("ordered_blocks",)),
    HookPoint(
        "vllm.v1.core.block_pool",
        "BlockPool.cache_full_blocks",
        ("request", "blocks", "num_cached_blocks", "num_full_blocks"),
    ),
    HookPoint("vllm.v1.core.block_pool", "BlockPool.evict_blocks", ("block_ids",)),
    HookPoint("vllm.v1.core.block_pool", "BlockPool.reset_prefix_cache", ()),
    HookPoint("vllm.v1.core.block_pool", "BlockPool.cache_partial_block", ("request", "block")),
    HookPoint("vllm.v1.core.block_pool", "BlockPool.unpin_blocks", ("blocks",)),
    HookPoint("vllm.v1.core.block_pool", "BlockPool.move_block_hashes", ("src_block", "dst_block")),
    HookPoint("vllm.v1.core.block_pool", "BlockPool._maybe_evict_cached_block", ("block",)),
    HookPoint("vllm.v1.core.kv_cache_manager", "KVCacheManager.__init__", ("kv_cache_config",)),
    HookPoint(
        "vllm.v1.core.kv_cache_manager",
        "KVCacheManager.allocate_slots",
        ("request", "num_new_tokens"),
    ),
    HookPoint("vllm.v1.core.kv_cache_manager", "KVCacheManager.get_computed_blocks", ("request",)),
    HookPoint("vllm.v1.core.kv_cache_manager", "KVCacheManager.remove_skipped_blocks", ("request_id",)),
    HookPoint(
        "vllm.v1.core.kv_cache_manager",
        "KVCacheManager.record_prefix_cache_stats",
        ("request", "num_hits"),
    ),
    HookPoint("vllm.v1.core.sched.scheduler", "Scheduler.__init__", ("vllm_config", "kv_cache_config")),
    HookPoint("vllm.v1.core.sched.scheduler", "Scheduler.schedule", ()),
    HookPoint("vllm.v1.core.sched.scheduler", "Scheduler._preempt_request", ("request",)),
    HookPoint("vllm.v1.core.sched.scheduler", "Scheduler._free_request", ("request",)),
    # EngineCore.shutdown -> Scheduler.shutdown on every graceful stop: the last flush
    HookPoint("vllm.v1.core.sched.scheduler", "Scheduler.shutdown", ()),
)

# vLLM's stop in both of its processes (plugin/stop.py); optional: without them
# the KV-cache hooks still run, and a stop in vLLM's default abort mode loses
# what was not exported yet (one warning says so).
STOP_HOOK_POINTS: tuple[HookPoint, ...] = (
    # the engine core leaves its busy loop and tears down: the flush goes first
    HookPoint("vllm.v1.engine.core", "EngineCore.shutdown", ()),
    # the front end SIGTERMs its engine cores and SIGKILLs them after `timeout`
    HookPoint("vllm.v1.engine.utils", "CoreEngineProcManager.shutdown", ("timeout",)),
)


# How each per-group manager lays out a request's block table (class names of
# vllm.v1.core.single_type_kv_cache_manager). Entry i of a token-slot table
# holds tokens [i * block_size, (i + 1) * block_size), or is the null block
# once vLLM retired it (sliding window, chunked local, R-SWA).
TOKEN_SLOT_MANAGERS = frozenset({
    "FullAttentionManager",  # full attention and MLA
    "SlidingWindowManager",  # sliding window, sliding-window MLA
    "ChunkedLocalAttentionManager",
    "RSWAManager",
    "SinkFullAttentionManager",
})
# Blocks that hold something other than token slots: a Mamba state page, a
# compression ring, encoder output, a sparse host tier. Held blocks only.
BLOCK_ONLY_MANAGERS = frozenset({
    "MambaManager",
    "CircularBufferManager",
    "CrossAttentionManager",
    "HiSparseSourceManager",
    "HiSparseHotManager",
    "HiSparseResidentManager",
    "KpoolTailManager",  # vLLM 0.30-0.31: a one-block circular scratch (a CircularBufferManager)
})
# Managers that drop a block's prefix-cache entry through the pool's private
# `_maybe_evict_cached_block` themselves (Mamba "align": a transient
# checkpoint's state is overwritten in place); their pools are hooked for it.
DIRECT_EVICTION_MANAGERS = frozenset({"MambaManager"})
# Managers whose tables only grow while a request runs (a copy-on-write swaps
# one block for another): a request's block peak is what it holds at its end.
GROWING_TABLE_MANAGERS = frozenset({"FullAttentionManager", "SinkFullAttentionManager"})

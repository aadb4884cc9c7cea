"""Brute-force recomputation of a FragmentationSnapshot from vLLM's own objects.

Deliberately naive and independent of vllm_frag_otel.core.state: it walks every
block of the pool and every request's block table in every KV-cache group,
straight from the definitions in the README's metric reference:

- a group whose manager lays tokens out by position (full, MLA, sliding window,
  chunked local...) has token slots: entry i of a request's table holds tokens
  [i * block_size, (i + 1) * block_size); a block's fill is the most any holder
  has computed of it;
- any other group (Mamba states, ...) reports held blocks only; a held state
  block counts as fully used towards slot utilisation;
- null entries (vLLM's retired positions) are nobody's blocks.
"""

from __future__ import annotations

# vLLM's per-group managers whose tables hold token slots by position.
TOKEN_SLOT_MANAGERS = {
    "FullAttentionManager", "SlidingWindowManager", "ChunkedLocalAttentionManager", "RSWAManager",
    "SinkFullAttentionManager",
}


def _groups(scheduler):
    """(block size, token slots?, {req_id: table}) per KV-cache group; a group
    that allocates from another pool (a HiSparse host group) holds none of this pool's blocks."""
    pool = scheduler.kv_cache_manager.block_pool
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    return [
        (m.block_size, type(m).__name__ in TOKEN_SLOT_MANAGERS, m.req_to_blocks) if m.block_pool is pool
        else (m.block_size, False, {})
        for m in managers
    ]


def _computed(scheduler, req_id: str) -> int:
    request = scheduler.requests.get(req_id)
    return request.num_computed_tokens if request is not None else 0


def _fills(scheduler) -> list[tuple[int, bool, dict[int, int]]]:
    """Per group: (block size, token slots?, {held block id: most tokens any holder computed in it})."""
    result = []
    for block_size, token_slots, tables in _groups(scheduler):
        fill: dict[int, int] = {}
        for req_id, table in tables.items():
            computed = _computed(scheduler, req_id)
            for i, block in enumerate(table):
                if block.is_null:
                    continue
                held = min(block_size, max(0, computed - i * block_size)) if token_slots else block_size
                fill[block.block_id] = max(fill.get(block.block_id, 0), held)
        result.append((block_size, token_slots, fill))
    return result


def brute_force(scheduler) -> dict:
    manager = scheduler.kv_cache_manager
    return brute_force_pool(manager.block_pool, manager.coordinator.single_type_managers, scheduler.requests)


def request_blocks_held(scheduler, req_id: str) -> int:
    return sum(
        sum(1 for b in tables.get(req_id, ()) if not b.is_null) for _, _, tables in _groups(scheduler)
    )


def request_slots(scheduler, req_id: str) -> tuple[int, int]:
    """(allocated, used) token slots of the request's own non-null entries in groups with token slots."""
    computed = _computed(scheduler, req_id)
    allocated = used = 0
    for block_size, token_slots, tables in _groups(scheduler):
        if not token_slots:
            continue
        for i, block in enumerate(tables.get(req_id, ())):
            if not block.is_null:
                allocated += block_size
                used += min(block_size, max(0, computed - i * block_size))
    return allocated, used


def block_states(scheduler) -> list[str]:
    """The state of every usable block (block 1 first), by name, from the definitions:
    unheld blocks are free or cached (a prefix-cache hash); held blocks are full
    when some holder computed every slot (or it is a held state block), else
    partial when some holder computed one, else empty."""
    fill: dict[int, int] = {}
    size: dict[int, int] = {}
    for block_size, _, group_fill in _fills(scheduler):
        for block_id, held in group_fill.items():
            fill[block_id] = max(fill.get(block_id, 0), held)
            size[block_id] = block_size
    states = []
    for block in scheduler.kv_cache_manager.block_pool.blocks[1:]:
        if block.ref_cnt == 0:
            states.append("cached" if block.block_hash is not None else "empty")
        elif fill.get(block.block_id, 0) == size.get(block.block_id, -1):
            states.append("full")
        elif fill.get(block.block_id, 0) > 0:
            states.append("partial")
        else:
            states.append("reserved")
    return states


def brute_force_pool(pool, group_managers=(), requests=None) -> dict:
    """The recount for one block pool of any owner: `group_managers` are the
    per-group managers of the KVCacheManager built on `pool` (none: a bare
    pool, pool-level numbers only), `requests` the live requests by id of the
    Scheduler that built that manager (none: nobody has computed anything). A
    group whose manager allocates from another pool (a HiSparse host group) is
    left out of this pool's numbers: no blocks, no token slots.
    """
    requests = requests if requests is not None else {}
    blocks = pool.blocks[1:]  # block 0 is the null block
    free = [b for b in blocks if b.ref_cnt == 0]
    runs, current = [], 0
    for b in blocks:
        if b.ref_cnt == 0:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    if current:
        runs.append(current)
    result = {
        "num_blocks": len(blocks),
        "used_blocks": len(blocks) - len(free),
        "cached_blocks": sum(1 for b in free if b.block_hash is not None),
        "free_blocks": len(free),
        "free_runs": len(runs),
        "largest_free_run": max(runs, default=0),
        "mean_free_run": (sum(runs) / len(runs)) if runs else 0.0,
        "external_fragmentation": (len(free) - max(runs, default=0)) / len(blocks),
    }
    if not group_managers:
        return result

    groups = []
    holders = set()
    utilised = 0.0
    for g, m in enumerate(group_managers):
        own = m.block_pool is pool
        token_slots = own and type(m).__name__ in TOKEN_SLOT_MANAGERS
        block_size = m.block_size
        fill: dict[int, int] = {}  # held block id -> most tokens any holder computed in it
        for req_id, table in (m.req_to_blocks.items() if own else ()):
            request = requests.get(req_id)
            computed = request.num_computed_tokens if request is not None else 0
            for i, block in enumerate(table):
                if block.is_null:
                    continue
                holders.add(req_id)
                held = min(block_size, max(0, computed - i * block_size)) if token_slots else block_size
                fill[block.block_id] = max(fill.get(block.block_id, 0), held)
        allocated = len(fill) * block_size if token_slots else 0
        used_slots = sum(fill.values()) if token_slots else 0
        utilised += sum(f / block_size for f in fill.values())
        groups.append({
            "group": g,
            "block_size": block_size,
            "token_slots": token_slots,
            "used_blocks": len(fill),
            "allocated_slots": allocated,
            "used_slots": used_slots,
            "unused_slots": allocated - used_slots,
            "partial_blocks": sum(1 for f in fill.values() if 0 < f < block_size) if token_slots else 0,
            "internal_fragmentation": (allocated - used_slots) / allocated if allocated else 0.0,
        })
    allocated = sum(g["allocated_slots"] for g in groups)
    used_slots = sum(g["used_slots"] for g in groups)
    return {
        **result,
        "allocated_slots": allocated,
        "used_slots": used_slots,
        "unused_slots": allocated - used_slots,
        "partial_blocks": sum(g["partial_blocks"] for g in groups),
        "internal_fragmentation": ((allocated - used_slots) / allocated) if allocated else 0.0,
        "slot_utilization": utilised / len(blocks),
        "tracked_requests": len(holders),
        "groups": groups,
    }

"""Brute-force recomputation of a FragmentationSnapshot from vLLM's own objects.

Deliberately naive and independent of vllm_frag_otel.state: it walks every
block of the pool and every request's block table, straight from the
definitions in the project's contract.
"""

from __future__ import annotations


def brute_force(scheduler) -> dict:
    manager = scheduler.kv_cache_manager
    pool = manager.block_pool
    blocks = pool.blocks[1:]  # block 0 is the null block
    used = [b for b in blocks if b.ref_cnt > 0]
    free = [b for b in blocks if b.ref_cnt == 0]
    cached = [b for b in free if b.block_hash is not None]

    runs, current = [], 0
    for b in blocks:
        if b.ref_cnt == 0:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    if current:
        runs.append(current)

    groups = manager.kv_cache_config.kv_cache_groups
    group_used, group_fill = [], []
    for g, group in enumerate(groups):
        block_size = group.kv_cache_spec.block_size
        fill: dict[int, int] = {}
        for req_id, table in manager.coordinator.single_type_managers[g].req_to_blocks.items():
            computed = scheduler.requests[req_id].num_computed_tokens
            for i, block in enumerate(table):
                if block.is_null:
                    continue
                held = min(block_size, max(0, computed - i * block_size))
                fill[block.block_id] = max(fill.get(block.block_id, 0), held)
        group_fill.append((block_size, fill))
        group_used.append(fill)

    allocated = used_slots = partial = 0
    block_size_of = {}
    for block_size, fill in group_fill:
        for block_id in fill:
            block_size_of[block_id] = block_size
    for b in used:
        block_size = block_size_of.get(b.block_id, groups[0].kv_cache_spec.block_size)
        allocated += block_size
        held = max((fill.get(b.block_id, 0) for _, fill in group_fill), default=0)
        used_slots += held
        if 0 < held < block_size:
            partial += 1
    num_blocks = len(blocks)
    capacity = num_blocks * max(g.kv_cache_spec.block_size for g in groups)
    return {
        "num_blocks": num_blocks,
        "used_blocks": len(used),
        "cached_blocks": len(cached),
        "free_blocks": len(free),
        "free_runs": len(runs),
        "largest_free_run": max(runs, default=0),
        "mean_free_run": (sum(runs) / len(runs)) if runs else 0.0,
        "external_fragmentation": (1 - max(runs) / len(free)) if free else 0.0,
        "allocated_slots": allocated,
        "used_slots": used_slots,
        "unused_slots": allocated - used_slots,
        "partial_blocks": partial,
        "internal_fragmentation": ((allocated - used_slots) / allocated) if allocated else 0.0,
        "slot_utilization": used_slots / capacity,
    }


def block_states(scheduler) -> list[str]:
    """The state of every usable block (block 1 first), by name, from the definitions:
    unheld blocks are free or cached (a prefix-cache hash); held blocks are full
    when some holder computed every slot, else partial when some holder computed
    one, else empty."""
    manager = scheduler.kv_cache_manager
    fill: dict[int, int] = {}
    size: dict[int, int] = {}
    for g, group in enumerate(manager.kv_cache_config.kv_cache_groups):
        block_size = group.kv_cache_spec.block_size
        for req_id, table in manager.coordinator.single_type_managers[g].req_to_blocks.items():
            computed = scheduler.requests[req_id].num_computed_tokens
            for i, block in enumerate(table):
                if not block.is_null:
                    held = min(block_size, max(0, computed - i * block_size))
                    fill[block.block_id] = max(fill.get(block.block_id, 0), held)
                    size[block.block_id] = block_size
    states = []
    for block in manager.block_pool.blocks[1:]:
        if block.ref_cnt == 0:
            states.append("cached" if block.block_hash is not None else "free")
        elif fill.get(block.block_id, 0) == size.get(block.block_id, -1):
            states.append("full")
        elif fill.get(block.block_id, 0) > 0:
            states.append("partial")
        else:
            states.append("empty")
    return states

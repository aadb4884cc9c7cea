"""Summaries of a run's snapshots: statistics per field, and a readable verdict."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vllm_frag_otel.core.state import FragmentationSnapshot

# the pool's blocks by state (used, cached, empty), not vLLM's free = cached + empty
FIELDS = ["empty_blocks" if f == "free_blocks" else f for f in FragmentationSnapshot.numeric_fields()]


def field_statistics(snapshots: Sequence[FragmentationSnapshot]) -> dict[str, dict[str, float]]:
    """For each numeric snapshot field: mean, p50 and max over the snapshots, and the last value."""
    if not snapshots:
        raise ValueError("no snapshots to summarise")
    table = np.array([[getattr(s, f) for f in FIELDS] for s in snapshots], dtype=np.float64)
    return {name: statistics(table[:, i]) for i, name in enumerate(FIELDS)}


# Per-group statistics of a group with token slots (a group without, e.g. Mamba
# states, has its used blocks only): GroupSnapshot fields.
GROUP_FIELDS = ("used_blocks", "allocated_slots", "used_slots", "unused_slots", "partial_blocks",
                "internal_fragmentation")


def group_statistics(snapshots: Sequence[FragmentationSnapshot]) -> list[dict]:
    """Per KV-cache group, in group order: its group index, kind, block size and
    whether it has token slots, and statistics (`statistics`) over the snapshots
    of its used blocks and, with token slots, of its slots and fragmentation."""
    if not snapshots:
        raise ValueError("no snapshots to summarise")
    groups = []
    for g, first in enumerate(snapshots[0].groups):
        names = GROUP_FIELDS if first.token_slots else GROUP_FIELDS[:1]
        table = np.array([[getattr(s.groups[g], f) for f in names] for s in snapshots], dtype=np.float64)
        groups.append({"group": first.group, "kind": first.kind, "block_size": first.block_size,
                       "token_slots": first.token_slots,
                       **{name: statistics(table[:, i]) for i, name in enumerate(names)}})
    return groups


def statistics(values: np.ndarray) -> dict[str, float]:
    """Mean, p50 and max of a non-empty series, and its last value."""
    return {
        "mean": float(values.mean()),
        "p50": float(np.median(values)),
        "max": float(values.max()),
        "final": float(values[-1]),
    }


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


GAUGES = [
    ("used blocks", "used_blocks"),
    ("cached blocks (evictable)", "cached_blocks"),
    ("empty blocks", "empty_blocks"),  # used + cached + empty = the pool, as in vllm.kv_cache.blocks
    ("free runs (empty or cached)", "free_runs"),
    ("largest free run", "largest_free_run"),
    ("external fragmentation", "external_fragmentation"),
    ("unused token slots", "unused_slots"),
    ("partial blocks", "partial_blocks"),
    ("internal fragmentation", "internal_fragmentation"),
    ("slot utilization", "slot_utilization"),
    ("requests holding blocks", "tracked_requests"),
]
RATIOS = {"external_fragmentation", "internal_fragmentation", "slot_utilization"}


def gauge_lines(stats: dict[str, dict[str, float]]) -> list[str]:
    """Mean, p50 and max of each gauge, as a fixed-width table."""
    lines = [f"  {'gauge':<28}{'mean':>10}{'p50':>10}{'max':>10}"]
    for label, name in GAUGES:
        s = stats[name]
        cells = [pct(s[k]) if name in RATIOS else f"{s[k]:.1f}" for k in ("mean", "p50", "max")]
        lines.append(f"  {label:<28}" + "".join(f"{c:>10}" for c in cells))
    return lines


def group_lines(groups: Sequence[dict]) -> list[str]:
    """The KV-cache groups section: one row per group (`group_statistics`; a
    `block_size` of None is unknown), and what a group without token slots
    counts. Nothing for a single group: the pool's gauges are that group's."""
    if len(groups) < 2:
        return []
    lines = [
        "  KV-cache groups (every request has a block table in each; the pool gauges above add them up)",
        f"  {'group':<22}{'block size':>12}{'blocks mean':>13}{'max':>8}{'internal frag':>15}"
        f"{'unused slots':>14}{'max':>8}",
    ]
    for g in groups:
        size = (str(g["block_size"]) if g["block_size"] else "?") if g["token_slots"] else "state"
        cells = [size, f"{g['used_blocks']['mean']:.1f}", f"{g['used_blocks']['max']:.0f}"]
        if g["token_slots"]:
            cells += [pct(g["internal_fragmentation"]["mean"]), f"{g['unused_slots']['mean']:.1f}",
                      f"{g['unused_slots']['max']:.0f}"]
        else:
            cells += ["-", "-", "-"]
        lines.append(f"  {str(g['group']) + ' ' + g['kind']:<22}" + "".join(
            f"{c:>{w}}" for c, w in zip(cells, (12, 13, 8, 15, 14, 8))))
    for g in groups:
        if not g["token_slots"]:
            lines.append(f"  group {g['group']} ({g['kind']}): its blocks are state pages, not token slots (a request's"
                         " recurrent state, whatever its length): only held blocks are counted, as used in full.")
    lines.append("  internal frag and unused slots: mean over time (unused slots also at most) of the group's"
                 " empty token slots in its used blocks.")
    return lines


def totals_lines(final: dict[str, float]) -> list[str]:
    """The cumulative counters at the end, with the ratios that make them readable."""
    queried, hit = final["prefix_queried_tokens"], final["prefix_hit_tokens"]
    resumed_queried, resumed_hit = final["prefix_resumed_queried_tokens"], final["prefix_resumed_hit_tokens"]
    evictions, never = final["evictions"], final["evicted_never_reused"]
    attempts, failures = final["allocation_attempts"], final["allocation_failures"]
    return [
        "  totals",
        f"    prefix cache        {int(hit)} of {int(queried)} looked-up tokens hit"
        f" ({pct(hit / queried) if queried else 'n/a'}) at first admission, as vLLM counts them",
        f"      re-admissions     {int(resumed_hit)} of {int(resumed_queried)} looked-up tokens hit"
        f" ({pct(resumed_hit / resumed_queried) if resumed_queried else 'n/a'}) after preemption",
        f"    evictions           {int(evictions)} blocks"
        + (f", {int(never)} never reused after caching ({pct(never / evictions)})" if evictions else ""),
        f"    block allocations   {int(final['blocks_allocated_fresh'])} fresh,"
        f" {int(final['blocks_allocated_recycled'])} recycled, {int(final['blocks_prefix_hit'])} prefix hits",
        f"    allocate_slots      {int(attempts)} calls, {int(failures)} failed"
        f" ({pct(failures / attempts) if attempts else 'n/a'})",
        f"    preemptions         {int(final['preemptions'])}",
    ]


def counted(n: float, noun: str) -> str:
    """"3 preemptions", "1 preemption", "no preemptions"."""
    return f"{int(n) or 'no'} {noun}{'' if int(n) == 1 else 's'}"


def cost_line(failures: float, preemptions: float) -> str:
    """What a full cache cost, in words (none, when it never ran full)."""
    if not failures and not preemptions:
        return "no allocation failed for lack of free blocks and no request was preempted: nothing was recomputed."
    return (f"{counted(failures, 'allocation')} failed for lack of free blocks and there were"
            f" {counted(preemptions, 'preemption')}: the real cost of a full cache is recomputation.")


def render(stats: dict[str, dict[str, float]], steps: int, block_size: int, groups: Sequence[dict] = ()) -> str:
    """The text a person reads after `simulate`: gauges over steps, per-group
    numbers when the layout has several KV-cache groups, then totals."""
    final = {name: s["final"] for name, s in stats.items()}
    lines = [f"KV-cache fragmentation over {steps} scheduler steps (block size {block_size})", ""]
    lines += gauge_lines(stats)
    if len(groups) > 1:
        lines += ["", *group_lines(groups)]
    lines += ["", *totals_lines(final)]
    lines += [
        "",
        "  what it means",
        f"    {pct(stats['internal_fragmentation']['mean'])} of allocated token slots were empty on average"
        " (internal: the tail block of each request);",
        f"    {pct(stats['external_fragmentation']['mean'])} external fragmentation on average"
        " (paged attention needs no contiguous runs, so this costs nothing by itself);",
        f"    {cost_line(final['allocation_failures'], final['preemptions'])}",
    ]
    return "\n".join(lines)

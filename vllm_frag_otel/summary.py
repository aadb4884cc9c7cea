"""Summaries of a run's snapshots: statistics per field, and a readable verdict."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vllm_frag_otel.state import FragmentationSnapshot

FIELDS = FragmentationSnapshot.numeric_fields()


def field_statistics(snapshots: Sequence[FragmentationSnapshot]) -> dict[str, dict[str, float]]:
    """For each numeric snapshot field: mean, p50 and max over the snapshots, and the last value."""
    if not snapshots:
        raise ValueError("no snapshots to summarise")
    table = np.array([[getattr(s, f) for f in FIELDS] for s in snapshots], dtype=np.float64)
    stats = {}
    for i, name in enumerate(FIELDS):
        column = table[:, i]
        stats[name] = {
            "mean": float(column.mean()),
            "p50": float(np.median(column)),
            "max": float(column.max()),
            "final": float(column[-1]),
        }
    return stats


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def render(stats: dict[str, dict[str, float]], steps: int, block_size: int) -> str:
    """The text a person reads after `simulate`: gauges over steps, then totals."""
    gauges = [
        ("used blocks", "used_blocks", str),
        ("cached blocks (evictable)", "cached_blocks", str),
        ("free blocks", "free_blocks", str),
        ("free runs", "free_runs", str),
        ("largest free run", "largest_free_run", str),
        ("external fragmentation", "external_fragmentation", _pct),
        ("unused token slots", "unused_slots", str),
        ("partial blocks", "partial_blocks", str),
        ("internal fragmentation", "internal_fragmentation", _pct),
        ("slot utilization", "slot_utilization", _pct),
        ("requests holding blocks", "tracked_requests", str),
    ]
    lines = [f"KV-cache fragmentation over {steps} scheduler steps (block size {block_size})", ""]
    lines.append(f"  {'gauge':<28}{'mean':>10}{'p50':>10}{'max':>10}")
    for label, name, fmt in gauges:
        s = stats[name]
        cells = [fmt(round(s[k], 4)) if fmt is _pct else f"{s[k]:.1f}" for k in ("mean", "p50", "max")]
        lines.append(f"  {label:<28}" + "".join(f"{c:>10}" for c in cells))
    final = {name: s["final"] for name, s in stats.items()}
    queried, hit = final["prefix_queried_tokens"], final["prefix_hit_tokens"]
    evictions, never = final["evictions"], final["evicted_never_reused"]
    attempts, failures = final["allocation_attempts"], final["allocation_failures"]
    lines += [
        "",
        "  totals",
        f"    prefix cache        {int(hit)} of {int(queried)} looked-up tokens hit"
        f" ({_pct(hit / queried) if queried else 'n/a'})",
        f"    evictions           {int(evictions)} blocks, {int(never)} never reused after caching"
        f" ({_pct(never / evictions) if evictions else 'n/a'})",
        f"    block allocations   {int(final['blocks_allocated_fresh'])} fresh,"
        f" {int(final['blocks_allocated_recycled'])} recycled, {int(final['blocks_prefix_hit'])} prefix hits",
        f"    allocate_slots      {int(attempts)} calls, {int(failures)} failed"
        f" ({_pct(failures / attempts) if attempts else 'n/a'})",
        f"    preemptions         {int(final['preemptions'])}",
        "",
        "  what it means",
        f"    {_pct(stats['internal_fragmentation']['mean'])} of allocated token slots were empty on average"
        " (internal: the tail block of each request);",
        f"    {_pct(stats['external_fragmentation']['mean'])} external fragmentation on average"
        " (paged attention needs no contiguous runs, so this costs nothing by itself);",
        f"    {int(failures)} allocations failed for lack of free blocks and {int(final['preemptions'])}"
        " requests were preempted: the real cost of a full cache is recomputation.",
    ]
    return "\n".join(lines)

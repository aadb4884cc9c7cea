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
    return {name: statistics(table[:, i]) for i, name in enumerate(FIELDS)}


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
    ("free blocks", "free_blocks"),
    ("free runs", "free_runs"),
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
        cells = [pct(round(s[k], 4)) if name in RATIOS else f"{s[k]:.1f}" for k in ("mean", "p50", "max")]
        lines.append(f"  {label:<28}" + "".join(f"{c:>10}" for c in cells))
    return lines


def totals_lines(final: dict[str, float]) -> list[str]:
    """The cumulative counters at the end, with the ratios that make them readable."""
    queried, hit = final["prefix_queried_tokens"], final["prefix_hit_tokens"]
    evictions, never = final["evictions"], final["evicted_never_reused"]
    attempts, failures = final["allocation_attempts"], final["allocation_failures"]
    return [
        "  totals",
        f"    prefix cache        {int(hit)} of {int(queried)} looked-up tokens hit"
        f" ({pct(hit / queried) if queried else 'n/a'})",
        f"    evictions           {int(evictions)} blocks, {int(never)} never reused after caching"
        f" ({pct(never / evictions) if evictions else 'n/a'})",
        f"    block allocations   {int(final['blocks_allocated_fresh'])} fresh,"
        f" {int(final['blocks_allocated_recycled'])} recycled, {int(final['blocks_prefix_hit'])} prefix hits",
        f"    allocate_slots      {int(attempts)} calls, {int(failures)} failed"
        f" ({pct(failures / attempts) if attempts else 'n/a'})",
        f"    preemptions         {int(final['preemptions'])}",
    ]


def render(stats: dict[str, dict[str, float]], steps: int, block_size: int) -> str:
    """The text a person reads after `simulate`: gauges over steps, then totals."""
    final = {name: s["final"] for name, s in stats.items()}
    lines = [f"KV-cache fragmentation over {steps} scheduler steps (block size {block_size})", ""]
    lines += gauge_lines(stats)
    lines += ["", *totals_lines(final)]
    lines += [
        "",
        "  what it means",
        f"    {pct(stats['internal_fragmentation']['mean'])} of allocated token slots were empty on average"
        " (internal: the tail block of each request);",
        f"    {pct(stats['external_fragmentation']['mean'])} external fragmentation on average"
        " (paged attention needs no contiguous runs, so this costs nothing by itself);",
        f"    {int(final['allocation_failures'])} allocations failed for lack of free blocks and"
        f" {int(final['preemptions'])} requests were preempted: the real cost of a full cache is recomputation.",
    ]
    return "\n".join(lines)

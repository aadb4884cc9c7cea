"""Advice held to measurement: each setting the report suggests changing, with
what a what-if sweep (`simulate --sweep`, its sweep.json given to `report`)
measured for that change alone, or marked untested with the sweep that would
measure it. A change the sweep measured as slower is said to be so, never advised.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_frag_otel.analysis.summary import pct
from vllm_frag_otel.analysis.sweep import MATERIAL

SWEEP_FILE = "sweep.json"
PREFIX_POINTS = 0.01  # a prefix-cache hit-rate change worth calling one


@dataclass(frozen=True)
class Row:
    """One setting of a sweep and what it measured (a sweep.json row)."""

    block_size: int
    num_blocks: int  # including vLLM's null block
    kv_slots: int
    prefix_caching: bool
    max_num_seqs: int
    mean_latency_s: float
    preemptions: int
    failed_allocations: int
    prefix_hit_rate: float

    @classmethod
    def of(cls, row: dict) -> Row:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Sweep:
    path: Path
    rows: tuple[Row, ...]  # the first is the baseline

    @property
    def baseline(self) -> Row:
        return self.rows[0]


def find_sweeps(paths: Sequence[Path]) -> tuple[list[Sweep], list[str]]:
    """The sweeps among `paths` (a sweep.json, or a directory holding one), and what was wrong
    with those that could not be read."""
    sweeps, problems = [], []
    for path in paths:
        candidate = path / SWEEP_FILE if path.is_dir() else path if path.name == SWEEP_FILE else None
        if candidate is None or not candidate.is_file():
            continue
        try:
            rows = tuple(Row.of(row) for row in json.loads(candidate.read_text())["rows"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{candidate}: not a sweep this version reads ({type(exc).__name__}: {exc}); ignored")
            continue
        if rows:
            sweeps.append(Sweep(candidate, rows))
    return sweeps, problems


@dataclass(frozen=True)
class Lever:
    """A change of one setting, everything else as in the baseline."""

    name: str  # what the advice calls it
    changed: Callable[[Row, Row], bool]  # (row, baseline): the row makes this change and only this one

    def measured(self, sweep: Sweep) -> list[Row]:
        return [row for row in sweep.rows[1:] if self.changed(row, sweep.baseline)]


def _same(row: Row, base: Row, *names: str) -> bool:
    return all(getattr(row, n) == getattr(base, n) for n in names)


MORE_MEMORY = Lever(
    "more KV-cache blocks",
    lambda r, b: r.kv_slots > b.kv_slots and _same(r, b, "block_size", "prefix_caching", "max_num_seqs"),
)
FEWER_SEQUENCES = Lever(
    "a lower --max-num-seqs",
    lambda r, b: r.max_num_seqs < b.max_num_seqs and _same(r, b, "kv_slots", "block_size", "prefix_caching"),
)
SMALLER_BLOCKS = Lever(
    "a smaller --block-size",
    lambda r, b: r.block_size < b.block_size and _same(r, b, "kv_slots", "prefix_caching", "max_num_seqs"),
)


UNTESTED = "untested (the sweep in the last item measures it)"


def verdict(lever: Lever, sweeps: Sequence[Sweep], on_prefix_hits: bool = False) -> str | None:
    """What the first sweep that measured `lever` found against its baseline, or None: by
    mean request latency (the lever's best row), or with `on_prefix_hits` by prefix-cache
    hit rate (the row that hit most)."""
    for sweep in sweeps:
        rows = lever.measured(sweep)
        if not rows:
            continue
        base = sweep.baseline
        latency = (lambda r: (r.mean_latency_s - base.mean_latency_s) / base.mean_latency_s
                   if base.mean_latency_s else 0.0)
        if on_prefix_hits:
            best = max(rows, key=lambda r: r.prefix_hit_rate)
            change = best.prefix_hit_rate - base.prefix_hit_rate
            outcome = ("it helps" if change >= PREFIX_POINTS else
                       "prefix hits fell: not the remedy here" if change <= -PREFIX_POINTS else
                       "prefix hits moved by less than a percentage point")
        else:
            best = min(rows, key=lambda r: (r.mean_latency_s, r.preemptions, r.failed_allocations))
            change = latency(best)
            outcome = ("it helps" if change <= -MATERIAL else
                       "it made requests slower: not advised for this workload" if change >= MATERIAL else
                       f"latency moved by less than {pct(MATERIAL)}")
        return (f"measured in {sweep.path} ({_setting(best)}, against {_setting(base)}): mean request latency"
                f" {base.mean_latency_s:.3f} -> {best.mean_latency_s:.3f} s ({latency(best):+.1%}), preemptions"
                f" {base.preemptions} -> {best.preemptions}, failed allocations {base.failed_allocations} ->"
                f" {best.failed_allocations}, prefix hits {pct(base.prefix_hit_rate)} -> {pct(best.prefix_hit_rate)}:"
                f" {outcome}")
    return None


def _setting(row: Row) -> str:
    return (f"{row.num_blocks - 1} blocks of {row.block_size}, --max-num-seqs {row.max_num_seqs},"
            f" prefix caching {'on' if row.prefix_caching else 'off'}")

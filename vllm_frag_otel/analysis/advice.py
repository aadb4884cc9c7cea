"""Advice held to measurement: each setting the report suggests changing, with
what a what-if sweep (`simulate --sweep`, its sweep.json given to `report`)
measured for that change alone, or marked untested with the sweep that would
measure it. A change the sweep measured as slower is said to be so, never advised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_frag_otel.analysis.summary import pct
from vllm_frag_otel.analysis import sweep
from vllm_frag_otel.analysis.sweep import MATERIAL, Outcome, Setting

SWEEP_FILE = "sweep.json"
PREFIX_POINTS = 0.01  # a prefix-cache hit-rate change worth calling one


@dataclass(frozen=True)
class Sweep:
    path: Path
    rows: tuple[Outcome, ...]  # the first is the baseline

    @property
    def baseline(self) -> Outcome:
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
            rows = tuple(sweep.read(candidate))
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
    changed: Callable[[Setting, Setting], bool]  # (row's, baseline's): this change and only this one

    def measured(self, found: Sweep) -> list[Outcome]:
        return [row for row in found.rows[1:] if self.changed(row.setting, found.baseline.setting)]


def _same(setting: Setting, base: Setting, *names: str) -> bool:
    return all(getattr(setting, n) == getattr(base, n) for n in names)


MORE_MEMORY = Lever(
    "more KV-cache blocks",
    lambda r, b: r.kv_slots > b.kv_slots and _same(r, b, "block_size", "prefix_caching", "max_num_seqs"),
)
FEWER_SEQUENCES = Lever(
    "a lower --max-num-seqs",
    lambda r, b: r.max_num_seqs < b.max_num_seqs and _same(r, b, "kv_slots", "block_size", "prefix_caching"),
)
PREFIX_CACHING = Lever(
    "prefix caching on",
    lambda r, b: r.prefix_caching and not b.prefix_caching and _same(r, b, "kv_slots", "block_size", "max_num_seqs"),
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
    for found in sweeps:
        rows = lever.measured(found)
        if not rows:
            continue
        base = found.baseline
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
        return (f"measured in {found.path} ({_setting(best.setting)}, against {_setting(base.setting)}): mean"
                f" request latency"
                f" {base.mean_latency_s:.3f} -> {best.mean_latency_s:.3f} s ({latency(best):+.1%}), preemptions"
                f" {base.preemptions} -> {best.preemptions}, failed allocations {base.failed_allocations} ->"
                f" {best.failed_allocations}, prefix hits {pct(base.prefix_hit_rate)} -> {pct(best.prefix_hit_rate)}:"
                f" {outcome}")
    return None


def _setting(setting: Setting) -> str:
    return (f"{setting.num_blocks - 1} blocks of {setting.block_size}, --max-num-seqs {setting.max_num_seqs},"
            f" prefix caching {'on' if setting.prefix_caching else 'off'}")

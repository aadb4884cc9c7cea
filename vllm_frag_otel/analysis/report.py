"""`vllm-frag-otel report`: from the plugin's OTLP/JSON files to answers.

For each KV-cache pool found: what the fragmentation pattern is, what causes
it, what it costs and how to reduce it, in a text summary with the measured
numbers; every time series as CSV and JSON; PNG charts; and one self-contained
HTML page bundling them. Per-request figures come from the plugin's
`vllm.kv_cache.request` spans when the traces files are given too; the block
layout (a heat map of every block's state over time, and where it churns) from
its `vllm.kv_cache.block_map` log records when the logs files are. Models with
several KV-cache groups (sliding-window, Mamba ... layers beside full
attention) get per-group numbers from the per-group metrics. No vLLM.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import itertools
import json
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vllm_frag_otel.core import layout
from vllm_frag_otel.analysis import advice, otlp_read, replay
from vllm_frag_otel.sim import simclock
from vllm_frag_otel.jsonlines import InputProblem
from vllm_frag_otel.analysis.otlp_read import RequestSpan, Series, Source, Telemetry
# request size classes (tokens): below 128, 128-511, 512-2047, 2048 and more
from vllm_frag_otel.analysis.replay import size_class
from vllm_frag_otel.analysis.plots import Chart, Line, Panel, render as draw
from vllm_frag_otel.analysis.summary import GROUP_FIELDS, gauge_lines, group_lines, pct, statistics, totals_lines
from vllm_frag_otel.export.telemetry import (
    GROUP,
    GROUP_KIND,
    OUTCOME,
    RESUMED,
    REUSED,
    SAMPLE_RATE,
    SLOT_STATE,
    SOURCE,
    STATE,
)

# Snapshot field (as in simulate's summary.json) -> (metric, attribute filter);
# series of the metric matching the filter are summed (over groups, reasons, ...).
QUANTITIES: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "num_blocks": ("vllm.kv_cache.block.limit", {}),
    "used_blocks": ("vllm.kv_cache.blocks", {STATE: ("used",)}),
    "cached_blocks": ("vllm.kv_cache.blocks", {STATE: ("cached",)}),
    "empty_blocks": ("vllm.kv_cache.blocks", {STATE: ("empty",)}),
    "free_runs": ("vllm.kv_cache.free_runs", {}),
    "largest_free_run": ("vllm.kv_cache.free_run.largest", {}),
    "external_fragmentation": ("vllm.kv_cache.fragmentation.external", {}),
    "allocated_slots": ("vllm.kv_cache.slots", {}),
    "used_slots": ("vllm.kv_cache.slots", {SLOT_STATE: ("used",)}),
    "unused_slots": ("vllm.kv_cache.slots", {SLOT_STATE: ("unused",)}),
    "partial_blocks": ("vllm.kv_cache.partial_blocks", {}),
    "internal_fragmentation": ("vllm.kv_cache.fragmentation.internal", {}),
    "slot_utilization": ("vllm.kv_cache.slot.utilization", {}),
    "tracked_requests": ("vllm.kv_cache.requests", {}),
    "prefix_queried_tokens": ("vllm.kv_cache.prefix_cache.queried", {RESUMED: ("false",)}),
    "prefix_hit_tokens": ("vllm.kv_cache.prefix_cache.hit", {RESUMED: ("false",)}),
    "prefix_resumed_queried_tokens": ("vllm.kv_cache.prefix_cache.queried", {RESUMED: ("true",)}),
    "prefix_resumed_hit_tokens": ("vllm.kv_cache.prefix_cache.hit", {RESUMED: ("true",)}),
    "evictions": ("vllm.kv_cache.block.evictions", {}),
    "evicted_never_reused": ("vllm.kv_cache.block.evictions", {REUSED: ("false",)}),
    "blocks_allocated_fresh": ("vllm.kv_cache.block.allocations", {SOURCE: ("fresh",)}),
    "blocks_allocated_recycled": ("vllm.kv_cache.block.allocations", {SOURCE: ("recycled",)}),
    "blocks_prefix_hit": ("vllm.kv_cache.block.allocations", {SOURCE: ("prefix_hit",)}),
    "allocation_attempts": ("vllm.kv_cache.allocation.attempts", {}),
    "allocation_failures": ("vllm.kv_cache.allocation.attempts", {OUTCOME: ("failure",)}),
    "preemptions": ("vllm.kv_cache.preemptions", {}),
}
LATENCY_METRIC = "vllm.kv_cache.allocation.duration"
# Per KV-cache group: blocks (every group), token slots and partial blocks (groups with token slots).
GROUP_BLOCKS_METRIC = "vllm.kv_cache.group.blocks"
SLOTS_METRIC = "vllm.kv_cache.slots"
PARTIAL_METRIC = "vllm.kv_cache.partial_blocks"
# Thresholds of the advice: the share of exports near a full pool, and the
# internal fragmentation worth a smaller block size.
NEAR_FULL = 0.95
INTERNAL_WORTH_FIXING = 0.05
# Block-layout hotspots: churn summed over this many equal block-id regions and
# time windows; how many of each (and of the longest-lived holes) are shown.
LAYOUT_REGIONS = 32
LAYOUT_WINDOWS = 20
TOP_HOTSPOTS = 3
TOP_HOLES = 5
# Most maps a pool's layout is drawn and analysed from (evenly spaced beyond that): a day of
# 4096-cell maps every 10 s would otherwise take gigabytes.
LAYOUT_MAX_MAPS = 2000


@dataclass(frozen=True)
class Clock:
    """One process's time axis: wall-clock seconds since `start_ns` (the first
    point of all inputs), or, for simulator output with its clock file
    (`simclock`), simulated seconds since the run began."""

    start_ns: int
    steps: simclock.StepClock | None = None

    def seconds(self, times_ns) -> np.ndarray:
        if self.steps is not None:
            return self.steps.seconds(times_ns)
        return (np.asarray(times_ns, dtype=np.int64) - self.start_ns) / 1e9

    @property
    def axis(self) -> str:
        if self.steps is not None:
            return f"simulated seconds (steps x {self.steps.step_seconds:g} s)"
        return "seconds since the first point"

    def note(self) -> list[str]:
        """What the summary's times are, when they are not wall-clock seconds."""
        if self.steps is None:
            return []
        return [f"  time: simulated seconds (scheduler steps x {self.steps.step_seconds:g} s, from the simulator's"
                f" clock file {self.steps.path}; {self.steps.wall_seconds:.1f} s of wall-clock time): every time,"
                " duration and rate below except allocate_slots times (elapsed wall-clock time per call) is simulated"]


@dataclass(frozen=True)
class TimeSeries:
    seconds: np.ndarray  # on the pool's clock
    values: np.ndarray


@dataclass
class ClassRow:
    """Requests of one size class and what they did to the KV cache."""

    prompt: str
    output: str
    requests: int = 0
    unused_slots: int = 0  # at their end
    preemptions: int = 0
    preempted_requests: int = 0
    allocation_failures: int = 0
    new_blocks: int | None = 0  # taken from the free list over their life (where evictions happen); None: unknown
    measured_evictions: int | None = None  # cached blocks their allocations evicted, when every span says

    @property
    def label(self) -> str:
        return f"prompt {self.prompt} / output {self.output}"


@dataclass
class GroupReport:
    """One KV-cache group of a pool, over the exports."""

    group: str  # its index, as exported
    kind: str  # vLLM's spec kind: full_attention, sliding_window, mamba, ...
    token_slots: bool  # False: its blocks hold something else (Mamba states); blocks only
    block_size: int | None  # token slots per block, when it ever held a block with token slots
    quantities: dict[str, TimeSeries]  # GROUP_FIELDS (used_blocks only without token slots)
    stats: dict[str, dict[str, float]]

    def summary(self) -> dict:
        """As `summary.group_statistics` gives a simulated run's groups."""
        index = int(self.group) if self.group.isdigit() else self.group
        return {"group": index, "kind": self.kind, "block_size": self.block_size, "token_slots": self.token_slots,
                **self.stats}


@dataclass
class PoolReport:
    source: Source
    label: str
    prefix: str  # for file names when there are several pools
    exports: int
    quantities: dict[str, TimeSeries]
    stats: dict[str, dict[str, float]]
    latency: dict[str, Series]  # allocate_slots duration histograms, by outcome
    block_size: int | None
    caveats: list[str] = field(default_factory=list)
    requests: list[RequestSpan] = field(default_factory=list)
    classes: list[ClassRow] = field(default_factory=list)
    clock: Clock = field(default_factory=lambda: Clock(0))  # every time axis
    block_layout: layout.Layout | None = None  # from the pool's block maps
    hotspots: Hotspots | None = None  # of the block layout
    groups: list[GroupReport] = field(default_factory=list)  # empty when the input has no per-group metrics
    workload: replay.Workload | None = None  # the request spans as a workload file (written by `build`)
    request_latency: list[replay.LatencyRow] = field(default_factory=list)  # events against latency, per class
    untraced: float = 0.0  # requests the plugin did not follow with a span
    unassigned_spans: int = 0  # request spans of the process that cannot be given to one of its several pools
    sweeps: list[advice.Sweep] = field(default_factory=list)  # what-if sweeps given with the input
    run_config: dict = field(default_factory=dict)  # the simulator's settings, when the input is one simulate run

    @property
    def final(self) -> dict[str, float]:
        return {name: s["final"] for name, s in self.stats.items()}


# -- from series to a pool's report --------------------------------------------------


def _matching(telemetry: Telemetry, source: Source, metric: str, where: dict[str, tuple[str, ...]]) -> list[Series]:
    return [s for s in telemetry.series if s.source == source and s.metric == metric
            and all(s.attributes.get(k) in allowed for k, allowed in where.items())]


def aligned_sum(series: Sequence[Series]) -> tuple[np.ndarray, np.ndarray]:
    """Times and the sum of several series at each of their times, each carried
    forward from its latest point (0 before its first)."""
    times = np.unique(np.concatenate([s.times for s in series]))
    return times, _carried(series, times)


def _carried(series: Sequence[Series], times: np.ndarray) -> np.ndarray:
    """The sum of `series` at `times`, each carried forward from its latest point (0 before its first)."""
    total = np.zeros(len(times))
    for s in series:
        index = np.searchsorted(s.times, times, side="right") - 1
        total += np.where(index >= 0, s.values[np.maximum(index, 0)], 0.0)
    return total


def group_reports(telemetry: Telemetry, source: Source, clock: Clock) -> list[GroupReport]:
    """The pool's KV-cache groups, in group order, from the per-group metrics, on
    the times of the group block counts. A group has token slots when its slots
    are exported (the plugin exports them for those groups only)."""
    keys = sorted({(s.attributes.get(GROUP, ""), s.attributes.get(GROUP_KIND, ""))
                   for s in _matching(telemetry, source, GROUP_BLOCKS_METRIC, {})},
                  key=lambda key: (not key[0].isdigit(), int(key[0]) if key[0].isdigit() else 0, key))
    groups = []
    for group, kind in keys:
        where = {GROUP: (group,), GROUP_KIND: (kind,)}
        times, blocks = aligned_sum(_matching(telemetry, source, GROUP_BLOCKS_METRIC, where))
        values = {"used_blocks": blocks}
        slots = _matching(telemetry, source, SLOTS_METRIC, where)
        block_size = None
        if slots:
            used = _carried([s for s in slots if s.attributes.get(SLOT_STATE) == "used"], times)
            unused = _carried([s for s in slots if s.attributes.get(SLOT_STATE) == "unused"], times)
            allocated = used + unused
            with np.errstate(divide="ignore", invalid="ignore"):
                internal = np.where(allocated > 0, np.clip(unused / allocated, 0.0, 1.0), 0.0)
                sizes = allocated[blocks > 0] / blocks[blocks > 0]
            values.update(allocated_slots=allocated, used_slots=used, unused_slots=unused,
                          partial_blocks=_carried(_matching(telemetry, source, PARTIAL_METRIC, where), times),
                          internal_fragmentation=internal)
            block_size = int(round(float(np.median(sizes)))) if sizes.size else None
        quantities = {name: TimeSeries(clock.seconds(times), values[name]) for name in GROUP_FIELDS
                      if name in values}
        groups.append(GroupReport(group, kind, bool(slots), block_size, quantities,
                                  {name: statistics(q.values) for name, q in quantities.items()}))
    return groups


def pool_report(telemetry: Telemetry, source: Source, start_ns: int, several: bool,
                clock: Clock | None = None) -> PoolReport:
    """`start_ns`: time zero of every time axis (the first point of all inputs),
    unless `clock` says otherwise. Raises ValueError, naming them, when metrics
    the report needs are missing."""
    clock = clock or Clock(start_ns)
    resource = telemetry.resources.get(source.instance, {})
    label = (f"{resource.get('service.name', 'vllm')} pool {source.pool}, model {resource.get('vllm.model.name', '?')}"
             f" (host {resource.get('host.name', '?')}, pid {resource.get('process.pid', '?')})")
    raw = {}
    for name, (metric, where) in QUANTITIES.items():
        series = _matching(telemetry, source, metric, where)
        if series:
            raw[name] = aligned_sum(series)
    missing = sorted({metric for name, (metric, _) in QUANTITIES.items() if name not in raw})
    if missing:
        raise ValueError(f"{label}: no {', '.join(missing)} in the input; pool skipped")
    quantities = {name: TimeSeries(clock.seconds(t), v) for name, (t, v) in raw.items()}
    stats = {name: statistics(q.values) for name, q in quantities.items()}
    latency = {s.attributes.get(OUTCOME, ""): s
               for s in _matching(telemetry, source, LATENCY_METRIC, {}) if s.bounds.size}
    groups = group_reports(telemetry, source, clock)
    report = PoolReport(
        source=source,
        label=label,
        prefix=f"{hashlib.sha1(source.instance.encode()).hexdigest()[:8]}-pool{source.pool}-" if several else "",
        exports=len(quantities["used_blocks"].seconds),
        quantities=quantities,
        stats=stats,
        latency=latency,
        block_size=_block_size(quantities, groups),
        caveats=_caveats(telemetry, source),
        untraced=_untraced(telemetry, source),
        clock=clock,
        groups=groups,
    )
    stacked = layout.stack(telemetry.block_maps.get(source, []), LAYOUT_MAX_MAPS)
    if stacked is not None and stacked.num_blocks:
        report.block_layout = stacked
        report.hotspots = hotspots(report)
    # spans name their process, not their pool: they belong to a process's only pool
    pools_of_instance = [p for p in telemetry.pools() if p.instance == source.instance]
    if len(pools_of_instance) > 1:
        report.unassigned_spans = sum(1 for r in telemetry.spans if r.instance == source.instance)
    if len(pools_of_instance) == 1:
        report.requests = [r for r in telemetry.spans if r.instance == source.instance]
        report.classes = request_classes(report.requests, report.block_size)
        if report.requests:
            report.workload = replay.workload(report.requests, clock)
            report.request_latency = replay.latency_rows(report.requests, clock)
    report.caveats += coverage_caveats(report)
    return report


def _interval(seconds: np.ndarray) -> float:
    return float(np.median(np.diff(seconds))) if len(seconds) > 1 else 0.0


def coverage_caveats(report: PoolReport) -> list[str]:
    """Say so when the metrics, the request spans and the block maps do not
    cover the same time (files of one signal deleted by rotation, or missing):
    the statistics would describe one part of the run and the maps another.

    Metrics and maps are periodic: their starts and ends are compared. Spans
    start with requests, which may come late: only spans that start before the
    metrics do are suspicious. Tolerance: two sampling intervals, at least 5%
    of the time covered."""
    metrics = report.quantities["used_blocks"].seconds
    ranges = {"metrics": (float(metrics[0]), float(metrics[-1]))}
    intervals = [_interval(metrics)]
    if report.requests:
        ranges["request spans"] = (float(report.clock.seconds(min(r.start_ns for r in report.requests))),
                                   float(report.clock.seconds(max(r.end_ns for r in report.requests))))
    if report.block_layout is not None:
        maps = report.clock.seconds(report.block_layout.times)
        ranges["block maps"] = (float(maps[0]), float(maps[-1]))
        intervals.append(_interval(maps))
    everything = max(end for _, end in ranges.values()) - min(start for start, _ in ranges.values())
    tolerance = max(2 * max(intervals), 0.05 * everything)
    start, end = ranges["metrics"]
    differ = ranges.get("request spans", ranges["metrics"])[0] < start - tolerance
    if "block maps" in ranges:
        differ |= abs(ranges["block maps"][0] - start) > tolerance or abs(ranges["block maps"][1] - end) > tolerance
    if not differ:
        return []
    covered = ", ".join(f"{name} {first:.3f}-{last:.3f} s" for name, (first, last) in ranges.items())
    return [f"the inputs cover different times ({covered}): the statistics come from the metrics' time only,"
            " the block layout from the maps' and the request figures from the spans'. Files deleted by rotation"
            " (VLLM_FRAG_OTEL_FILE_MAX_BYTES, VLLM_FRAG_OTEL_FILE_MAX_FILES) or missing from the input do this"]


UNTRACED = "vllm.frag_otel.requests.untraced"
# The plugin's own counters that qualify the numbers: (metric, what a non-zero total means).
CAVEATS = (
    (UNTRACED, "some requests had no span (VLLM_FRAG_OTEL_MAX_OPEN_SPANS were open;"
     " vllm.frag_otel.requests.untraced = {:.0f}): per-request figures leave them out"),
    ("vllm.frag_otel.measurements.dropped", "{:.0f} histogram measurements were dropped between two exports:"
     " allocate_slots times leave them out"),
    ("vllm.frag_otel.hook.errors", "{:.0f} errors inside the plugin's hooks (it disables itself after"
     " VLLM_FRAG_OTEL_MAX_HOOK_ERRORS): numbers after that stop changing"),
)


def _untraced(telemetry: Telemetry, source: Source) -> float:
    """Requests the plugin did not follow with a span (its own counter), 0 when the input does not say."""
    return float(sum(s.values[-1] for s in telemetry.series if s.metric == UNTRACED
                     and s.source in (source, Source(source.instance, ""))))


def run_summaries(paths: Sequence[Path]) -> list[tuple[Path, dict]]:
    """The summary.json of each simulator run among `paths` (`simulate --output DIR` writes
    DIR/summary.json beside DIR/telemetry), with where it is."""
    found = []
    for path in paths:
        candidates = [path / "summary.json"] if path.is_dir() else [path] if path.name == "summary.json" else []
        if path.is_dir() and path.name == "telemetry":
            candidates.append(path.parent / "summary.json")
        for summary in candidates:
            try:
                run = json.loads(summary.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(run, dict):
                found.append((summary, run))
    return found


def partial_runs(paths: Sequence[Path]) -> list[tuple[Path, dict]]:
    """Simulator runs among `paths` stopped before their workload ended (their summary.json
    says "partial"): (that summary.json, its content)."""
    return [(summary, run) for summary, run in run_summaries(paths) if run.get("partial")]


def interrupted_runs(runs: Sequence[tuple[Path, dict]]) -> list[str]:
    """The caveat of each interrupted simulator run among `runs` (`run_summaries`): the report
    covers only the steps that ran."""
    return [f"the simulator run in {summary.parent} was interrupted after {run.get('steps', '?')} steps, with"
            f" {run.get('finished_requests', '?')} requests finished (its summary.json: \"partial\": true): this"
            " report covers only what ran" for summary, run in runs if run.get("partial")]


def _caveats(telemetry: Telemetry, source: Source) -> list[str]:
    """What the plugin says about its own coverage of this pool (and its process)."""
    notes = []
    for metric, text in CAVEATS:
        totals = [s.values[-1] for s in telemetry.series if s.metric == metric
                  and s.source in (source, Source(source.instance, ""))]
        if sum(totals):
            notes.append(text.format(sum(totals)))
    return notes


def _block_size(quantities: dict[str, TimeSeries], groups: Sequence[GroupReport] = ()) -> int | None:
    """Token slots per used block, whenever blocks were in use: the block size of
    every group with token slots when the input has per-group metrics (None if
    they differ), else from the pool's slots and blocks (one group)."""
    if groups:
        sizes = {g.block_size for g in groups if g.token_slots and g.block_size}
        return sizes.pop() if len(sizes) == 1 else None
    slots, used = quantities["allocated_slots"].values, quantities["used_blocks"].values
    if len(slots) != len(used) or not np.any(used > 0):
        return None
    return int(round(float(np.median(slots[used > 0] / used[used > 0]))))


def new_blocks(request: RequestSpan, block_size: int | None) -> int | None:
    """Blocks a request took from the free list: what it held at each preemption
    and at its end, less what the prefix cache gave it at each admission
    (known for one-group models with a known block size)."""
    if not block_size or request.groups != 1:
        return None
    hits = request.hit_tokens + request.resumed_hit_tokens
    return request.released_blocks + request.allocated_slots // block_size - hits // block_size


def request_classes(requests: Sequence[RequestSpan], block_size: int | None) -> list[ClassRow]:
    """Rows by (prompt, output) size class, most unused slots first. Evictions
    are measured when every span says how many blocks its allocations evicted."""
    measured = bool(requests) and all(r.evicted_blocks is not None for r in requests)
    rows: dict[tuple[str, str], ClassRow] = {}
    for r in requests:
        key = (size_class(r.prompt_tokens), size_class(r.output_tokens))
        row = rows.setdefault(key, ClassRow(*key))
        row.requests += 1
        row.unused_slots += r.unused_slots
        row.preemptions += r.preemptions
        row.preempted_requests += r.preemptions > 0
        row.allocation_failures += r.allocation_failures
        taken = new_blocks(r, block_size)
        row.new_blocks = None if taken is None or row.new_blocks is None else row.new_blocks + taken
        if measured:
            row.measured_evictions = (row.measured_evictions or 0) + r.evicted_blocks
    return sorted(rows.values(), key=lambda row: (-row.unused_slots, -row.preemptions, row.label))


def histogram_quantile(bounds: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The q-quantile of a bucketed distribution, interpolated inside its bucket
    (the overflow bucket answers with the last bound: see `beyond_bounds`)."""
    cumulative = np.cumsum(counts)
    rank = q * cumulative[-1]
    i = int(np.searchsorted(cumulative, rank, side="left"))
    if i >= len(bounds):
        return float(bounds[-1])
    lower = bounds[i - 1] if i > 0 else 0.0
    below = cumulative[i - 1] if i > 0 else 0.0
    inside = counts[i]
    return float(lower + (bounds[i] - lower) * ((rank - below) / inside if inside else 1.0))


def beyond_bounds(bounds: np.ndarray, counts: np.ndarray, q: float) -> bool:
    """The q-quantile falls in the open-ended overflow bucket (above the last bound)."""
    cumulative = np.cumsum(counts)
    return bool(cumulative[len(bounds) - 1] < q * cumulative[-1])


# -- the four answers ------------------------------------------------------------------


def _duration(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def _share(part: float, whole: float) -> str:
    return pct(part / whole) if whole else "n/a"


def _quantile(h: Series, q: float) -> str:
    """A latency quantile; "> last bound" when it lies in the open-ended bucket."""
    counts = h.buckets[-1]
    if beyond_bounds(h.bounds, counts, q):
        return f"> {_duration(float(h.bounds[-1]))}"
    return _duration(histogram_quantile(h.bounds, counts, q))


def sample_rate(h: Series) -> float:
    """The share of allocate_slots calls the plugin timed (1 when the points do not say)."""
    try:
        return float(h.attributes.get(SAMPLE_RATE, 1.0))
    except ValueError:
        return 1.0


def latency_line(outcome: str, h: Series) -> str:
    """One outcome's allocate_slots times: what was timed, and how much of it."""
    count = h.values[-1]
    rate = sample_rate(h)
    timed = f"{count:.0f} calls" if rate >= 1 else (
        f"{count:.0f} timed calls, a random {pct(rate)} sample of all (vllm.kv_cache.allocation.sample_rate"
        f" {rate:g}; about {count / rate:.0f} calls in all)")
    return (f"  - allocate_slots time ({outcome or 'all'}): mean {_duration(h.sums[-1] / count)},"
            f" p50 {_quantile(h, 0.5)}, p99 {_quantile(h, 0.99)}, {h.sums[-1]:.3f} s over {timed}.")


@dataclass(frozen=True)
class Section:
    """A part of a pool's summary: its title line and the lines under it (`key`: what it
    answers, which `CHART_SECTIONS` places charts beside)."""

    key: str
    title: str
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join([self.title, *self.lines])


def sections(report: PoolReport) -> list[Section]:
    """The pool's summary, part by part, in reading order."""
    s, f = report.stats, report.final
    bs = report.block_size
    seconds = report.quantities["used_blocks"].seconds
    several = len(report.groups) > 1
    if several:
        groups = f"; {len(report.groups)} KV-cache groups"
    else:
        groups = f"; one KV-cache group ({report.groups[0].kind})" if report.groups else ""
    parts = [
        Section("overview", f"KV-cache report: {report.label}", [
            f"  {report.exports} exports over {seconds[-1] - seconds[0]:.1f} s; block size {bs or '?'};"
            f" {int(f['num_blocks'])} usable blocks{groups}; {len(report.requests)} request spans",
            *report.clock.note(),
            *(f"  caveat: {note}" for note in report.caveats),
        ]),
        Section("pattern", "1. What is the fragmentation pattern? (statistics over the exports)", [
            *gauge_lines(s),
            "",
            *([*group_lines([g.summary() for g in report.groups]), ""] if several else []),
            *totals_lines(f),
        ]),
        Section("causes", "2. What causes it?", _causes(report)),
        Section("costs", "3. What does it cost?", _costs(report)),
        Section("advice", "4. How to reduce it?",
                [f"  {i}. {text}" for i, text in enumerate(recommendations(report), 1)]),
    ]
    if report.classes:
        parts.append(Section("classes", "Requests by size class (from the vllm.kv_cache.request spans)",
                             class_table(report)))
    if report.request_latency:
        parts.append(_titled("latency", replay.latency_text(report.request_latency, len(report.requests),
                                                            report.clock.steps is not None)))
    several_pools = (f"the process's {report.unassigned_spans} request spans do not say which of its pools a request"
                     " used" if report.unassigned_spans else "")
    parts.append(_titled("replay", replay.workload_text(report.workload, report.untraced, several_pools)))
    if report.block_layout is not None:
        parts.append(_titled("layout", layout_lines(report)))
    return parts


def _titled(key: str, lines: list[str]) -> Section:
    """A section from lines whose first is its title."""
    return Section(key, lines[0], lines[1:])


def render_text(report: PoolReport) -> str:
    return "\n\n".join(section.text for section in sections(report))


def _near_full(report: PoolReport) -> float:
    return float(np.mean(report.quantities["used_blocks"].values >= NEAR_FULL * report.final["num_blocks"]))


def _causes(report: PoolReport) -> list[str]:
    s, f, bs = report.stats, report.final, report.block_size
    lines = [
        f"  - internal: on average {s['unused_slots']['mean']:.0f} token slots sat empty in"
        f" {s['partial_blocks']['mean']:.1f} partly filled blocks: each running request's last block"
        f" is filled token by token (at most {bs - 1 if bs else 'block size - 1'} empty slots per request"
        f"{' and KV-cache group with token slots' if len(report.groups) > 1 else ''})."
    ]
    top = report.classes[0] if report.classes else None
    if top is not None and top.unused_slots:
        total_unused = sum(c.unused_slots for c in report.classes)
        lines.append(
            f"    At their end, {top.label} requests held the most unused slots:"
            f" {_share(top.unused_slots, total_unused)} of them, from {_share(top.requests, len(report.requests))}"
            f" of the requests.")
    if len(report.groups) > 1:
        lines.append(_group_cause(report))
    lines.append(
        f"  - external: free blocks were split into {s['free_runs']['mean']:.1f} runs on average (largest"
        f" {s['largest_free_run']['mean']:.1f} blocks): requests release blocks in the order they finish, and"
        " cached blocks stay where they are until evicted.")
    near_full = _near_full(report)
    lines.append(
        f"  - pressure: used blocks reached {s['used_blocks']['max']:.0f} of {f['num_blocks']:.0f};"
        f" {pct(near_full)} of the exports saw the pool at least {pct(NEAR_FULL)} used. Allocations fail,"
        " and requests are preempted, when the pool has too few free blocks for the next step.")
    preempted = sorted(report.classes, key=lambda c: -c.preemptions)
    if preempted and preempted[0].preemptions:
        total = sum(c.preemptions for c in report.classes)
        lines.append(f"    Preempted most: {preempted[0].label} requests ({_share(preempted[0].preemptions, total)}"
                     f" of {total} preemptions; {preempted[0].preempted_requests} of their"
                     f" {preempted[0].requests} requests were preempted at least once).")
    evictions, never = f["evictions"], f["evicted_never_reused"]
    evicted = (f"{evictions:.0f} cached blocks were evicted to make room, {_share(never, evictions)} of them never"
               " reused after being cached (content nobody asked for again before it was dropped)." if evictions
               else "no cached block was evicted.")
    resumed_share = _share(f["prefix_resumed_hit_tokens"], f["prefix_resumed_queried_tokens"])
    resumed = f" (re-admissions after preemption apart: {resumed_share} hit)" if f["prefix_resumed_queried_tokens"] else ""
    lines.append(
        f"  - prefix cache: {_share(f['prefix_hit_tokens'], f['prefix_queried_tokens'])} of the tokens looked up at"
        f" first admission hit, as vLLM counts them{resumed}; {evicted}")
    by_class = [(evicted, c) for c in report.classes if (evicted := class_evictions(report, c)) is not None]
    total = sum(e for e, _ in by_class)
    if total > 0:
        top_evictions, top_class = max(by_class, key=lambda pair: pair[0])
        how = ("measured per request: vllm.kv_cache.block.evicted" if evictions_measured(report)
               else "estimated: new blocks x the pool's share of recycled allocations")
        lines.append(f"    Caused most evictions: {top_class.label} requests ({_share(top_evictions, total)} of"
                     f" {total:.0f} evictions, {how}; from {_share(top_class.requests, len(report.requests))}"
                     " of the requests).")
    return lines


def _group_cause(report: PoolReport) -> str:
    """Which KV-cache groups hold the blocks, and which wastes the most slots."""
    total = sum(g.stats["used_blocks"]["mean"] for g in report.groups)
    held = ", ".join(f"{g.kind} (group {g.group}) {g.stats['used_blocks']['mean']:.1f}"
                     f" ({_share(g.stats['used_blocks']['mean'], total)})" for g in report.groups)
    line = f"  - groups: of {total:.1f} blocks held on average, {held}."
    slotted = [g for g in report.groups if g.token_slots]
    if slotted:
        worst = max(slotted, key=lambda g: g.stats["internal_fragmentation"]["mean"])
        line += (f" Internal fragmentation is highest in {worst.kind} (group {worst.group}):"
                 f" {pct(worst.stats['internal_fragmentation']['mean'])} of its allocated slots empty on average.")
    return line


def _costs(report: PoolReport) -> list[str]:
    s, f, bs = report.stats, report.final, report.block_size
    pool_slots = f["num_blocks"] * bs if bs else 0
    lines = [
        f"  - memory: {s['unused_slots']['mean']:.0f} token slots allocated but empty on average"
        f" ({_share(s['unused_slots']['mean'], pool_slots)} of the pool), {s['unused_slots']['max']:.0f} at most.",
    ]
    preemptions = int(f["preemptions"])
    if not preemptions:
        lines.append("  - recomputation: none, no request was preempted.")
    elif report.requests and bs and any(r.released_blocks for r in report.requests):
        released = sum(r.released_blocks for r in report.requests)
        recovered = sum(r.resumed_hit_tokens for r in report.requests)
        preempted = sum(1 for r in report.requests if r.preemptions)
        lines.append(
            f"  - recomputation: {_plural(preemptions, 'preemption')} of {_plural(preempted, 'request')} released"
            f" {released} blocks (up to {released * bs} tokens of KV cache to compute again); {recovered} tokens of"
            " it came back from the prefix cache on re-admission.")
    else:
        lines.append(f"  - recomputation: {_plural(preemptions, 'preemption')} (each preempted request's KV cache is"
                     " computed again).")
    attempts, failures = f["allocation_attempts"], f["allocation_failures"]
    lines.append(f"  - waiting: {failures:.0f} of {attempts:.0f} allocate_slots calls failed"
                 f" ({_share(failures, attempts)}); each is a request that waits at least one more step.")
    timed = sorted(report.latency.items(), key=lambda kv: kv[0] != "success")
    lines += [latency_line(outcome, h) for outcome, h in timed if h.values[-1]]
    return lines


def recommendations(report: PoolReport) -> list[str]:
    """Advice that follows from the numbers, each with the numbers it follows from and
    what a sweep given with the input measured for it (or "untested")."""
    s, f, bs = report.stats, report.final, report.block_size
    sweeps = report.sweeps
    advised = []
    attempts, failures, preemptions = f["allocation_attempts"], f["allocation_failures"], f["preemptions"]
    held = s["tracked_requests"]["max"]
    if preemptions or failures:
        advised.append(
            f"The pool runs out ({preemptions:.0f} preemptions, {failures:.0f} failed allocations,"
            f" {_share(failures, attempts)} of calls). More KV-cache blocks (a higher --gpu-memory-utilization,"
            f" more GPUs): {advice.verdict(advice.MORE_MEMORY, sweeps) or advice.UNTESTED}.")
        advised.append(
            f"Admitting fewer requests at once (a lower --max-num-seqs; up to {held:.0f} requests held blocks at"
            " once here) preempts less but queues more, which can make requests slower:"
            f" {advice.verdict(advice.FEWER_SEQUENCES, sweeps) or advice.UNTESTED}.")
    internal = s["internal_fragmentation"]["mean"]
    if internal >= INTERNAL_WORTH_FIXING and bs and bs > 1:
        advised.append(
            f"Internal fragmentation averages {pct(internal)}: a smaller --block-size (e.g. {bs // 2}, if the"
            f" attention backend supports it) about halves the empty tail slots, some"
            f" {s['unused_slots']['mean'] / 2:.0f} token slots ({s['unused_slots']['mean'] / 2 / (bs // 2):.0f}"
            f" blocks of {bs // 2}) back on average:"
            f" {advice.verdict(advice.SMALLER_BLOCKS, sweeps) or advice.UNTESTED}.")
    elif internal >= INTERNAL_WORTH_FIXING:
        advised.append(f"Internal fragmentation averages {pct(internal)}: a smaller --block-size would cut the empty"
                       " tail slots (the input does not give one block size for this pool: see the KV-cache"
                       f" groups): {advice.verdict(advice.SMALLER_BLOCKS, sweeps) or advice.UNTESTED}.")
    else:
        measured = advice.verdict(advice.SMALLER_BLOCKS, sweeps)
        advised.append(f"Internal fragmentation averages {pct(internal)} (below {pct(INTERNAL_WORTH_FIXING)}):"
                       " the block size is not what limits this pool" + (f"; {measured}." if measured else "."))
    hit_rate = f["prefix_hit_tokens"] / f["prefix_queried_tokens"] if f["prefix_queried_tokens"] else 0.0
    reused_evicted = f["evictions"] - f["evicted_never_reused"]
    if reused_evicted and hit_rate:
        advised.append(
            f"{reused_evicted:.0f} evicted blocks had already served prefix-cache hits ({pct(hit_rate)} of"
            " tokens looked up at first admission hit): more KV-cache blocks would keep shared prefixes cached"
            f" longer: {advice.verdict(advice.MORE_MEMORY, sweeps, on_prefix_hits=True) or advice.UNTESTED}.")
    elif not f["prefix_queried_tokens"]:
        advised.append("Prefix caching was off (no token was looked up in the prefix cache): requests that share a"
                       " prompt prefix would reuse its blocks with it on:"
                       f" {advice.verdict(advice.PREFIX_CACHING, sweeps) or advice.UNTESTED}.")
    elif not hit_rate:
        advised.append("The prefix cache found nothing to reuse: no request shared a full block's worth of prompt"
                       " prefix with one still cached (a common system prompt, or routing requests with the same"
                       " prefix to the same replica, would change that; untested: what requests share is the"
                       " traffic's, not a setting a sweep can change).")
    advised.append(
        f"External fragmentation ({pct(s['external_fragmentation']['mean'])} on average) needs no action: paged"
        " attention never needs contiguous blocks.")
    advised.append(_sweep_advice(report, held))
    return advised


def _sweep_advice(report: PoolReport, held: float) -> str:
    """How to measure the advice: a what-if sweep of this traffic from this pool's settings."""
    trace = report.workload.path if report.workload is not None and report.workload.path is not None \
        else "TRACE.jsonl"
    config = report.run_config
    seqs = config.get("max_num_seqs") or "N"
    step = f" --step-seconds {config['step_seconds']:g}" if config.get("step_seconds") else ""
    blocks = f" --num-blocks {int(report.final['num_blocks']) + 1}" if report.block_size else ""
    size = f" --block-size {report.block_size}" if report.block_size else ""
    caching = "" if report.final["prefix_queried_tokens"] else " --no-prefix-caching"
    command = (f"vllm-frag-otel simulate --sweep --workload-file {trace}{blocks}{size} --max-num-seqs {seqs}{step}"
               f"{caching} --output what-if")
    given = f" (measured above from {', '.join(str(w.path) for w in report.sweeps)})" if report.sweeps else ""
    needs = ("" if config.get("max_num_seqs") else
             f"; N: your server's --max-num-seqs (at least {held:.0f}, the most requests that held blocks at once)")
    return (f"To measure a change before making it{given}, replay this mix with each setting halved and doubled:"
            f" `{command}`{needs}; then `vllm-frag-otel report` this input together with what-if/ puts each"
            " measured effect beside its advice (see --help and \"Replay this traffic\" below).")


def _sweep_mismatches(report: PoolReport, sweeps: Sequence[advice.Sweep]) -> list[str]:
    """Sweeps whose baseline is not this pool's size: their rows measure other settings."""
    notes = []
    for sweep in sweeps:
        base = sweep.baseline.setting
        if report.block_size and (base.num_blocks - 1, base.block_size) != (report.final["num_blocks"],
                                                                           report.block_size):
            notes.append(f"the sweep in {sweep.path} starts from {base.num_blocks - 1} blocks of {base.block_size},"
                         f" this pool has {report.final['num_blocks']:.0f} of {report.block_size}: its effects are"
                         " of other settings")
    return notes


def class_table(report: PoolReport) -> list[str]:
    """The requests by size class, as a fixed-width table and a note on its columns. New blocks, and
    evictions estimated from them, are left out (the note says why) when the spans cannot give them."""
    rows = report.classes

    def with_share(count: Callable[[ClassRow], int]) -> Callable[[ClassRow], str]:
        total = sum(count(r) for r in rows)
        return lambda row: f"{count(row)} ({_share(count(row), total)})"

    columns = [("requests", 14, with_share(lambda r: r.requests)),
               ("unused slots", 18, with_share(lambda r: r.unused_slots)),
               ("preemptions", 16, with_share(lambda r: r.preemptions)),
               ("failed allocs", 16, with_share(lambda r: r.allocation_failures))]
    known, measured = new_blocks_known(report), evictions_measured(report)
    if known:
        columns.append(("new blocks", 16, with_share(lambda r: r.new_blocks)))
    if class_evictions_known(report):
        columns.append(("evictions" if measured else "est. evictions", 16,
                        lambda row: f"{class_evictions(report, row):.0f}"))
    lines = [f"  {'prompt / output tokens':<24}" + "".join(f"{title:>{width}}" for title, width, _ in columns)]
    lines += [f"  {r.prompt + ' / ' + r.output:<24}" + "".join(f"{cell(r):>{width}}" for _, width, cell in columns)
              for r in rows]
    note = "  unused slots: at each request's end."
    if known:
        note += " new blocks: taken from the free list over its life;"
    if measured:
        note += " evictions: cached blocks its own allocations evicted (vllm.kv_cache.block.evicted)."
    elif known:
        note += (" est. evictions = new blocks x the pool's share of recycled allocations"
                 f" ({pct(_recycled_share(report))}): the spans do not say which request's allocation evicted a"
                 " block.")
    if not known:
        note += f" New blocks (taken from the free list) are not shown: {new_blocks_unknown_why(report)}."
    if not known and not measured:
        note += (" Nor are evictions: the spans do not say which request's allocation evicted a block, and without"
                 " new blocks they cannot be estimated.")
    return [*lines, note]


def evictions_measured(report: PoolReport) -> bool:
    """Every class's evictions are measured (every span of the pool carries vllm.kv_cache.block.evicted)."""
    return bool(report.classes) and all(c.measured_evictions is not None for c in report.classes)


def class_evictions(report: PoolReport, row: ClassRow) -> float | None:
    """Evictions the class's allocations caused: measured when every span says, else
    estimated (new blocks x the pool's share of recycled allocations); None when
    neither is known."""
    if evictions_measured(report):
        return float(row.measured_evictions)
    return None if row.new_blocks is None else row.new_blocks * _recycled_share(report)


def class_evictions_known(report: PoolReport) -> bool:
    """`class_evictions` has an answer: measured, or estimated from known new blocks."""
    return evictions_measured(report) or new_blocks_known(report)


def new_blocks_known(report: PoolReport) -> bool:
    """Every request's new blocks are known (`new_blocks`)."""
    return all(c.new_blocks is not None for c in report.classes)


def new_blocks_unknown_why(report: PoolReport) -> str:
    """Why the spans cannot say how many blocks the pool's requests took from the free list."""
    if any(r.groups != 1 for r in report.requests):
        return ("the model has several KV-cache groups, and its spans say what a request held at its peak and at its"
                " end, over all groups, not what it took from the free list: a sliding-window group frees the blocks"
                " that leave its window and takes new ones as the request grows")
    return "the pool's block size is not known, so its requests' token slots do not give their blocks"


def _recycled_share(report: PoolReport) -> float:
    f = report.final
    taken = f["blocks_allocated_fresh"] + f["blocks_allocated_recycled"]
    return f["blocks_allocated_recycled"] / taken if taken else 0.0


# -- block layout ------------------------------------------------------------------------


@dataclass(frozen=True)
class Hotspots:
    regions: list[layout.Region]
    windows: list[layout.Window]
    holes: list[layout.Hole]  # the longest-lived of each kind, by idle memory

    def hole_kinds(self) -> list[tuple[str, list[layout.Hole]]]:
        """(kind, its holes ranked by idle memory), in layout.HOLE_KINDS order."""
        return [(kind, [h for h in self.holes if h.kind == kind]) for kind in layout.HOLE_KINDS]


# What each kind of hole is, in the summary.
HOLE_TITLES = {
    "never_used": "never used: unheld at every map, from the first to the last",
    "open": "still unheld at the last map",
    "ended": "ended: held again before the last map",
}


def hotspots(report: PoolReport) -> Hotspots:
    """The pool's hottest block regions and time windows and the longest-lived
    holes of each kind (times on the report's clock)."""
    lay = report.block_layout
    seconds = report.clock.seconds(lay.times)
    return Hotspots(
        regions=layout.hot_regions(lay, LAYOUT_REGIONS, TOP_HOTSPOTS),
        windows=layout.hot_windows(lay, seconds, LAYOUT_WINDOWS, TOP_HOTSPOTS),
        holes=layout.long_lived_holes(lay, seconds, TOP_HOLES),
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _blocks(first: int, last: int) -> str:
    return f"block {first}" if first == last else f"blocks {first}-{last}"


def layout_lines(report: PoolReport) -> list[str]:
    """The block-layout section of the summary."""
    lay = report.block_layout
    seconds = report.clock.seconds(lay.times)
    maps = len(lay.times)
    every = f", every ~{float(np.median(np.diff(seconds))):.3g} s" if maps > 1 else ""
    shares = lay.counts.sum(axis=2).mean(axis=0) / lay.num_blocks
    found = report.hotspots
    lines = [
        f"Block layout ({_plural(maps, 'map')}{every}"
        f"{f', evenly spaced among {lay.maps_seen}' if lay.maps_seen > maps else ''}, {lay.num_blocks} blocks,"
        f" {_plural(lay.cells, 'cell')} of {_plural(lay.bin_size, 'block')}; from {seconds[0]:.3f} s"
        f" to {seconds[-1]:.3f} s)",
        "  blocks by state, averaged over the maps: "
        + ", ".join(f"{name} {pct(float(share))}" for name, share in zip(layout.BLOCK_STATES, shares)),
    ]
    if maps < 2:
        lines.append("  one map: no state changes to count")
    elif not found.regions:
        lines.append("  no block changed state between two maps")
    else:
        lines.append(f"  hottest block regions (of {min(LAYOUT_REGIONS, lay.cells)} equal ranges of block ids; state"
                     " changes between consecutive maps):")
        lines += [f"    {_blocks(r.first_block, r.last_block)}: {r.changes} changes ({pct(r.share)}),"
                  f" {r.changes_per_block:.2f} per block" for r in found.regions]
        lines.append(f"  hottest time windows (of {min(LAYOUT_WINDOWS, maps - 1)} with equal numbers of map"
                     " intervals):")
        lines += [f"    {w.start_s:.3f}-{w.end_s:.3f} s: {w.changes} changes ({pct(w.share)}),"
                  f" {w.changes_per_second:.1f} per second" for w in found.windows]
    lines.append("  longest-lived holes, by idle memory (blocks x seconds; a hole: adjacent blocks left unheld, empty"
                 " or cached, at the same map and unheld since):")
    for kind, holes in found.hole_kinds():
        lines.append(f"    {HOLE_TITLES[kind]}:" if holes else f"    {HOLE_TITLES[kind]}: none")
        lines += [f"      {_blocks(h.first_block, h.last_block)} ({_plural(h.blocks, 'block')}):"
                  f" since {h.since_s:.3f} s → until {h.until_s:.3f} s ({h.seconds:.3f} s)" for h in holes]
    note = ("  note: changes are counted between consecutive maps, a lower bound: a block that changed and changed"
            " back between two maps is not seen.")
    if lay.bin_size > 1:
        note += (f" Cells are bins of {lay.bin_size} blocks: changes that swap states between blocks of one cell"
                 " cancel out (fewer changes are seen), and a hole is a run of cells whose every block is unheld.")
    lines.append(note)
    return lines


# -- charts --------------------------------------------------------------------------------


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each value and the `window` - 1 before it (fewer at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def ratio_panel(report: PoolReport, label: str, name: str, smooth: int, *others: Line) -> Panel:
    """One fragmentation ratio on its own scale, with its rolling mean over `smooth` exports (2 or more)
    and `others` on the same scale."""
    q = report.quantities[name]
    lines = [Line(label, q.seconds, q.values)]
    if smooth > 1:
        lines.append(Line(f"rolling mean of {smooth} exports", q.seconds, rolling_mean(q.values, smooth)))
    return Panel(label.split(" (")[0], (*lines, *others), percent=True, xlabel=report.clock.axis)


def charts(report: PoolReport, smooth: int = 0) -> list[Chart]:
    """Every chart of one pool; `smooth`: exports in the fragmentation ratios' rolling mean (0: none)."""
    q = report.quantities
    x = q["used_blocks"].seconds
    axis = report.clock.axis

    def line(label: str, name: str) -> Line:
        return Line(label, q[name].seconds, q[name].values)

    blocks_in_use = q["used_blocks"].values / max(report.final["num_blocks"], 1)
    # external fragmentation is a share of the pool's free blocks: it can never exceed them
    free_share = Line("free blocks (empty or cached) / usable blocks: its ceiling", q["empty_blocks"].seconds,
                      (q["empty_blocks"].values + q["cached_blocks"].values) / max(report.final["num_blocks"], 1))
    result = [
        Chart("block_states", "KV-cache blocks by state", (Panel("blocks", (
            line("used", "used_blocks"),
            line("cached (evictable)", "cached_blocks"),
            line("empty", "empty_blocks"),
        ), style="stack", xlabel=axis),), caption="The pool's blocks over time, stacked by state: held by running"
              " requests, cached (holding prefix-cache content, evictable) and empty; they add up to the usable"
              " blocks."),
        Chart("slot_utilization", "Blocks in use, and token slots in them holding a computed token: the gap is"
              " allocated but unused slots", (Panel("share", (
                  Line("blocks in use (used / usable blocks)", x, blocks_in_use),
                  line("slot utilization (token slots holding computed tokens / all slots)", "slot_utilization"),
              ), percent=True, xlabel=axis),), caption="The share of usable blocks in use beside the share of"
              " all token slots holding a computed token: the gap between the two lines is slots allocated to"
              " requests but still unused (internal fragmentation)."),
        Chart("fragmentation", "Fragmentation ratios, each on its own scale", (
            ratio_panel(report, "internal (unused / allocated slots)", "internal_fragmentation", smooth),
            ratio_panel(report, "external (free blocks outside the largest free run / usable blocks)",
                        "external_fragmentation", smooth, free_share),
        ), caption="Top: the share of allocated token slots that hold nothing yet (the internal kind). Bottom: the"
           " free blocks (empty or cached) outside the largest run of consecutive free block ids, as a share of the"
           " usable blocks, under its ceiling, the free share of the pool (paged attention never needs a run)."),
        Chart("evictions", "Prefix-cache evictions (running totals)", (Panel("blocks", (
            line("evicted", "evictions"),
            line("evicted, never reused after caching", "evicted_never_reused"),
        ), xlabel=axis),), caption="Cached blocks evicted to make room, as running totals, and those of them"
              " that no request had reused after they were cached."),
        Chart("preemptions", "Preemptions and failed allocations (running totals)", (Panel("count", (
            line("preemptions", "preemptions"),
            line("failed allocate_slots calls", "allocation_failures"),
        ), xlabel=axis),), caption="Preempted requests and failed allocate_slots calls, as running totals: where"
              " they climb, the pool was too full for the next step."),
    ]
    timed = [(outcome, h) for outcome, h in sorted(report.latency.items()) if h.values[-1]]
    if timed:
        sampled = min(sample_rate(h) for _, h in timed)
        title = "allocate_slots duration" + (f" (a {pct(sampled)} sample of calls)" if sampled < 1 else " (all calls)")
        lines = tuple(_latency_line(outcome, h) for outcome, h in timed)
        result.append(Chart("allocation_latency", title, (Panel(
            "calls (log scale)", lines, style="stairs",
            xlabel="seconds elapsed per call (perf_counter; bucket bounds, open-ended buckets drawn one decade wide)",
            log_x=True, log_y=True, x_range=_filled_range(lines)),),
            caption="How long allocate_slots took per call (elapsed time, not CPU time), as a histogram of the"
                    " timed calls by outcome: counts per duration bucket on a log scale, the axis spanning the"
                    " buckets that hold calls."))
    if report.classes:
        rows = report.classes
        positions = np.arange(len(rows), dtype=np.float64)

        def share(values: list[float]) -> np.ndarray:
            array = np.array(values, dtype=np.float64)
            return array / array.sum() if array.sum() else array

        shares = [
            Line("requests", positions, share([r.requests for r in rows])),
            Line("unused slots at end", positions, share([r.unused_slots for r in rows])),
            Line("preemptions", positions, share([r.preemptions for r in rows])),
        ]
        if class_evictions_known(report):
            shares.append(Line("evictions" if evictions_measured(report) else "est. evictions", positions,
                               share([class_evictions(report, r) for r in rows])))
        result.append(Chart("request_classes", "Share of each request size class (prompt / output tokens)", (Panel(
            "share", tuple(shares), style="bars", xlabel="", percent=True,
            categories=tuple(f"{r.prompt} / {r.output}" for r in rows)),),
            caption="For each request size class (prompt / output tokens), its share of the requests beside its"
                    " share of the unused slots at the requests' end, of the preemptions and (where known) of the"
                    " evictions: a class whose other bars stand above its requests bar costs more than its number."))
    if report.request_latency:
        result.append(latency_chart(report))
    if len(report.groups) > 1:
        result.append(groups_chart(report))
    if report.block_layout is not None:
        result.append(layout_chart(report))
    return result


NOT_MET = {"preempted": "never preempted", "failed allocation": "no failed allocation"}
# what the groups chart's second panel plots, a ratio
INTERNAL_RATIO = "internal fragmentation\n(unused / allocated slots)"


def latency_chart(report: PoolReport) -> Chart:
    """Median seconds per output token by prompt class: requests that met a
    preemption (a failed allocation) beside those that did not."""
    panels = []
    for event in replay.EVENTS:
        rows = [r for r in report.request_latency if r.event == event]
        positions = np.arange(len(rows), dtype=np.float64)
        panels.append(Panel(f"p50 s per output token\n({event})", (
            Line(event, positions, np.array([r.met.per_token[0] for r in rows])),
            Line(NOT_MET[event], positions, np.array([r.spared.per_token[0] for r in rows])),
        ), style="bars", xlabel="prompt tokens", categories=tuple(r.prompt for r in rows), fit_y=True))
    unit = "simulated seconds" if report.clock.steps is not None else "seconds"
    return Chart("request_latency", f"Time per output token ({unit}) of complete requests, with and without"
                 " KV-cache events", tuple(panels), columns=2,
                 caption="Median time per output token of the complete requests of each prompt size class: those"
                         " preempted (left) or with a failed allocation (right) beside the others of the class. The"
                         " axes span the medians' range, not from 0, so that differences of a few percent show; a"
                         " missing bar is a class with no such request.")


def groups_chart(report: PoolReport) -> Chart:
    """Blocks held per KV-cache group, and internal fragmentation of each group with token slots."""
    blocks = tuple(Line(f"{g.kind} (group {g.group})", g.quantities["used_blocks"].seconds,
                        g.quantities["used_blocks"].values) for g in report.groups)
    # stacked when every group was exported at the same times (one collection exports them all)
    stack = all(np.array_equal(line.x, blocks[0].x) for line in blocks)
    panels = [Panel("blocks held", blocks, style="stack" if stack else "line", xlabel=report.clock.axis)]
    slotted = [g for g in report.groups if g.token_slots]
    if slotted:
        panels.append(Panel(INTERNAL_RATIO, tuple(
            Line(f"{g.kind} (group {g.group})", g.quantities["internal_fragmentation"].seconds,
                 g.quantities["internal_fragmentation"].values) for g in slotted), percent=True,
            xlabel=report.clock.axis))
    return Chart("kv_cache_groups", "KV-cache groups: blocks held, and the internal fragmentation of the groups"
                 " with token slots", tuple(panels),
                 caption="Blocks held by each KV-cache group over time (a Mamba group's blocks are state pages) and,"
                         " for the groups whose blocks hold token slots, their internal fragmentation: unused /"
                         " allocated token slots, the share of the slots in the group's blocks that hold no token.")


def layout_chart(report: PoolReport) -> Chart:
    """Top: every cell's state mix at every map (layout.image); bottom: blocks that
    changed state per region between consecutive maps (layout.region_churn).
    Columns sit at their times: map t spans halfway to its neighbours
    (layout.column_edges), interval i from map i to map i + 1."""
    lay = report.block_layout
    seconds = report.clock.seconds(lay.times)
    cell_edges = 0.5 + np.minimum(np.arange(lay.cells + 1) * lay.bin_size, lay.num_blocks)
    bins = f" (cells of {lay.bin_size} blocks)" if lay.bin_size > 1 else ""
    panels = [Panel(
        f"block id{bins}", (), style="image", image=layout.image(lay), xlabel=report.clock.axis,
        x_edges=layout.column_edges(seconds), y_edges=cell_edges,
        swatches=tuple((name, tuple(float(c) for c in colour))
                       for name, colour in zip(layout.BLOCK_STATES, layout.STATE_COLOURS)),
    )]
    region_edges, per_region = layout.region_churn(lay, LAYOUT_REGIONS)
    if per_region.size:
        panels.append(Panel(
            "block id (regions)", (), style="image", image=per_region.T, xlabel=report.clock.axis,
            x_edges=seconds, y_edges=cell_edges[region_edges], colorbar="blocks that changed state",
        ))
    return Chart("block_layout", "Block layout: every block's state over time, and where it changes",
                 tuple(panels), row_height=3.5,
                 caption="Top: every block id's state (colour) at each block map over time. Bottom: how many blocks"
                         " of each block-id region changed state between consecutive maps (darker: more churn).")


def _latency_line(outcome: str, h: Series) -> Line:
    edges = np.concatenate([[h.bounds[0] / 10], h.bounds, [h.bounds[-1] * 10]])
    return Line(outcome or "all", edges, h.buckets[-1])


def _filled_range(lines: Sequence[Line]) -> tuple[float, float]:
    """From the lower edge of the first bucket holding anything to the upper edge of the last
    (of any line), 1.25 times wider each side on the log axis."""
    filled = [(line.x[i], line.x[i + 1]) for line in lines for i in np.flatnonzero(line.y)]
    return min(low for low, _ in filled) / 1.25, max(high for _, high in filled) * 1.25


# -- files -----------------------------------------------------------------------------------


@dataclass
class Written:
    summary: str
    paths: list[Path]
    reports: list[PoolReport]
    problems: list[InputProblem]


def _attribute_text(attributes: dict[str, str]) -> str:
    return ";".join(f"{k}={v}" for k, v in sorted(attributes.items()))


def write_series(telemetry: Telemetry, clocks: Clocks, out: Path) -> list[Path]:
    """Every series: series.csv (gauges, sums, histogram counts), histograms.csv
    (running bucket counts), series.json (all of it); seconds on each process's clock."""
    records = []
    with open(out / "series.csv", "w", newline="") as numbers, open(out / "histograms.csv", "w", newline="") as hist:
        series_csv, histogram_csv = csv.writer(numbers), csv.writer(hist)
        series_csv.writerow(["instance", "pool", "metric", "attributes", "kind", "unit", "time_unix_nano", "seconds",
                             "value"])
        # one row per bucket: its upper bound (in the series' unit), the calls in it, and in it and every bucket below
        histogram_csv.writerow(["instance", "pool", "metric", "attributes", "unit", "time_unix_nano", "seconds",
                                "total_count", "sum", "upper_bound", "count_in_bucket", "cumulative_count"])
        for s in telemetry.series:
            head = [s.source.instance, s.source.pool, s.metric, _attribute_text(s.attributes)]
            seconds = clocks.of(s.source.instance).seconds(s.times)
            for i, (t, v) in enumerate(zip(s.times.tolist(), s.values.tolist())):
                series_csv.writerow([*head, s.kind, s.unit, t, f"{seconds[i]:.6f}", v])
                if s.kind == "histogram":
                    bounds = [*s.bounds.tolist(), "+Inf"]
                    counts = s.buckets[i]
                    for bound, count, below in zip(bounds, counts.tolist(), np.cumsum(counts).tolist()):
                        histogram_csv.writerow([*head, s.unit, t, f"{seconds[i]:.6f}", v, s.sums[i], bound, count,
                                                below])
            record = {"instance": s.source.instance, "pool": s.source.pool, "metric": s.metric,
                      "attributes": s.attributes, "kind": s.kind, "unit": s.unit,
                      "time_unix_nano": s.times.tolist(), "values": s.values.tolist()}
            if s.kind == "histogram":
                record.update(sums=s.sums.tolist(), bounds=s.bounds.tolist(), buckets=s.buckets.tolist())
            records.append(record)
    document = {
        "note": "sums and histograms are running totals since the first point, whatever the source temporality;"
                " seconds: simulated seconds for a simulator process with its clock file, else wall-clock seconds"
                " since the first point of all inputs",
        "files": [str(p) for p in telemetry.files],
        "resources": telemetry.resources,
        "series": records,
    }
    (out / "series.json").write_text(json.dumps(document))
    return [out / "series.csv", out / "histograms.csv", out / "series.json"]


def write_requests(reports: Sequence[PoolReport], out: Path) -> list[Path]:
    rows = [(r, request) for r in reports for request in r.requests]
    if not rows:
        return []
    names = [f for f in RequestSpan.__dataclass_fields__]
    with open(out / "requests.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*names, "prompt_class", "output_class", "new_blocks"])
        for report, request in rows:
            taken = new_blocks(request, report.block_size)
            writer.writerow([*asdict(request).values(), size_class(request.prompt_tokens),
                             size_class(request.output_tokens), "" if taken is None else taken])
    with open(out / "request_classes.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["instance", "pool", "prompt_class", "output_class", "requests", "unused_slots", "preemptions",
                         "preempted_requests", "allocation_failures", "new_blocks", "evictions",
                         "evictions_measured"])
        for report in reports:
            measured = evictions_measured(report)
            for c in report.classes:
                writer.writerow([report.source.instance, report.source.pool, c.prompt, c.output, c.requests,
                                 c.unused_slots, c.preemptions, c.preempted_requests, c.allocation_failures,
                                 "" if c.new_blocks is None else c.new_blocks,
                                 c.measured_evictions if measured else
                                 "" if c.new_blocks is None else round(class_evictions(report, c), 1),
                                 "true" if measured else "false"])
    return [out / "requests.csv", out / "request_classes.csv"]


GROUP_CSV_FIELDS = ["instance", "pool", "group", "kind", "token_slots", "block_size", "exports", "blocks_mean",
                    "blocks_p50", "blocks_max", "blocks_final", "internal_fragmentation_mean",
                    "internal_fragmentation_max", "unused_slots_mean", "unused_slots_max", "partial_blocks_mean"]


def write_groups(reports: Sequence[PoolReport], out: Path) -> list[Path]:
    """groups.csv: each pool's KV-cache groups, one row each (slot columns empty
    for a group without token slots); nothing when no input has per-group metrics."""
    if not any(r.groups for r in reports):
        return []
    with open(out / "groups.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, GROUP_CSV_FIELDS)
        writer.writeheader()
        for r in reports:
            for g in r.groups:
                row = {"instance": r.source.instance, "pool": r.source.pool, "group": g.group, "kind": g.kind,
                       "token_slots": "true" if g.token_slots else "false",
                       "block_size": "" if g.block_size is None else g.block_size,
                       "exports": len(g.quantities["used_blocks"].values),
                       **{f"blocks_{k}": v for k, v in g.stats["used_blocks"].items()}}
                if g.token_slots:
                    row.update(internal_fragmentation_mean=g.stats["internal_fragmentation"]["mean"],
                               internal_fragmentation_max=g.stats["internal_fragmentation"]["max"],
                               unused_slots_mean=g.stats["unused_slots"]["mean"],
                               unused_slots_max=g.stats["unused_slots"]["max"],
                               partial_blocks_mean=g.stats["partial_blocks"]["mean"])
                writer.writerow(row)
    return [out / "groups.csv"]


HOTSPOT_FIELDS = ["instance", "pool", "kind", "rank", "first_block", "last_block", "blocks", "start_s", "end_s",
                  "changes", "share", "changes_per_block", "changes_per_second", "open", "status"]


def write_layouts(reports: Sequence[PoolReport], out: Path) -> list[Path]:
    """Each pool's maps as <prefix>block_layout.npz (times_unix_nano, counts as
    (maps, states, cells), num_blocks, bin_size, states), and every pool's
    hotspots in hotspots.csv."""
    with_layout = [r for r in reports if r.block_layout is not None]
    if not with_layout:
        return []
    written = []
    rows = []
    for r in with_layout:
        lay = r.block_layout
        path = out / f"{r.prefix}block_layout.npz"
        np.savez_compressed(path, times_unix_nano=lay.times, counts=lay.counts.astype(np.min_scalar_type(lay.bin_size)),
                            num_blocks=lay.num_blocks, bin_size=lay.bin_size, states=np.array(layout.BLOCK_STATES))
        written.append(path)
        found = r.hotspots
        head = {"instance": r.source.instance, "pool": r.source.pool}
        rows += [{**head, "kind": "region", "rank": i, "first_block": g.first_block, "last_block": g.last_block,
                  "blocks": g.last_block - g.first_block + 1, "changes": g.changes, "share": f"{g.share:.6f}",
                  "changes_per_block": f"{g.changes_per_block:.6f}"} for i, g in enumerate(found.regions, 1)]
        rows += [{**head, "kind": "window", "rank": i, "start_s": f"{w.start_s:.6f}", "end_s": f"{w.end_s:.6f}",
                  "changes": w.changes, "share": f"{w.share:.6f}", "changes_per_second": f"{w.changes_per_second:.6f}"}
                 for i, w in enumerate(found.windows, 1)]
        rows += [{**head, "kind": "hole", "rank": i, "first_block": h.first_block, "last_block": h.last_block,
                  "blocks": h.blocks, "start_s": f"{h.since_s:.6f}", "end_s": f"{h.until_s:.6f}",
                  "open": "true" if h.open else "false", "status": kind}
                 for kind, holes in found.hole_kinds() for i, h in enumerate(holes, 1)]
    with open(out / "hotspots.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, HOTSPOT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return [*written, out / "hotspots.csv"]


@dataclass(frozen=True)
class Clocks:
    """Each process's clock: simulated time for a simulator process whose clock
    file is among the inputs, else wall-clock seconds since `start_ns`."""

    start_ns: int
    simulated: dict[str, Clock]  # by instance

    def of(self, instance: str) -> Clock:
        return self.simulated.get(instance, Clock(self.start_ns))


def match_clocks(telemetry: Telemetry, found: Sequence[simclock.StepClock], start_ns: int) -> Clocks:
    """The clock file of each simulator process: the same host and pid, at overlapping times."""
    simulated = {}
    for instance, resource in telemetry.resources.items():
        times = [t for s in telemetry.series if s.source.instance == instance for t in (s.times[0], s.times[-1])]
        for clock in found:
            if (resource.get("host.name"), resource.get("process.pid")) == (clock.host, clock.pid) and times and \
                    min(times) <= clock.wall_ns[-1] and max(times) >= clock.wall_ns[0]:
                simulated[instance] = Clock(start_ns, clock)
    return Clocks(start_ns, simulated)


# Lists the files a report wrote into its directory, so that the next report into
# the same directory removes them first (and nothing else).
MANIFEST = ".vllm-frag-otel-report"


def remove_earlier_outputs(out: Path) -> None:
    """Delete the files an earlier report listed in `out`'s manifest (plain names in `out` only)."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        return
    for name in manifest.read_text().splitlines():
        earlier = out / name
        if name and Path(name).name == name and earlier.is_file():
            earlier.unlink()
    manifest.unlink()


def build(paths: Sequence[Path], out: Path, pictures: bool = True, smooth: int = 0) -> Written:
    """Read `paths`, write everything into `out` (after removing what an earlier
    report wrote there); raises ValueError when no pool's metrics were found (the
    problems are in the message). `smooth`: see `charts`."""
    telemetry = otlp_read.read(paths)
    pools = telemetry.pools()
    if not pools:
        found = f"{len(telemetry.files)} OTLP file(s)" if telemetry.files else "no OTLP files"
        problems = "".join(f"\n  {p}" for p in telemetry.problems)
        raise ValueError(f"no vllm.kv_cache metrics in {', '.join(map(str, paths))} ({found}){problems}")
    out.mkdir(parents=True, exist_ok=True)
    remove_earlier_outputs(out)
    start = min([int(s.times[0]) for s in telemetry.series]
                + [m.time_unix_nano for maps in telemetry.block_maps.values() for m in maps])
    clocks = match_clocks(telemetry, simclock.find(paths, telemetry.problems), start)
    reports, skipped = [], []
    for source in pools:
        try:
            reports.append(pool_report(telemetry, source, start, len(pools) > 1, clocks.of(source.instance)))
        except ValueError as exc:
            skipped.append(str(exc))
    if not reports:
        raise ValueError("\n  ".join(["no pool with every metric the report needs", *skipped]))
    runs = run_summaries(paths)
    interrupted = interrupted_runs(runs)
    sweeps, sweep_problems = advice.find_sweeps(paths)
    configs = [run["config"] for _, run in runs if isinstance(run.get("config"), dict)]
    for r in reports:
        r.caveats += interrupted + sweep_problems + _sweep_mismatches(r, sweeps)
        r.sweeps = sweeps
        r.run_config = configs[0] if len(configs) == 1 else {}
    inputs = "\n".join([
        f"input: {len(telemetry.files)} OTLP file(s), {len(telemetry.ignored)} ignored (no OTLP),"
        f" {len(telemetry.problems)} problem(s)",
        *(f"  read {path}" for path in telemetry.files),
        *(f"  ignored {path}: no OTLP line in it" for path in telemetry.ignored),
        *(f"  simulated time from {clock.steps.path}" for clock in clocks.simulated.values()),
        *(f"  {problem}" for problem in telemetry.problems),
        *(f"  {why}" for why in skipped),
    ])
    # the workload files first: the summary says where they are
    replayed = [replay.write_workload(r.workload, out / f"{r.prefix}{replay.WORKLOAD_FILE}")
                for r in reports if r.workload is not None and r.workload.lines]
    outlines = [sections(r) for r in reports]
    texts = ["\n\n".join(section.text for section in outline) for outline in outlines]
    summary = "\n\n".join([*texts, inputs]) + "\n"
    written = [out / "summary.txt", *replayed]
    written[0].write_text(summary)
    written += write_series(telemetry, clocks, out)
    written += write_requests(reports, out)
    written += replay.write_latency([(r.source.instance, r.source.pool, r.request_latency) for r in reports],
                                    out / replay.LATENCY_FILE)
    written += write_groups(reports, out)
    written += write_layouts(reports, out)
    drawn: dict[str, list[tuple[Chart, Path]]] = {}
    if pictures:
        for r in reports:
            drawn[r.prefix] = [(chart, draw(chart, out, r.prefix)) for chart in charts(r, smooth)]
            written += [image for _, image in drawn[r.prefix]]
    written.append(write_html(reports, outlines, drawn, inputs, out / "report.html"))
    (out / MANIFEST).write_text("".join(f"{path.name}\n" for path in written))
    return Written(summary, written, reports, telemetry.problems)


# The summary section each chart supports: the HTML report shows it there.
CHART_SECTIONS = {
    "block_states": "pattern",
    "fragmentation": "pattern",
    "kv_cache_groups": "pattern",
    "evictions": "causes",
    "slot_utilization": "costs",
    "preemptions": "costs",
    "allocation_latency": "costs",
    "request_classes": "classes",
    "request_latency": "latency",
    "block_layout": "layout",
}
STYLE = (
    "body{font-family:sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}"
    "p,li{overflow-wrap:anywhere}li{margin:.2em 0}"
    "pre.table{background:#f6f6f6;padding:.6em 1em;overflow-x:auto;font-size:12.5px;line-height:1.3}"
    "p.caveat{background:#fff4e0;border-left:4px solid #e69500;padding:.4em .8em}"
    "code{background:#f0f0f0;padding:0 .2em}"
    "img{max-width:100%}figure{margin:1.2em 0 2em}figcaption{color:#444;font-size:14px;max-width:900px}"
)


def write_html(reports: Sequence[PoolReport], outlines: Sequence[list[Section]],
               drawn: dict[str, list[tuple[Chart, Path]]], inputs: str, path: Path) -> Path:
    """One page, no external references: each pool's summary, section by section, with each chart
    (inlined) under the section it supports, then the input."""
    parts = []
    for r, parts_of_pool in zip(reports, outlines):
        pictures = drawn.get(r.prefix, [])
        for section in parts_of_pool:
            heading = "h2" if section.key == "overview" else "h3"
            parts.append(f"<{heading}>{html.escape(section.title.strip())}</{heading}>{_html_body(section.lines)}")
            parts += [_html_figure(chart, image) for chart, image in pictures
                      if CHART_SECTIONS[chart.name] == section.key]
    path.write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>vllm-frag-otel report</title><style>{STYLE}"
        "</style></head><body><h1>KV-cache report</h1>"
        + "".join(parts)
        + f"<h2>Input</h2>{_html_body(inputs.splitlines())}</body></html>\n"
    )
    return path


def _html_figure(chart: Chart, image: Path) -> str:
    caption = html.escape(chart.caption or chart.title)
    data = base64.b64encode(image.read_bytes()).decode()
    return (f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _aligned(line: str) -> bool:
    """A line of a fixed-width table: its cells are padded to columns (prose has no run of three spaces)."""
    return "   " in line.strip()


def _html_body(lines: Sequence[str]) -> str:
    """Summary lines as HTML: each run of fixed-width table lines as one preformatted table, the
    rest as paragraphs and lists nested by indentation ("- " items bulleted, "1. " items numbered)."""
    parts = []
    for aligned, run in itertools.groupby([line for line in lines if line.strip()], key=_aligned):
        run = list(run)
        if aligned:
            parts.append(f'<pre class="table">{html.escape(textwrap.dedent(chr(10).join(run)))}</pre>')
        else:
            parts.append(_html_nodes(_outline(run), nested=False))
    return "".join(parts)


Node = tuple[str, list]  # a line's text and the more indented lines under it


def _outline(lines: Sequence[str]) -> list[Node]:
    """Lines as a tree: each line holds the lines after it that are indented deeper."""
    roots: list[Node] = []
    open_nodes: list[tuple[int, Node]] = []  # the latest node at each depth, outermost first
    for line in lines:
        indent = len(line) - len(line.lstrip())
        while open_nodes and open_nodes[-1][0] >= indent:
            open_nodes.pop()
        node: Node = (line.strip(), [])
        (open_nodes[-1][1][1] if open_nodes else roots).append(node)
        open_nodes.append((indent, node))
    return roots


NUMBERED = re.compile(r"(\d+)\. ")


def _list_kind(text: str, nested: bool) -> str:
    if text.startswith("- "):
        return "ul"
    if NUMBERED.match(text):
        return "ol"
    return "ul" if nested else "p"


def _html_nodes(nodes: Sequence[Node], nested: bool) -> str:
    parts = []
    for kind, group in itertools.groupby(nodes, key=lambda node: _list_kind(node[0], nested)):
        group = list(group)
        if kind == "p":
            parts += [f'<p{_css_class(text)}>{_inline(text)}</p>{_html_nodes(children, nested=True)}'
                      for text, children in group]
            continue
        items = "".join(f"<li>{_inline(_item_text(text))}{_html_nodes(children, nested=True)}</li>"
                        for text, children in group)
        first = NUMBERED.match(group[0][0])
        start = f' start="{first.group(1)}"' if kind == "ol" and first.group(1) != "1" else ""
        parts.append(f"<{kind}{start}>{items}</{kind}>")
    return "".join(parts)


def _item_text(text: str) -> str:
    """A list item's text without its bullet or number."""
    if text.startswith("- "):
        return text[2:]
    numbered = NUMBERED.match(text)
    return text[numbered.end():] if numbered else text


def _css_class(text: str) -> str:
    return ' class="caveat"' if text.startswith("caveat:") else ""


def _inline(text: str) -> str:
    """Escaped text, `backquoted` commands as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))

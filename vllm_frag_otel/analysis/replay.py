"""Production traffic replayed: the request spans as a workload file that
`vllm-frag-otel simulate --workload-file` reads, and how the KV-cache events a
request met (preemptions, failed allocations) relate to how long it took.

One line per `vllm.kv_cache.request` span, in the format of
`workloads.load_trace`:

    {"arrival_time": 0.04, "prompt_len": 812, "output_len": 96, "prefix_group": "shared", "prefix_len": 64}

- `arrival_time`: when vLLM received the request (the span's
  `vllm.request.arrival_time`, vLLM's own `Request.arrival_time`) in seconds
  after the first request's. On a simulator run with its clock file: the
  scheduler step the request arrived before, as its start in simulated
  seconds, so `simulate` adds it back before the same step. Otherwise
  wall-clock seconds. Time spent queued (the batch full, no free blocks) stays
  out of the file: the replay queues again, behind the same requests. Spans
  written before that attribute existed give their first prefix-cache lookup
  instead (counted: `Workload.lookup_arrivals`).
- `prompt_len`, `output_len`: gen_ai.usage.input_tokens and
  gen_ai.usage.output_tokens, exact.
- `prefix_group`/`prefix_len`: the shared-prefix estimate. A request that found
  H > 0 prompt tokens in the prefix cache at its first admission shared at least
  H tokens with an earlier request; it gets `prefix_group` "shared" and
  `prefix_len` H. Token ids are never recorded, so who shared with whom is
  unknown: every such request shares one nested prefix family (H tokens of the
  same sequence), and the request that first cached a prefix (it hit nothing)
  carries none. H is a lower bound of the real sharing: hits are whole blocks,
  and a prefix evicted before the request came hits nothing.

Requests without an output token (aborted before their first token, or spans
of older files that do not say) are left out and counted: a workload line needs
`output_len` >= 1. Aborted and engine-stopped requests with output tokens are
kept with the output they had (what the KV cache held), and counted.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from vllm_frag_otel.analysis.otlp_read import FINISHED, RequestSpan
from vllm_frag_otel.sim import simclock

WORKLOAD_FILE = "workload.jsonl"
LATENCY_FILE = "request_latency.csv"
SHARED_GROUP = "shared"  # the prefix_group of every request with a prefix estimate
# the size classes of requests (tokens), as the report's: below 128, 128-511, 512-2047, 2048 and more
SIZE_EDGES = (128, 512, 2048)
QUANTILES = (50, 90)
EVENTS = ("preempted", "failed allocation")


class TimeAxis(Protocol):
    """The report's clock of one process (report.Clock)."""

    steps: simclock.StepClock | None

    def seconds(self, times_ns) -> np.ndarray: ...


def size_class(tokens: int | None) -> str:
    if tokens is None:
        return "?"
    i = int(np.searchsorted(SIZE_EDGES, tokens, side="right"))
    bounds = (0, *SIZE_EDGES)
    return f">={SIZE_EDGES[-1]}" if i == len(SIZE_EDGES) else f"{bounds[i]}-{SIZE_EDGES[i] - 1}"


def class_order(label: str) -> int:
    """Classes from small to large."""
    labels = [size_class(edge - 1) for edge in SIZE_EDGES] + [size_class(SIZE_EDGES[-1])]
    return labels.index(label) if label in labels else len(labels)


# -- the workload ----------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadLine:
    arrival_time: float  # seconds after the first request
    prompt_len: int
    output_len: int
    prefix_len: int | None  # the shared-prefix estimate (prefix-cache hits at first admission), None: none
    request_id: str = field(default="", compare=False)

    def record(self) -> dict:
        """The line as `simulate --workload-file` reads it."""
        line: dict = {"arrival_time": self.arrival_time, "prompt_len": self.prompt_len,
                      "output_len": self.output_len, "replayed": True}
        if self.prefix_len:
            line.update(prefix_group=SHARED_GROUP, prefix_len=self.prefix_len)
        return line


@dataclass
class Workload:
    lines: list[WorkloadLine]
    skipped: int  # spans without an output token
    partial: int  # aborted or engine-stopped requests kept with the output tokens they had
    step_seconds: float | None  # arrival times are simulator steps of this length; None: wall-clock seconds
    path: Path | None = None  # where it was written
    lookup_arrivals: int = 0  # lines whose span did not say when the request arrived: its first lookup instead

    @property
    def with_prefix(self) -> int:
        return sum(1 for line in self.lines if line.prefix_len)


def step_start(step: int, step_seconds: float) -> float:
    """`step` steps in seconds (to the nanosecond), such that `simulate` (which puts
    a request at step floor(arrival_time / step_seconds)) puts it back in `step`:
    floating point would put 0.58 s, 29 steps of 0.02 s, at step 28."""
    value = round(step * step_seconds, 9)
    for _ in range(1000):
        if math.floor(value / step_seconds) >= step:
            break
        value = round(value + 1e-9, 9)
    return value


def workload(requests: Sequence[RequestSpan], clock: TimeAxis) -> Workload:
    """One workload line per request span with an output token, in arrival order
    (and within one arrival, the order of the first lookups: vLLM's queue order)."""
    kept = [r for r in requests if r.prompt_tokens >= 1 and r.output_tokens]
    came_in = np.array([r.came_in_ns for r in kept], dtype=np.int64)
    steps = clock.steps
    if steps is not None:
        # the step a request arrived before: the clock has one line after every step, so a
        # time before the first line is step 0, before the (k+1)-th line step k
        index = np.searchsorted(steps.wall_ns, came_in, side="right")
        first = int(index.min()) if len(kept) else 0
        arrivals = [step_start(int(k) - first, steps.step_seconds) for k in index]
    else:
        first_ns = int(came_in.min()) if len(kept) else 0
        arrivals = [round(int(ns - first_ns) / 1e9, 6) for ns in came_in]
    order = sorted(range(len(kept)), key=lambda i: (arrivals[i], kept[i].start_ns))
    lines = [WorkloadLine(arrivals[i], kept[i].prompt_tokens, int(kept[i].output_tokens),
                          kept[i].hit_tokens or None, kept[i].request_id) for i in order]
    return Workload(
        lines=lines,
        skipped=len(requests) - len(kept),
        partial=sum(1 for r in kept if r.finish_status not in FINISHED),
        step_seconds=None if steps is None else steps.step_seconds,
        lookup_arrivals=sum(1 for r in kept if r.arrival_ns is None),
    )


def write_workload(found: Workload, path: Path) -> Path:
    with open(path, "w") as fh:
        for line in found.lines:
            fh.write(json.dumps(line.record()) + "\n")
    found.path = path
    return path


REPLAY_CANNOT_KNOW = (
    "not in the spans, so not in a replay: prompt content (token ids are never recorded: which requests"
    " shared a prefix is estimated, one nested prefix of the hit length, a lower bound, so prefix caching"
    " helps a replay at most as much as it helped the recorded traffic), sampling parameters and stop conditions"
    " (outputs are replayed at their recorded length), requests still running when the input ends, and what the"
    " client waited for before sending (arrivals are when vLLM received each request: a replay keeps them"
    " whatever the settings, where a closed-loop client would send sooner to a faster server).")


def workload_text(found: Workload | None, untraced: float = 0, why_none: str = "") -> list[str]:
    """The report's replay section: where the workload is, how to replay it, what it cannot hold
    (`why_none`: why there is no workload, when the input has spans)."""
    title = "Replay this traffic (the request spans as a workload file)"
    if found is None:
        return [title, f"  {why_none or 'no request spans in the input (give the traces files too)'}:"
                       " no workload file"]
    if not found.lines:
        return [title, f"  none of the {found.skipped} request spans has an output token: no workload file"]
    where = str(found.path) if found.path is not None else WORKLOAD_FILE
    arrival = (f"the scheduler step ({found.step_seconds:g} s of simulated time) each request arrived before"
               if found.step_seconds is not None else "when vLLM received each request, in wall-clock seconds")
    lines = [
        title,
        f"  {where}: {len(found.lines)} requests; arrival = {arrival}, after the first request's;"
        f" prompt and output tokens as the spans recorded them; a shared-prefix estimate (its prefix-cache hits)"
        f" for {found.with_prefix} of them.",
        f"  replay it, and what-if: vllm-frag-otel simulate --sweep --workload-file {where}",
        f"  (one run: vllm-frag-otel simulate --workload-file {where} --output replay;"
        " add --block-size, --num-blocks, --max-num-seqs as on your server)",
    ]
    if found.lookup_arrivals:
        lines.append(f"  {found.lookup_arrivals} request span(s) do not say when the request arrived (written by an"
                     " older version): their first prefix-cache lookup stands in, so time they spent queued before"
                     " it is lost")
    if found.skipped:
        lines.append(f"  left out: {found.skipped} request span(s) without an output token (aborted before their"
                     " first token, or older files that do not say)")
    if found.partial:
        lines.append(f"  {found.partial} aborted or engine-stopped request(s) are in it with the output tokens"
                     " they had when they stopped")
    if untraced:
        lines.append(f"  {untraced:.0f} request(s) had no span (VLLM_FRAG_OTEL_MAX_OPEN_SPANS): they are not in it")
    lines.append(f"  {REPLAY_CANNOT_KNOW}")
    return lines


# -- latency and KV-cache events ----------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Complete requests of one prompt class that met an event (or did not)."""

    requests: int
    per_token: tuple[float, ...]  # seconds per output token at QUANTILES (nan when no request)
    duration: tuple[float, ...]  # seconds at QUANTILES


@dataclass(frozen=True)
class LatencyRow:
    prompt: str  # prompt size class
    event: str  # one of EVENTS
    met: Group  # requests that met the event at least once
    spared: Group  # the others

    @property
    def ratio(self) -> float:
        """How many times longer per output token, at the median (nan if either side is empty)."""
        a, b = self.met.per_token[0], self.spared.per_token[0]
        return a / b if b > 0 and not math.isnan(a) else math.nan


def _group(durations: np.ndarray, outputs: np.ndarray) -> Group:
    if not len(durations):
        nan = tuple(math.nan for _ in QUANTILES)
        return Group(0, nan, nan)
    per_token = durations / outputs
    return Group(len(durations), tuple(float(v) for v in np.percentile(per_token, QUANTILES)),
                 tuple(float(v) for v in np.percentile(durations, QUANTILES)))


def complete(requests: Sequence[RequestSpan]) -> list[RequestSpan]:
    """The requests whose whole life the spans saw: finished (stopped or length-capped), with output."""
    return [r for r in requests if r.finish_status in FINISHED and r.output_tokens]


def latency_rows(requests: Sequence[RequestSpan], clock: TimeAxis) -> list[LatencyRow]:
    """Per prompt class of complete requests and per event: the requests that met it
    against those that did not, by seconds per output token and by duration (span
    start to end on `clock`: simulated seconds on a simulator run)."""
    done = complete(requests)
    if not done:
        return []
    starts = clock.seconds(np.array([r.start_ns for r in done], dtype=np.int64))
    ends = clock.seconds(np.array([r.end_ns for r in done], dtype=np.int64))
    durations = np.asarray(ends, dtype=np.float64) - np.asarray(starts, dtype=np.float64)
    outputs = np.array([r.output_tokens for r in done], dtype=np.float64)
    classes = np.array([size_class(r.prompt_tokens) for r in done])
    flags = {
        "preempted": np.array([r.preemptions > 0 for r in done]),
        "failed allocation": np.array([r.allocation_failures > 0 for r in done]),
    }
    rows = []
    for label in sorted(set(classes.tolist()), key=class_order):
        mine = classes == label
        for event in EVENTS:
            met, spared = mine & flags[event], mine & ~flags[event]
            rows.append(LatencyRow(label, event, _group(durations[met], outputs[met]),
                                   _group(durations[spared], outputs[spared])))
    return rows


def _seconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}"


def latency_text(rows: Sequence[LatencyRow], requests: int, simulated: bool) -> list[str]:
    """The report's section relating preemptions and failed allocations to latency."""
    if not rows:
        return []
    done = sum(r.met.requests + r.spared.requests for r in rows if r.event == EVENTS[0])
    unit = "simulated seconds" if simulated else "seconds"
    lines = [
        f"Latency and KV-cache events (from the request spans: {done} of {requests} requests complete)",
        f"  per output token = the span's duration ({unit}, from the scheduler's first prefix-cache lookup to the"
        " finish) / its output tokens. Preempted requests are mostly long ones (the longer a request runs, the more"
        " likely it is preempted), so their durations would be long anyway: per output token compares like with"
        " like; the duration is shown beside it.",
        f"  {'prompt tokens':<15}{'event':<19}{'requests':>12}{'p50 per token':>30}{'p90 per token':>24}"
        f"{'p50 duration':>22}",
        f"  {'':<15}{'':<19}{'with / w/o':>12}{'with / w/o (ratio)':>30}{'with / w/o':>24}{'with / w/o':>22}",
    ]
    for row in rows:
        ratio = "" if math.isnan(row.ratio) else f" (x{row.ratio:.2f})"
        cells = [
            f"{row.met.requests} / {row.spared.requests}",
            f"{_seconds(row.met.per_token[0])} / {_seconds(row.spared.per_token[0])}{ratio}",
            f"{_seconds(row.met.per_token[1])} / {_seconds(row.spared.per_token[1])}",
            f"{_seconds(row.met.duration[0])} / {_seconds(row.spared.duration[0])}",
        ]
        lines.append(f"  {row.prompt:<15}{row.event:<19}" + "".join(
            f"{c:>{w}}" for c, w in zip(cells, (12, 30, 24, 22))))
    lines.append("  with: requests that met the event at least once; w/o: the others of the class. Aborted and"
                 " engine-stopped requests are left out (their durations are cut short); so is time spent queued"
                 " before the first lookup.")
    return lines


LATENCY_FIELDS = ["instance", "pool", "prompt_class", "event", "with_requests", "without_requests",
                  *(f"{side}_{what}_p{q}_s" for what in ("per_token", "duration") for q in QUANTILES
                    for side in ("with", "without"))]


def write_latency(rows_by_pool: Sequence[tuple[str, str, Sequence[LatencyRow]]], path: Path) -> list[Path]:
    """request_latency.csv: every pool's latency rows (instance, pool, rows); nothing when none has any."""
    if not any(rows for _, _, rows in rows_by_pool):
        return []
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, LATENCY_FIELDS)
        writer.writeheader()
        for instance, pool, rows in rows_by_pool:
            for row in rows:
                record = {"instance": instance, "pool": pool, "prompt_class": row.prompt, "event": row.event,
                          "with_requests": row.met.requests, "without_requests": row.spared.requests}
                for what in ("per_token", "duration"):
                    for i, q in enumerate(QUANTILES):
                        for side, group in (("with", row.met), ("without", row.spared)):
                            value = getattr(group, what)[i]
                            record[f"{side}_{what}_p{q}_s"] = "" if math.isnan(value) else repr(value)
                writer.writerow(record)
    return [path]

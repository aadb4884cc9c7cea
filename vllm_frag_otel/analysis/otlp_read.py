"""The plugin's OTLP/JSON read back: metric points as time series, request spans as
rows, block-layout log records as `layout.BlockMap`s.

Reads what the embedded file exporter writes and what a Collector's file
exporter writes (the same encoding: one export request per line). No vLLM.
Sums and histograms become running totals whatever their temporality (delta
points are accumulated; a cumulative series restarted by a new start time
continues from where it was), so every series reads the same way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from vllm_frag_otel.jsonlines import InputProblem, json_records
from vllm_frag_otel.core.layout import EVENT_NAME as BLOCK_MAP_EVENT
from vllm_frag_otel.core.layout import BlockMap
from vllm_frag_otel.export.telemetry import ARRIVAL_TIME, POOL, SPAN_NAME

INSTANCE = "service.instance.id"
PID = "process.pid"
DELTA = 1  # AggregationTemporality.DELTA in OTLP
FINISHED = ("finished_stopped", "finished_length_capped")  # span finish statuses of complete requests


@dataclass(frozen=True, order=True)
class Source:
    """Where a series comes from: one process (`instance`) and one of its KV-cache
    pools (`pool`; empty for process-wide series such as hook errors)."""

    instance: str
    pool: str


@dataclass
class Series:
    """One metric with one attribute set from one source, in time order.

    `values`: a gauge's values, a sum's running total, a histogram's running
    count; histograms also carry running `sums` and per-bucket `buckets`
    (points x (len(bounds) + 1)).
    """

    metric: str
    source: Source
    attributes: dict[str, str]
    kind: str  # gauge, sum or histogram
    unit: str
    times: np.ndarray  # int64 unix ns
    values: np.ndarray
    sums: np.ndarray | None = None
    bounds: np.ndarray | None = None
    buckets: np.ndarray | None = None


@dataclass(frozen=True)
class RequestSpan:
    """One `vllm.kv_cache.request` span: a request's KV-cache story."""

    instance: str
    request_id: str
    prompt_tokens: int
    # gen_ai.usage.output_tokens (older files: gen_ai.usage.completion_tokens); without it derived:
    # computed tokens at the end - prompt + 1 (complete, one-group requests), else None
    output_tokens: int | None
    hit_tokens: int
    peak_blocks: int
    allocated_slots: int
    unused_slots: int
    preemptions: int
    allocation_failures: int
    finish_status: str
    groups: int
    released_blocks: int  # blocks given up at its preemptions
    resumed_hit_tokens: int  # prefix-cache hits when re-admitted after them
    start_ns: int
    end_ns: int
    # cached (prefix-cache) blocks its own allocations evicted; None: the span does not say
    evicted_blocks: int | None = None
    # when vLLM received the request (Unix ns); None: the span does not say (older files)
    arrival_ns: int | None = None

    @property
    def came_in_ns(self) -> int:
        """The request's arrival, or where the span does not say, its first prefix-cache lookup."""
        return self.start_ns if self.arrival_ns is None else self.arrival_ns


@dataclass
class Telemetry:
    files: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)  # found in a directory, holding no OTLP
    problems: list[InputProblem] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    spans: list[RequestSpan] = field(default_factory=list)
    resources: dict[str, dict[str, str]] = field(default_factory=dict)  # by instance
    block_maps: dict[Source, list[BlockMap]] = field(default_factory=dict)  # in reading order

    def pools(self) -> list[Source]:
        """The KV-cache pools seen, in the order they started exporting metrics (a pool
        with block maps but no metric points is not one)."""
        first: dict[Source, int] = {}
        for s in self.series:
            if s.source.pool:
                first[s.source] = min(first.get(s.source, int(s.times[0])), int(s.times[0]))
        return sorted(first, key=lambda source: (first[source], source))


@dataclass
class _Points:
    kind: str
    unit: str
    rows: list[tuple] = field(default_factory=list)  # (time, start, delta, value, sum, bounds, buckets)


def input_files(paths: Iterable[Path], problems: list[InputProblem]) -> list[tuple[Path, bool]]:
    """(file, named explicitly) for each path; directories give their *.json and *.jsonl files."""
    found: dict[Path, tuple[Path, bool]] = {}
    for path in paths:
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file()):
                found.setdefault(child.resolve(), (child, False))
        elif path.is_file():
            found[path.resolve()] = (path, True)
        else:
            problems.append(InputProblem(path, 0, "no such file or directory"))
    return list(found.values())


def read(paths: Sequence[Path]) -> Telemetry:
    """Everything usable in `paths`; what is not usable is in `problems`, by file and line."""
    telemetry = Telemetry()
    points: dict[tuple, _Points] = {}
    spans: dict[tuple[str, str], RequestSpan] = {}
    for path, explicit in input_files(paths, telemetry.problems):
        otlp_lines = 0
        for number, record in json_records(path, telemetry.problems):
            where = (path, number)
            if not isinstance(record, dict):
                telemetry.problems.append(InputProblem(path, number, "not a JSON object; line skipped"))
            elif "resourceMetrics" in record:
                otlp_lines += _read_metrics(record, where, telemetry, points)
            elif "resourceSpans" in record:
                otlp_lines += _read_spans(record, where, telemetry, spans)
            elif "resourceLogs" in record:
                otlp_lines += _read_logs(record, where, telemetry)
            elif otlp_lines or explicit:
                keys = ", ".join(sorted(record)[:5])
                telemetry.problems.append(InputProblem(
                    path, number,
                    f"not OTLP (no resourceMetrics, resourceSpans or resourceLogs; keys: {keys}); line skipped"))
        if otlp_lines:
            telemetry.files.append(path)
        elif not explicit:
            telemetry.ignored.append(path)
    telemetry.series = [_series(key, p) for key, p in points.items()]
    telemetry.spans = sorted(spans.values(), key=lambda s: (s.instance, s.start_ns))
    return telemetry


def _instance(resource_attributes: dict[str, str]) -> str:
    """The process a resource stands for: its service.instance.id with its process.pid (the id
    names the engine and stays the same across its restarts: each run is a process of its own),
    else a digest of it."""
    if INSTANCE in resource_attributes:
        pid = resource_attributes.get(PID)
        return resource_attributes[INSTANCE] if pid is None else f"{resource_attributes[INSTANCE]} pid {pid}"
    return hashlib.sha1(repr(sorted(resource_attributes.items())).encode()).hexdigest()[:16]


def _whole(found, where: tuple[Path, int], telemetry: Telemetry, signal: str) -> list | None:
    """All that `found` (a walk over one export request) yields; None, with the line
    named in `telemetry.problems`, when the request is malformed anywhere."""
    try:
        return list(found)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        telemetry.problems.append(InputProblem(
            *where, f"not an OTLP {signal} request ({type(exc).__name__}: {exc}); line skipped"))
        return None


def _read_metrics(record: dict, where: tuple[Path, int], telemetry: Telemetry, points: dict) -> int:
    """Walks the decoded line directly: protobuf's own JSON parser takes ten times as long."""
    rows = _whole(_metric_rows(record, telemetry), where, telemetry, "metrics")
    if rows is None:
        return 0
    for key, kind, unit, row in rows:
        points.setdefault(key, _Points(kind, unit)).rows.append(row)
    return 1


# OTLP/JSON nesting per signal: (resources, scopes, items) keys
_NESTING = {
    "metrics": ("resourceMetrics", "scopeMetrics", "metrics"),
    "traces": ("resourceSpans", "scopeSpans", "spans"),
    "logs": ("resourceLogs", "scopeLogs", "logRecords"),
}


def _items(record: dict, signal: str, telemetry: Telemetry):
    """(instance, item) for every metric, span or log record of one export request;
    each resource is noted in `telemetry.resources`."""
    resources_key, scopes_key, items_key = _NESTING[signal]
    for resource_entry in record[resources_key]:
        resource = _json_attributes(resource_entry.get("resource", {}).get("attributes", []))
        instance = _instance(resource)
        telemetry.resources.setdefault(instance, resource)
        for scope_entry in resource_entry.get(scopes_key, []):
            for item in scope_entry.get(items_key, []):
                yield instance, item


def _metric_rows(record: dict, telemetry: Telemetry):
    """(series key, kind, unit, point row) for every data point of one export request."""
    for instance, metric in _items(record, "metrics", telemetry):
        kind = next((k for k in ("gauge", "sum", "histogram") if k in metric), None)
        if kind is None:
            continue  # summaries, exponential histograms: not the plugin's
        data = metric[kind]
        temporality = data.get("aggregationTemporality", 0)
        delta = temporality in (DELTA, "AGGREGATION_TEMPORALITY_DELTA")
        for point in data.get("dataPoints", []):
            attributes = _json_attributes(point.get("attributes", []))
            source = Source(instance, attributes.pop(POOL, ""))
            key = (metric["name"], source, tuple(sorted(attributes.items())))
            times = (int(point["timeUnixNano"]), int(point.get("startTimeUnixNano", 0)), delta)
            if kind == "histogram":
                # protobuf JSON leaves out zeros and empty lists
                bounds = tuple(float(b) for b in point.get("explicitBounds", []))
                count = int(point.get("count", 0))
                buckets = tuple(int(c) for c in point.get("bucketCounts", [])) or (0,) * (len(bounds) + 1)
                if len(buckets) != len(bounds) + 1:
                    raise ValueError(f"{metric['name']}: {len(buckets)} bucket counts for {len(bounds)} bounds")
                row = (*times, count, float(point.get("sum", 0.0)), bounds, buckets)
            else:
                value = float(point["asDouble"]) if "asDouble" in point else int(point.get("asInt", 0))
                row = (*times, value, 0.0, (), ())
            yield key, kind, metric.get("unit", ""), row


def _series(key: tuple, points: _Points) -> Series:
    metric, source, attributes = key
    # in time order; the same point read twice (overlapping inputs) counts once
    rows = sorted({row[0]: row for row in points.rows}.values(), key=lambda row: row[0])
    times = np.array([r[0] for r in rows], dtype=np.int64)
    starts = np.array([r[1] for r in rows], dtype=np.int64)
    delta = rows[0][2]
    values = np.array([r[3] for r in rows], dtype=np.float64)
    series = Series(metric, source, dict(attributes), points.kind, points.unit, times, values)
    if points.kind == "gauge":
        return series
    series.values = _running_total(values, starts, delta)
    if points.kind == "histogram":
        series.sums = _running_total(np.array([r[4] for r in rows], dtype=np.float64), starts, delta)
        series.bounds = np.array(rows[-1][5], dtype=np.float64)
        series.buckets = _running_total(np.array([r[6] for r in rows], dtype=np.float64), starts, delta)
    return series


def _running_total(values: np.ndarray, starts: np.ndarray, delta: bool) -> np.ndarray:
    """Totals since the first point: accumulated deltas, or cumulative values
    carried across restarts (a new start time)."""
    if delta:
        return np.cumsum(values, axis=0)
    totals = values.copy()
    for i in np.flatnonzero(starts[1:] != starts[:-1]) + 1:
        totals[i:] += totals[i - 1]
    return totals


def _read_spans(record: dict, where: tuple[Path, int], telemetry: Telemetry, spans: dict) -> int:
    found = _whole(_request_spans(record, telemetry), where, telemetry, "traces")
    if found is None:
        return 0
    spans.update(found)
    return 1


def _request_spans(record: dict, telemetry: Telemetry):
    """((trace id, span id), RequestSpan) for every request span of one export request."""
    for instance, span in _items(record, "traces", telemetry):
        if span.get("name") == SPAN_NAME:
            yield (span["traceId"], span["spanId"]), _request_span(instance, span)


def _request_span(instance: str, span: dict) -> RequestSpan:
    a = _json_attributes(span.get("attributes", []))
    released = resumed = 0
    for event in span.get("events", []):
        e = _json_attributes(event.get("attributes", []))
        if event.get("name") == "preempted":
            released += int(e.get("vllm.kv_cache.block.released", 0))
        elif event.get("name") == "resumed":
            resumed += int(e.get("vllm.kv_cache.prefix_cache.hit_tokens", 0))
    # the current GenAI names, else the deprecated ones spans written before them carry
    prompt = int(a[_either(a, "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")])
    completion = a.get(_either(a, "gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens"))
    hits = a.get(_either(a, "vllm.kv_cache.prefix_cache.hit_tokens", "gen_ai.usage.cache_read.input_tokens"), 0)
    evicted = a.get("vllm.kv_cache.block.evicted")
    arrival = a.get(ARRIVAL_TIME)
    allocated, unused = int(a.get("vllm.kv_cache.slot.allocated", 0)), int(a.get("vllm.kv_cache.slot.unused", 0))
    groups = int(a.get("vllm.kv_cache.group.count", 1))
    status = a.get("vllm.request.finish_status", "")
    # a complete request's last sampled token is never computed: computed = prompt + output - 1
    if completion is not None:
        output = int(completion)
    else:
        output = allocated - unused - prompt + 1 if groups == 1 and status in FINISHED else None
    return RequestSpan(
        instance=instance,
        request_id=a.get("vllm.request.id", span.get("spanId", "")),
        prompt_tokens=prompt,
        output_tokens=output,
        hit_tokens=int(hits),
        peak_blocks=int(a.get("vllm.kv_cache.block.peak", 0)),
        allocated_slots=allocated,
        unused_slots=unused,
        preemptions=int(a.get("vllm.request.preemptions", 0)),
        allocation_failures=int(a.get("vllm.kv_cache.allocation.failures", 0)),
        finish_status=status,
        groups=groups,
        released_blocks=released,
        resumed_hit_tokens=resumed,
        start_ns=int(span.get("startTimeUnixNano", 0)),
        end_ns=int(span.get("endTimeUnixNano", 0)),
        evicted_blocks=None if evicted is None else int(evicted),
        arrival_ns=None if arrival is None else round(float(arrival) * 1e9),
    )


def _either(attributes: dict, name: str, fallback: str) -> str:
    """`name` if the span has it, else `fallback` (an older or the other name of the same value)."""
    return name if name in attributes else fallback


def _read_logs(record: dict, where: tuple[Path, int], telemetry: Telemetry) -> int:
    """The block maps of one logs export request. A malformed record is named and
    skipped; the line's other records are still read. Other log records are not
    the report's and are passed over silently."""
    found = _whole(_items(record, "logs", telemetry), where, telemetry, "logs")
    if found is None:
        return 0
    for index, (instance, log) in enumerate(found, 1):
        try:
            attributes = _json_attributes(log.get("attributes", []))
            if log.get("eventName", attributes.get("event.name")) != BLOCK_MAP_EVENT:
                continue
            source, block_map = _block_map(instance, log, attributes)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            what = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            telemetry.problems.append(InputProblem(
                *where, f"block map (log record {index} of the line) skipped: {what}"))
            continue
        telemetry.block_maps.setdefault(source, []).append(block_map)
    return 1


def _block_map(instance: str, log: dict, attributes: dict[str, str]) -> tuple[Source, BlockMap]:
    """Raises ValueError saying what is wrong with a block-map log record."""
    if POOL not in attributes:
        raise ValueError(f"no {POOL} attribute")
    time = int(log.get("timeUnixNano") or log.get("observedTimeUnixNano") or 0)
    if time <= 0:
        raise ValueError("no timeUnixNano")
    body = log.get("body")
    if not isinstance(body, dict) or "bytesValue" not in body:
        raise ValueError(f"body is not bytes (bytesValue), but {sorted(body) if isinstance(body, dict) else body!r}")
    try:
        payload = base64.b64decode(body["bytesValue"], validate=True)
    except (binascii.Error, TypeError) as exc:
        raise ValueError(f"bytesValue is not base64 ({exc})") from None
    return Source(instance, attributes[POOL]), BlockMap.decode(payload, attributes, time)


def _json_attributes(key_values: list[dict]) -> dict[str, str]:
    """OTLP/JSON attributes (`{"key": k, "value": {"intValue": "3"}}`) as strings."""
    out = {}
    for kv in key_values:
        value = kv.get("value") or {"stringValue": ""}
        (kind, raw), = value.items()
        out[kv["key"]] = ("true" if raw else "false") if kind == "boolValue" else str(raw)
    return out

"""Block-layout maps in the report, checked against the per-block states they were
made from: every expected number here is recomputed with plain Python loops
from the generated states (or the raw lines), never taken from `layout` or
`report`.

The metrics and spans come from one real `vllm-frag-otel simulate` run (as in
test_report.py); the block maps are generated here, encoded with
`BlockMap.encode` and written as the OTLP/JSON log lines the plugin writes,
for the simulated process and pool.
"""

from __future__ import annotations

import base64
import csv
import json
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import simulate_into

from vllm_frag_otel.core import layout
from vllm_frag_otel.analysis import otlp_read
from vllm_frag_otel.analysis import report
from vllm_frag_otel.core.layout import BLOCK_STATES, EVENT_NAME, BlockMap

SIMULATE = ["--workload", "alpaca", "--num-requests", "40", "--num-blocks", "30", "--max-num-seqs", "8", "--seed", "3"]
EMPTY, CACHED, FULL, PARTIAL, RESERVED = range(5)
UNHELD = {EMPTY, CACHED}
POOL_ATTR = "vllm.kv_cache.pool"

# the generated pool: 100 blocks, 61 maps 10 ms apart, starting before the first metric point
BLOCKS = 100
MAPS = 61
STEP_NS = 10_000_000
CHURNING = range(0, 16)  # block ids 1-16: a new random state at every map
ALWAYS_FREE = range(64, 80)  # block ids 65-80: free at every map
FENCES = (63, 80)  # block ids 64 and 81: always full, so the free region is exactly one hole
BURST = range(40, 44)  # maps where the middle of the pool is reshuffled: the hottest time


def generate_states(seed: int = 7) -> list[list[int]]:
    """states[t][i]: the state code of block id i + 1 at map t."""
    rng = np.random.default_rng(seed)
    current = [int(s) for s in rng.integers(0, 5, BLOCKS)]
    states = []
    for t in range(MAPS):
        for i in range(BLOCKS):
            if i in CHURNING:
                current[i] = int(rng.integers(0, 5))
            elif i in ALWAYS_FREE:
                current[i] = EMPTY
            elif i in FENCES:
                current[i] = FULL
            elif (t in BURST and 20 <= i < 60) or rng.random() < 0.04:
                current[i] = int(rng.integers(0, 5))
        states.append(list(current))
    return states


# -- brute force, from the per-block states -------------------------------------------------


def cell_counts(row: list[int], bin_size: int) -> list[list[int]]:
    """counts[state][cell] of one map."""
    cells = -(-len(row) // bin_size)
    counts = [[0] * cells for _ in BLOCK_STATES]
    for i, state in enumerate(row):
        counts[state][i // bin_size] += 1
    return counts


def brute_churn(states: list[list[int]], bin_size: int) -> list[list[int]]:
    """changes[t][cell] between map t and t + 1: blocks that must have changed state
    (per block when bin_size is 1; per cell, the states' count changes, otherwise)."""
    changes = []
    for before, after in zip(states, states[1:]):
        if bin_size == 1:
            changes.append([int(a != b) for a, b in zip(before, after)])
            continue
        a, b = cell_counts(before, bin_size), cell_counts(after, bin_size)
        row = []
        for cell in range(len(a[0])):
            row.append(sum(max(b[s][cell] - a[s][cell], 0) for s in range(len(BLOCK_STATES))))
        changes.append(row)
    return changes


def equal_edges(n: int, parts: int) -> list[int]:
    """Where each of min(parts, n) nearly equal ranges of n items starts (and the end),
    rounding half to even as numpy does."""
    parts = min(parts, n)
    return sorted({round(i * n / parts) for i in range(parts + 1)})


def brute_regions(states, bin_size: int, regions: int = 32) -> list[dict]:
    """Every region's changes, hottest first (then lowest block id), zero-change ones left out."""
    changes = brute_churn(states, bin_size)
    cells = len(changes[0])
    edges = equal_edges(cells, regions)
    total = sum(sum(row) for row in changes)
    found = []
    for lo, hi in zip(edges, edges[1:]):
        n = sum(row[c] for row in changes for c in range(lo, hi))
        first, last = 1 + lo * bin_size, min(len(states[0]), hi * bin_size)
        found.append({"first": first, "last": last, "changes": n, "share": n / total,
                      "per_block": n / (last - first + 1)})
    return [r for r in sorted(found, key=lambda r: (-r["changes"], r["first"])) if r["changes"]]


def brute_windows(states, bin_size: int, seconds: list[float], windows: int = 20) -> list[dict]:
    changes = [sum(row) for row in brute_churn(states, bin_size)]
    edges = equal_edges(len(changes), windows)
    total = sum(changes)
    found = []
    for lo, hi in zip(edges, edges[1:]):
        n = sum(changes[lo:hi])
        found.append({"start": seconds[lo], "end": seconds[hi], "changes": n, "share": n / total,
                      "per_second": n / (seconds[hi] - seconds[lo])})
    return [w for w in sorted(found, key=lambda w: (-w["changes"], w["start"])) if w["changes"]]


def brute_holes(states, bin_size: int, seconds: list[float]) -> list[dict]:
    """The holes by idle memory (blocks x seconds), largest first, then widest, then lowest block id,
    leaving out those that overlap a listed hole with the same start (its shrunk remains).

    A cell is unheld when all its blocks are free or cached; its streak starts at
    the map it became unheld; a hole is a maximal run of adjacent unheld cells with
    the same streak start, living until the last map the same run is seen."""
    n = len(states[0])
    cells = -(-n // bin_size)
    since: list[int | None] = [None] * cells
    last_seen: dict[tuple[int, int, int], int] = {}
    previous = [False] * cells
    for t, row in enumerate(states):
        unheld = [all(row[i] in UNHELD for i in range(c * bin_size, min(n, (c + 1) * bin_size)))
                  for c in range(cells)]
        for c in range(cells):
            if not unheld[c]:
                since[c] = None
            elif not previous[c]:
                since[c] = t
        previous = unheld
        c = 0
        while c < cells:
            if since[c] is None:
                c += 1
                continue
            d = c
            while d + 1 < cells and since[d + 1] == since[c]:
                d += 1
            last_seen[(c, d, since[c])] = t
            c = d + 1
    holes = []
    for (first, last, start), until in last_seen.items():
        is_open = until == len(states) - 1
        holes.append({"first": 1 + first * bin_size, "last": min(n, (last + 1) * bin_size), "width": last - first,
                      "since": seconds[start], "until": seconds[until], "open": is_open,
                      "status": "never_used" if is_open and start == 0 else "open" if is_open else "ended"})
    ranked = sorted(holes, key=lambda h: (-(h["last"] - h["first"] + 1) * (h["until"] - h["since"]),
                                          -(h["last"] - h["first"]), h["first"]))
    listed = []
    for h in ranked:
        if all(not (o["since"] == h["since"] and o["first"] <= h["last"] and h["first"] <= o["last"]) for o in listed):
            listed.append(h)
    return listed


def brute_hole_kinds(holes: list[dict], top: int = 5) -> list[dict]:
    """The listed holes as the report shows them: never used, then still unheld, then ended, each ranked, `top` each."""
    return [h for status in ("never_used", "open", "ended") for h in [h for h in holes if h["status"] == status][:top]]


# -- the input files ------------------------------------------------------------------------


def _simulate(out: Path) -> Path:
    return simulate_into(out, SIMULATE, export_every=3)


def _raw_metric_times(path: Path) -> tuple[dict, str, list[int]]:
    """(the resource's identity: service.instance.id and process.pid, pool, every data point's
    time) of a metrics file, read with plain json."""
    resource, pools, times = None, set(), []
    for line in path.read_text().splitlines():
        for rm in json.loads(line)["resourceMetrics"]:
            attrs = {a["key"]: a["value"] for a in rm["resource"]["attributes"]}
            resource = {k: attrs[k] for k in ("service.instance.id", "process.pid")}
            for sm in rm["scopeMetrics"]:
                for m in sm["metrics"]:
                    kind = next(k for k in ("gauge", "sum", "histogram") if k in m)
                    for dp in m[kind]["dataPoints"]:
                        times.append(int(dp["timeUnixNano"]))
                        pools |= {a["value"]["stringValue"] for a in dp.get("attributes", []) if a["key"] == POOL_ATTR}
    (pool,) = pools
    return resource, pool, times


def log_record(time_ns: int, pool: str, payload: bytes, attributes: dict, event: str = EVENT_NAME) -> dict:
    def value(v):
        return {"intValue": str(v)} if isinstance(v, int) else {"stringValue": str(v)}

    attrs = {**attributes, POOL_ATTR: pool, "model_name": "tiny"}
    return {"timeUnixNano": str(time_ns), "observedTimeUnixNano": str(time_ns + 1000),
            "body": {"bytesValue": base64.b64encode(payload).decode()},
            "attributes": [{"key": k, "value": value(v)} for k, v in attrs.items()], "eventName": event}


def logs_line(resource: dict, records: list[dict]) -> str:
    """One export request of `records`, from the process `resource` (OTLP/JSON attribute values) names."""
    return json.dumps({"resourceLogs": [{
        "resource": {"attributes": [*({"key": k, "value": v} for k, v in resource.items()),
                                    {"key": "service.name", "value": {"stringValue": "vllm"}}]},
        "scopeLogs": [{"scope": {"name": "vllm_frag_otel", "version": "0.1.0"}, "logRecords": records}],
    }]}, separators=(",", ":"))


def encoded(states_row: list[int], time_ns: int, max_cells: int = 4096) -> tuple[bytes, dict]:
    return BlockMap.from_states(np.array(states_row, dtype=np.uint8), time_ns, max_cells).encode()


class Run:
    """The inputs and the report built from them."""

    def __init__(self, base: Path):
        sim = _simulate(base / "sim")
        self.inputs = base / "in"
        self.inputs.mkdir()
        (metrics,) = (sim / "telemetry").glob("metrics-*.jsonl")
        (traces,) = (sim / "telemetry").glob("traces-*.jsonl")
        (self.inputs / metrics.name).write_text(metrics.read_text())
        self.resource, self.pool, metric_times = _raw_metric_times(metrics)
        ids = self.resource["service.instance.id"]["stringValue"], self.resource["process.pid"]["intValue"]
        self.instance = "{} pid {}".format(*ids)  # the report's name for the process
        self.first_map_ns = min(metric_times) - 50_000_000  # the maps start before the metrics
        self.start_ns = min(min(metric_times), self.first_map_ns)
        self.times = [self.first_map_ns + t * STEP_NS for t in range(MAPS)]
        self.seconds = [(t - self.start_ns) / 1e9 for t in self.times]
        self.states = generate_states()
        self.evicted, self.completion = self._write_traces(traces)
        self.logs = self.inputs / "logs-1.jsonl"
        self.bad_lines = self._write_logs()
        self.out = base / "report"
        self.written = report.build([self.inputs], self.out)
        self.text = (self.out / "summary.txt").read_text()

    def _write_traces(self, traces: Path) -> tuple[dict[str, int], dict[str, int]]:
        """The recorded spans, each with a (random) measured eviction count and completion tokens."""
        rng = np.random.default_rng(11)
        evicted, completion = {}, {}
        lines = []
        for line in traces.read_text().splitlines():
            request = json.loads(line)
            for rs in request["resourceSpans"]:
                for ss in rs["scopeSpans"]:
                    for span in ss["spans"]:
                        rid = next(a["value"]["stringValue"] for a in span["attributes"]
                                   if a["key"] == "vllm.request.id")
                        evicted[rid] = int(rng.integers(0, 20))
                        completion[rid] = int(rng.integers(1, 3000))
                        span["attributes"] += [
                            {"key": "vllm.kv_cache.block.evicted", "value": {"intValue": str(evicted[rid])}},
                            {"key": "gen_ai.usage.output_tokens", "value": {"intValue": str(completion[rid])}},
                        ]
            lines.append(json.dumps(request))
        (self.inputs / traces.name).write_text("\n".join(lines) + "\n")
        return evicted, completion

    def _write_logs(self) -> dict[str, int]:
        """Good maps one per line, with bad ones in between; returns the bad lines' numbers."""
        lines, bad = [], {}
        for t, (time_ns, row) in enumerate(zip(self.times, self.states)):
            payload, attrs = encoded(row, time_ns)
            if t == 3:
                # a corrupt payload (not base64) at a time of its own
                record = log_record(time_ns + 1, self.pool, payload, attrs)
                record["body"]["bytesValue"] = "not*base64!"
                lines.append(logs_line(self.resource, [record]))
                bad["corrupt"] = len(lines)
            if t == 5:
                # the wrong number of cells for its blocks
                lines.append(logs_line(self.resource, [log_record(time_ns + 1, self.pool, payload,
                                                                  {**attrs, layout.A_CELLS: BLOCKS - 1})]))
                bad["cells"] = len(lines)
            if t == 7:
                # another event: not the report's, no problem
                lines.append(logs_line(self.resource, [log_record(time_ns + 1, self.pool, b"hello", {},
                                                                  event="vllm.something.else")]))
                bad["other"] = len(lines)
            if t == 9:
                # a truncated payload beside a good map in the same line: the good one still counts
                broken = log_record(time_ns + 2, self.pool, payload[: len(payload) // 2], attrs)
                lines.append(logs_line(self.resource, [broken, log_record(time_ns, self.pool, payload, attrs)]))
                bad["truncated"] = len(lines)
                continue
            lines.append(logs_line(self.resource, [log_record(time_ns, self.pool, payload, attrs)]))
        # a pool with maps but no metrics is not reported
        payload, attrs = encoded(self.states[0], self.times[-1])
        lines.append(logs_line(self.resource, [log_record(self.times[-1], "7", payload, attrs)]))
        self.logs.write_text("\n".join(lines) + "\n")
        return bad


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    return Run(tmp_path_factory.mktemp("layout"))


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- reading the maps ---------------------------------------------------------------------------


def test_decoded_maps_are_the_generated_states(run):
    telemetry = otlp_read.read([run.inputs])
    maps = telemetry.block_maps[otlp_read.Source(run.instance, run.pool)]
    assert len(maps) == MAPS  # every good map, the bad ones left out
    by_time = {m.time_unix_nano: m for m in maps}
    assert sorted(by_time) == run.times
    for time_ns, row in zip(run.times, run.states):
        m = by_time[time_ns]
        assert (m.num_blocks, m.bin_size, m.cells) == (BLOCKS, 1, BLOCKS)
        assert m.counts.tolist() == cell_counts(row, 1)
    # the pool without metrics was read, and is not a pool of the report
    assert len(telemetry.block_maps[otlp_read.Source(run.instance, "7")]) == 1
    assert telemetry.pools() == [otlp_read.Source(run.instance, run.pool)]
    assert [r.source.pool for r in run.written.reports] == [run.pool]


def test_bad_records_are_named_by_file_and_line_and_the_rest_is_read(run):
    problems = [str(p) for p in run.written.problems]
    assert len(problems) == 3, problems
    corrupt, cells, truncated = (f"{run.logs}:{run.bad_lines[k]}: block map" for k in ("corrupt", "cells", "truncated"))
    assert any(p.startswith(corrupt) and "not base64" in p for p in problems), problems
    assert any(p.startswith(cells) and f"{BLOCKS} blocks, bin 1, {BLOCKS - 1} cells" in p for p in problems), problems
    assert any(p.startswith(truncated) and "record 1 " in p and "unreadable" in p for p in problems), problems
    assert not any(f"{run.logs}:{run.bad_lines['other']}:" in p for p in problems)
    assert "3 problem(s)" in run.text
    assert f"Block layout ({MAPS} maps" in run.text


def test_a_foreign_logs_line_is_no_problem_and_not_a_map(tmp_path):
    path = tmp_path / "logs.jsonl"
    path.write_text(logs_line({"service.instance.id": {"stringValue": "x"}}, [log_record(5, "0", b"hello", {}, event="other.event")]) + "\n"
                    + json.dumps({"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": {"stringValue": "hi"}}]}]}]})
                    + "\n")
    telemetry = otlp_read.read([path])
    assert telemetry.problems == [] and telemetry.block_maps == {} and telemetry.files == [path]


def test_not_otlp_names_resource_logs(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"hello": 1}) + "\n")
    (problem,) = otlp_read.read([path]).problems
    assert "no resourceMetrics, resourceSpans or resourceLogs" in problem.message


# -- the summary -------------------------------------------------------------------------------------


def _section(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Block layout ("))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return lines[start:end]


def test_the_summary_names_the_churning_region_and_the_free_hole(run):
    section = _section(run.text)
    assert section[0] == (f"Block layout ({MAPS} maps, every ~0.01 s, {BLOCKS} blocks, {BLOCKS} cells of 1 block;"
                          f" from {run.seconds[0]:.3f} s to {run.seconds[-1]:.3f} s)")
    assert run.seconds[0] == 0.0  # the maps began before the metrics: they set time zero
    # state shares over time
    totals = Counter(s for row in run.states for s in row)
    shares = ", ".join(f"{name} {100 * totals[code] / (MAPS * BLOCKS):.1f}%" for code, name in enumerate(BLOCK_STATES))
    assert f"  blocks by state, averaged over the maps: {shares}" in section
    # hottest region: inside the churning blocks, as counted block by block
    regions = brute_regions(run.states, 1)
    top = regions[0]
    assert top["last"] <= CHURNING[-1] + 1
    listed = [line.strip() for line in section if line.startswith("    blocks") and "changes" in line]
    assert listed[:3] == [f"blocks {r['first']}-{r['last']}: {r['changes']} changes ({100 * r['share']:.1f}%),"
                          f" {r['per_block']:.2f} per block" for r in regions[:3]]
    # hottest windows
    windows = brute_windows(run.states, 1, run.seconds)
    assert windows[0]["start"] <= run.seconds[BURST[0]] < windows[0]["end"]  # the burst
    assert [line.strip() for line in section if line.strip()[:1].isdigit()] == [
        f"{w['start']:.3f}-{w['end']:.3f} s: {w['changes']} changes ({100 * w['share']:.1f}%),"
        f" {w['per_second']:.1f} per second" for w in windows[:3]]
    # the always-free blocks: unheld from the first map to the last
    holes = brute_holes(run.states, 1, run.seconds)
    hole = holes[0]
    assert (hole["first"], hole["last"], hole["status"]) == (ALWAYS_FREE[0] + 1, ALWAYS_FREE[-1] + 1, "never_used")
    assert (hole["since"], hole["until"]) == (run.seconds[0], run.seconds[-1])
    shown = brute_hole_kinds(holes)
    assert {h["status"] for h in shown} == {"never_used", "open", "ended"}  # every kind has a hole here
    listed = [line.strip() for line in section if " → until " in line]
    expected = [f"{'block' if h['first'] == h['last'] else 'blocks'}"
                f" {h['first'] if h['first'] == h['last'] else str(h['first']) + '-' + str(h['last'])}"
                f" ({h['last'] - h['first'] + 1} block{'s' if h['last'] > h['first'] else ''}):"
                f" since {h['since']:.3f} s → until {h['until']:.3f} s ({h['until'] - h['since']:.3f} s)"
                for h in shown]
    assert listed == expected
    # each under its heading: never used, still unheld at the end, ended
    headings = [i for i, line in enumerate(section) if line.startswith("    ") and line.endswith(":")
                and not line.startswith("      ")]
    assert [section[i].strip() for i in headings] == ["never used: unheld at every map, from the first to the last:",
                                                       "still unheld at the last map:",
                                                       "ended: held again before the last map:"]
    end = f"{run.seconds[-1]:.3f} s"
    assert section[headings[0] + 1] == f"      blocks 65-80 (16 blocks): since 0.000 s → until {end} ({end})"
    ended = section[headings[2] + 1:headings[2] + 1 + sum(h["status"] == "ended" for h in shown)]
    assert ended and all(f"until {run.seconds[-1]:.3f} s" not in line for line in ended)
    assert any("lower bound" in line for line in section)
    assert not any("bins of" in line for line in section)  # one block per cell here


# -- the chart and the files ----------------------------------------------------------------------------


def test_block_layout_chart_shows_the_states_and_the_churn(run):
    telemetry = otlp_read.read([run.inputs])
    (r,) = [report.pool_report(telemetry, source, run.start_ns, several=False) for source in telemetry.pools()]
    (chart,) = [c for c in report.charts(r) if c.name == "block_layout"]
    heat, churn = chart.panels
    assert heat.style == churn.style == "image"
    # every block's colour at every map is its state's colour
    expected = np.array([[layout.STATE_COLOURS[run.states[t][b]] for t in range(MAPS)] for b in range(BLOCKS)])
    assert heat.image.shape == (BLOCKS, MAPS, 3)
    assert np.allclose(heat.image, expected)
    assert [label for label, _ in heat.swatches] == list(BLOCK_STATES)
    step = STEP_NS / 1e9
    columns = [run.seconds[0] - step / 2] + [s + step / 2 for s in run.seconds]
    assert heat.x_edges == pytest.approx(columns)
    assert heat.y_edges.tolist() == [0.5 + b for b in range(BLOCKS + 1)]
    # churn per region (of 32) per interval
    changes = brute_churn(run.states, 1)
    edges = equal_edges(BLOCKS, 32)
    expected_churn = [[sum(changes[t][lo:hi]) for t in range(MAPS - 1)] for lo, hi in zip(edges, edges[1:])]
    assert churn.image.tolist() == expected_churn
    assert churn.x_edges == pytest.approx(run.seconds)
    assert churn.y_edges.tolist() == [0.5 + e for e in equal_edges(BLOCKS, 32)]
    png = run.out / "block_layout.png"
    assert png in run.written.paths and png.read_bytes().startswith(b"\x89PNG")
    page = (run.out / "report.html").read_text()
    assert base64.b64encode(png.read_bytes()).decode() in page


def test_block_layout_npz_round_trips(run):
    path = run.out / "block_layout.npz"
    assert path in run.written.paths
    with np.load(path) as data:
        assert data["times_unix_nano"].tolist() == run.times
        assert data["counts"].tolist() == [cell_counts(row, 1) for row in run.states]
        assert int(data["num_blocks"]) == BLOCKS and int(data["bin_size"]) == 1
        assert data["states"].tolist() == list(BLOCK_STATES)


def test_hotspots_csv(run):
    path = run.out / "hotspots.csv"
    assert path in run.written.paths
    rows = _read_csv(path)
    assert {(r["instance"], r["pool"]) for r in rows} == {(run.instance, run.pool)}
    regions = [r for r in rows if r["kind"] == "region"]
    windows = [r for r in rows if r["kind"] == "window"]
    holes = [r for r in rows if r["kind"] == "hole"]
    assert len(regions) + len(windows) + len(holes) == len(rows)
    assert [(int(r["first_block"]), int(r["last_block"]), int(r["changes"])) for r in regions] == [
        (r["first"], r["last"], r["changes"]) for r in brute_regions(run.states, 1)[:3]]
    assert [float(r["changes_per_block"]) for r in regions] == pytest.approx(
        [r["per_block"] for r in brute_regions(run.states, 1)[:3]])
    expected_windows = brute_windows(run.states, 1, run.seconds)[:3]
    assert [int(w["changes"]) for w in windows] == [w["changes"] for w in expected_windows]
    assert [float(w["start_s"]) for w in windows] == pytest.approx([w["start"] for w in expected_windows], abs=1e-6)
    assert [float(w["end_s"]) for w in windows] == pytest.approx([w["end"] for w in expected_windows], abs=1e-6)
    expected_holes = brute_hole_kinds(brute_holes(run.states, 1, run.seconds))
    assert [(int(h["first_block"]), int(h["last_block"]), h["open"], h["status"]) for h in holes] == [
        (h["first"], h["last"], "true" if h["open"] else "false", h["status"]) for h in expected_holes]
    assert [float(h["end_s"]) - float(h["start_s"]) for h in holes] == pytest.approx(
        [h["until"] - h["since"] for h in expected_holes], abs=1e-5)


# -- per-request evictions ----------------------------------------------------------------------------


def _size_class(tokens: int) -> str:
    for low, high in ((0, 128), (128, 512), (512, 2048)):
        if low <= tokens < high:
            return f"{low}-{high - 1}"
    return ">=2048"


def test_measured_evictions_and_completion_tokens(run):
    requests = _read_csv(run.out / "requests.csv")
    assert {r["request_id"]: int(r["output_tokens"]) for r in requests} == run.completion
    assert {r["request_id"]: int(r["evicted_blocks"]) for r in requests} == run.evicted
    expected: Counter = Counter()
    for r in requests:
        expected[(_size_class(int(r["prompt_tokens"])), _size_class(run.completion[r["request_id"]]))] += \
            run.evicted[r["request_id"]]
    classes = _read_csv(run.out / "request_classes.csv")
    assert {(c["prompt_class"], c["output_class"]): int(c["evictions"]) for c in classes} == expected
    assert {c["evictions_measured"] for c in classes} == {"true"}
    header = next(line for line in run.text.splitlines() if "prompt / output tokens" in line)
    assert header.rstrip().endswith("evictions") and "est. evictions" not in header
    (top, most), = [max(expected.items(), key=lambda kv: kv[1])]
    total = sum(expected.values())
    assert f"Caused most evictions: prompt {top[0]} / output {top[1]} requests" \
           f" ({100 * most / total:.1f}% of {total} evictions, measured per request" in run.text
    telemetry = otlp_read.read([run.inputs])
    (r,) = [report.pool_report(telemetry, s, run.start_ns, several=False) for s in telemetry.pools()]
    (bars,) = [c for c in report.charts(r) if c.name == "request_classes"]
    line = {line.label: line for line in bars.panels[0].lines}["evictions"]
    order = [(row.prompt, row.output) for row in r.classes]
    assert line.y.tolist() == pytest.approx([expected[k] / total for k in order])


def test_evictions_stay_an_estimate_unless_every_span_measures_them(run, tmp_path):
    (traces,) = run.inputs.glob("traces-*.jsonl")
    lines = traces.read_text().splitlines()
    request = json.loads(lines[0])
    span = request["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    span["attributes"] = [a for a in span["attributes"] if a["key"] != "vllm.kv_cache.block.evicted"]
    (tmp_path / traces.name).write_text("\n".join([json.dumps(request), *lines[1:]]) + "\n")
    (metrics,) = run.inputs.glob("metrics-*.jsonl")
    telemetry = otlp_read.read([metrics, tmp_path / traces.name])
    assert sum(s.evicted_blocks is None for s in telemetry.spans) == 1
    (r,) = [report.pool_report(telemetry, s, 0, several=False) for s in telemetry.pools()]
    text = report.render_text(r)
    header = next(line for line in text.splitlines() if "prompt / output tokens" in line)
    assert header.rstrip().endswith("est. evictions")
    assert "estimated: new blocks x the pool's share of recycled allocations" in text
    assert all(c.measured_evictions is None for c in r.classes)
    assert r.block_layout is None and "Block layout" not in text


# -- layout's analysis against brute force ---------------------------------------------------------------


def _random_layout(seed: int, blocks: int, maps: int, bin_size: int):
    rng = np.random.default_rng(seed)
    # sticky states, many unheld, so that holes form, split and last
    states, row = [], [int(s) for s in rng.choice([EMPTY, CACHED, FULL], blocks)]
    for _ in range(maps):
        row = [int(rng.choice([EMPTY, EMPTY, CACHED, FULL, PARTIAL, RESERVED])) if rng.random() < 0.15 else s for s in row]
        states.append(row)
    times = [1_000_000_000 + int(t * 7_000_000 + rng.integers(0, 3_000_000)) for t in range(maps)]
    max_cells = -(-blocks // bin_size)
    maps_ = [BlockMap.from_states(np.array(r, dtype=np.uint8), t, max_cells) for r, t in zip(states, times)]
    lay = layout.stack(maps_)
    assert lay.bin_size == bin_size
    return states, times, lay


@pytest.mark.parametrize("bin_size", [1, 3])
@pytest.mark.parametrize("seed", range(6))
def test_layout_analysis_matches_brute_force(seed, bin_size):
    blocks = 40 if bin_size == 1 else 41  # 14 cells, the last one short
    states, times, lay = _random_layout(seed, blocks, 30, bin_size)
    start = times[0] - 500_000_000
    seconds = [(t - start) / 1e9 for t in times]
    assert lay.counts.tolist() == [cell_counts(row, bin_size) for row in states]
    # churn: exact per block with one block per cell, the count changes per cell otherwise
    assert layout.churn(lay).tolist() == brute_churn(states, bin_size)
    exact = [[int(a != b) for a, b in zip(x, y)] for x, y in zip(states, states[1:])]
    for t, row in enumerate(layout.churn(lay).tolist()):
        for cell, n in enumerate(row):
            assert n <= sum(exact[t][cell * bin_size:(cell + 1) * bin_size])  # a lower bound
    # hot regions, with fewer regions than cells
    for regions in (32, 5):
        expected = brute_regions(states, bin_size, regions)
        found = layout.hot_regions(lay, regions, top=4)
        assert [(r.first_block, r.last_block, r.changes) for r in found] == [
            (r["first"], r["last"], r["changes"]) for r in expected[:4]]
        assert [r.share for r in found] == pytest.approx([r["share"] for r in expected[:4]])
        assert [r.changes_per_block for r in found] == pytest.approx([r["per_block"] for r in expected[:4]])
    # hot windows
    expected = brute_windows(states, bin_size, seconds, 7)
    found = layout.hot_windows(lay, np.array(seconds), 7, top=3)
    assert [(w.changes, w.start_s, w.end_s) for w in found] == [
        (w["changes"], pytest.approx(w["start"]), pytest.approx(w["end"])) for w in expected[:3]]
    # holes
    expected = brute_hole_kinds(brute_holes(states, bin_size, seconds), top=3)
    assert len(expected) >= 4 and len({h["status"] for h in expected}) >= 2
    found = layout.long_lived_holes(lay, np.array(seconds), top=3)
    found = [h for kind in layout.HOLE_KINDS for h in found if h.kind == kind]
    assert [(h.first_block, h.last_block, h.open, h.kind) for h in found] == [
        (h["first"], h["last"], h["open"], h["status"]) for h in expected]
    assert [t for h in found for t in (h.since_s, h.until_s)] == pytest.approx(
        [t for h in expected for t in (h["since"], h["until"])])


# -- layout's building blocks, alone (no simulation: fast enough for `make mutate`) ---------------------


@pytest.mark.parametrize("blocks, max_cells, bin_size, dtype", [
    (0, 8, 1, "uint8"),  # an empty map: no cell
    (41, 14, 3, "uint8"),  # the last cell short
    (255 * 4, 4, 255, "uint8"),  # 255 blocks a cell: the largest count a byte holds
    (256 * 3, 3, 256, "uint16"),
    (65536 * 2, 2, 65536, "uint32"),
])
def test_a_block_map_round_trips_in_the_smallest_count_type(blocks, max_cells, bin_size, dtype):
    """A map's per-cell counts travel in the smallest unsigned type that holds a full cell
    (the payload of every map of every pool, every few seconds), and decode to what was counted."""
    rng = np.random.default_rng(blocks)
    states = rng.integers(0, len(BLOCK_STATES), blocks).astype(np.uint8)
    block_map = BlockMap.from_states(states, 123, max_cells)
    assert (block_map.num_blocks, block_map.bin_size, block_map.cells) == (blocks, bin_size, -(-blocks // bin_size))
    assert block_map.counts.dtype == np.dtype(dtype)
    expected = cell_counts(states.tolist(), bin_size) if blocks else [[] for _ in BLOCK_STATES]
    assert block_map.counts.tolist() == expected
    payload, attributes = block_map.encode()
    assert attributes == {layout.A_ENCODING: layout.ENCODING, layout.A_STATES: "empty,cached,full,partial,reserved",
                          layout.A_DTYPE: dtype, layout.A_BLOCKS: blocks, layout.A_BIN: bin_size,
                          layout.A_CELLS: block_map.cells}
    assert len(zlib.decompress(payload)) == len(BLOCK_STATES) * block_map.cells * np.dtype(dtype).itemsize
    decoded = BlockMap.decode(payload, {k: str(v) for k, v in attributes.items()}, 456)
    assert (decoded.time_unix_nano, decoded.num_blocks, decoded.bin_size) == (456, blocks, bin_size)
    assert decoded.counts.dtype == np.dtype(dtype) and decoded.counts.tolist() == expected


def test_count_types_switch_exactly_at_their_limits():
    """Beyond the cells a test can build: a cell of 2**32 blocks needs 64-bit counts."""
    from vllm_frag_otel.core.layout import _count_dtype

    assert [_count_dtype(n).name for n in (1, 255, 256, 65535, 65536, 2**32 - 1, 2**32)] == [
        "uint8", "uint8", "uint16", "uint16", "uint32", "uint32", "uint64"]


def test_a_malformed_block_map_is_refused_saying_what_is_wrong():
    """Every check of `decode`, each with the message the report shows next to the file and line."""
    states = np.array([0, 1, 2, 3, 4, 0, 0], dtype=np.uint8)
    payload, attributes = BlockMap.from_states(states, 1, 3).encode()  # 3 cells of 3, the last one short
    good = {k: str(v) for k, v in attributes.items()}
    counts = np.frombuffer(zlib.decompress(payload), dtype=np.uint8).reshape(5, 3)
    cases = [
        ({**good, layout.A_ENCODING: "gzip"}, payload, "unknown block map encoding 'gzip'"),
        ({k: v for k, v in good.items() if k != layout.A_ENCODING}, payload, "unknown block map encoding None"),
        ({**good, layout.A_STATES: "free,cached,full"}, payload, "unknown block states 'free,cached,full'"),
        ({k: v for k, v in good.items() if k != layout.A_STATES}, payload, "unknown block states None"),
        ({k: v for k, v in good.items() if k != layout.A_BIN}, payload,
         f"unreadable block map (KeyError: '{layout.A_BIN}')"),
        (good, b"not zlib", "unreadable block map (error: Error -3 while decompressing data: incorrect header check)"),
        ({**good, layout.A_DTYPE: "int8"}, payload, "inconsistent block map shape: 7 blocks, bin 3, 3 cells"),
        ({**good, layout.A_BIN: "0"}, payload, "inconsistent block map shape: 7 blocks, bin 0, 3 cells"),
        ({**good, layout.A_CELLS: "4"}, payload, "inconsistent block map shape: 7 blocks, bin 3, 4 cells"),
        (good, zlib.compress(counts.tobytes()[:-1]), "block map payload has 14 bytes, expected 15"),
        (good, zlib.compress((counts + np.eye(5, 3, dtype=np.uint8)).tobytes()),
         "block map counts do not add up to the blocks of each cell"),
    ]
    for attrs, data, message in cases:
        with pytest.raises(ValueError) as raised:
            BlockMap.decode(data, attrs, 1)
        assert str(raised.value) == message
    assert BlockMap.decode(payload, good, 1).counts.tolist() == cell_counts(states.tolist(), 3)


def test_a_map_of_an_earlier_release_decodes_under_the_state_names_of_this_one():
    """Earlier releases named the unheld empty state "free" and the held one with nothing computed
    "empty" (CHANGELOG.md); the codes are the same, so their telemetry files still report."""
    states = np.array([0, 1, 2, 3, 4, 0, 4], dtype=np.uint8)
    payload, attributes = BlockMap.from_states(states, 1, 7).encode()
    former = {**{k: str(v) for k, v in attributes.items()}, layout.A_STATES: "free,cached,full,partial,empty"}
    counts = BlockMap.decode(payload, former, 1).counts
    assert counts[layout.EMPTY].tolist() == [1, 0, 0, 0, 0, 1, 0]
    assert counts[layout.RESERVED].tolist() == [0, 0, 0, 0, 1, 0, 1]


def test_stack_keeps_the_latest_shape_once_per_time_and_thins_evenly():
    """A restarted engine may have resized its pool: only the latest shape's maps count, each
    time once, in time order; beyond `max_maps`, evenly spaced ones, the first and last kept."""
    rng = np.random.default_rng(3)
    rows = [rng.integers(0, 5, 10).astype(np.uint8) for _ in range(61)]
    maps = [BlockMap.from_states(r, 1_000 + 7 * t, 4) for t, r in enumerate(rows)]
    old = [BlockMap.from_states(rng.integers(0, 5, 12).astype(np.uint8), 1_001 + 7 * t, 4) for t in range(5)]
    shuffled = [maps[i] for i in rng.permutation(61)] + old + maps[:3]  # out of order, some twice
    lay = layout.stack(shuffled)
    assert (lay.num_blocks, lay.bin_size, lay.cells, lay.maps_seen) == (10, 3, 4, 61)
    assert lay.times.dtype == np.int64 and lay.times.tolist() == [1_000 + 7 * t for t in range(61)]
    assert lay.counts.dtype == np.int32 and lay.counts.tolist() == [cell_counts(r.tolist(), 3) for r in rows]
    thinned = layout.stack(shuffled, max_maps=7)
    kept = [0, 10, 20, 30, 40, 50, 60]  # round(i * 60 / 6)
    assert thinned.maps_seen == 61 and thinned.times.tolist() == [1_000 + 7 * t for t in kept]
    assert thinned.counts.tolist() == [cell_counts(rows[t].tolist(), 3) for t in kept]
    assert layout.stack(shuffled, max_maps=61).times.tolist() == lay.times.tolist()
    assert layout.stack([]) is None
    assert [(lay.first_block(c), lay.last_block(c)) for c in range(4)] == [(1, 3), (4, 6), (7, 9), (10, 10)]


def test_the_heat_map_mixes_each_cells_state_colours_by_their_share_of_its_blocks():
    """41 blocks in cells of 3: the last cell's one block is all of it (not a third)."""
    states, _, lay = _random_layout(2, 41, 5, 3)
    picture = layout.image(lay)
    assert picture.shape == (14, 5, 3) and picture.dtype == np.float32
    sizes = [3] * 13 + [2]
    for t, row in enumerate(states):
        counts = cell_counts(row, 3)
        for c in range(14):
            mix = sum(counts[s][c] / sizes[c] * layout.STATE_COLOURS[s] for s in range(5))
            assert picture[c, t].tolist() == pytest.approx(mix.tolist(), abs=1e-6)


def test_heat_map_columns_reach_halfway_to_their_neighbours():
    assert layout.column_edges(np.array([0.0, 1.0, 3.0])).tolist() == [-0.5, 0.5, 2.0, 4.0]
    assert layout.column_edges(np.array([2.0, 2.5])).tolist() == [1.75, 2.25, 2.75]
    assert layout.column_edges(np.array([5.0])).tolist() == [4.5, 5.5]  # one map: one second wide
    assert layout.column_edges(np.array([])).tolist() == []


@pytest.mark.parametrize("blocks, regions", [(10, 4), (7, 7), (5, 8), (1000, 32), (1001, 3), (9, 1), (1, 4)])
def test_live_regions_split_the_usable_blocks_evenly(blocks, regions):
    """Region r covers blocks [r * n // R, (r + 1) * n // R), R = min(regions, n): sizes differ by
    at most one; the counts per state of each region are a recount of its blocks."""
    bounds = layout.live_region_bounds(blocks, regions)
    count = min(regions, blocks)
    assert bounds.tolist() == [r * blocks // count for r in range(count + 1)]
    assert bounds[0] == 0 and bounds[-1] == blocks and max(np.diff(bounds)) - min(np.diff(bounds)) <= 1
    states = np.random.default_rng(blocks).integers(0, 5, blocks).astype(np.uint8)
    found = layout.region_counts(states, regions)
    assert found.shape == (5, count)
    for r in range(count):
        part = states[bounds[r]:bounds[r + 1]].tolist()
        assert found[:, r].tolist() == [part.count(s) for s in range(5)]


def test_quiet_regions_and_windows_are_not_listed():
    """A pool where only blocks 1-3 change, and only between the first maps: fewer hot regions
    and windows than asked for, each with its share and rate, and nothing for the quiet rest."""
    quiet = [0] * 9
    states = [[0, 0, 0] + quiet, [2, 2, 2] + quiet] + [[3, 3, 2] + quiet] * 4  # 3 changes, then 2, then none
    maps = [BlockMap.from_states(np.array(r, dtype=np.uint8), 1_000 + t, 12) for t, r in enumerate(states)]
    lay = layout.stack(maps)
    seconds = np.array([0.0, 0.5, 1.5, 2.0, 2.5, 4.0])
    regions = layout.hot_regions(lay, 4, top=3)
    assert [(r.first_block, r.last_block, r.changes, r.share, r.changes_per_block) for r in regions] == [
        (1, 3, 5, 1.0, pytest.approx(5 / 3))]
    windows = layout.hot_windows(lay, seconds, 5, top=3)
    assert [(w.start_s, w.end_s, w.changes, w.share, w.changes_per_second) for w in windows] == [
        (0.0, 0.5, 3, 0.6, 6.0), (0.5, 1.5, 2, 0.4, 2.0)]
    # two maps at the same simulated second (a clock flat before its first step): a rate without a duration
    flat = layout.hot_windows(lay, np.array([0.0, 0.0, 1.5, 2.0, 2.5, 4.0]), 5, top=1)
    assert [(w.changes, w.changes_per_second) for w in flat] == [(3, float("inf"))]


def test_holes_tie_broken_by_width_and_open_until_a_flat_end():
    """Holes of equal idle memory rank the widest first, then the lowest block id; and a hole
    still unheld at the last map is open even when the last maps share one time (a simulated
    clock reads maps after its last step as that step), not ended at an earlier sighting."""
    F, H = EMPTY, FULL
    states = [
        [H, H, H, H, H, H, H],
        [F, H, H, F, F, H, H],  # block 1 and blocks 4-5 become unheld
        [F, H, H, F, F, H, F],  # block 7 too
        [F, H, H, F, F, H, F],
        [H, H, H, F, F, H, F],  # block 1 held again
    ]
    seconds = [0.0, 1.0, 2.0, 3.0, 3.0]  # the last two maps at one time
    maps = [BlockMap.from_states(np.array(r, dtype=np.uint8), 1_000 + t, 7) for t, r in enumerate(states)]
    lay = layout.stack(maps)
    found = layout.long_lived_holes(lay, np.array(seconds), top=5)
    expected = brute_holes(states, 1, seconds)
    assert [(h.first_block, h.last_block, h.since_s, h.until_s, h.kind) for h in found] == [
        (h["first"], h["last"], h["since"], h["until"], h["status"]) for h in expected]
    # blocks 4-5 (2 x 2 s) before block 7 (1 x 1 s) and block 1 (1 x 2 s, ended at the 4th map)
    assert [(h.first_block, h.last_block, h.kind) for h in found] == [(4, 5, "open"), (1, 1, "ended"),
                                                                       (7, 7, "open")]
    # equal idle memory: 2 blocks x 1 s against 1 block x 2 s, the narrow one at lower block ids
    states = [[H] * 6, [F, H, H, H, H, H], [F, H, H, H, F, F], [F, H, H, H, F, F]]
    maps = [BlockMap.from_states(np.array(r, dtype=np.uint8), 2_000 + t, 6) for t, r in enumerate(states)]
    ranked = layout.long_lived_holes(layout.stack(maps), np.array([0.0, 1.0, 2.0, 3.0]), top=5)
    assert [(h.first_block, h.last_block, h.seconds) for h in ranked] == [(5, 6, 1.0), (1, 1, 2.0)]


def _report_with_maps(run, tmp_path, states, times, max_cells):
    """The simulated pool's report with these maps instead of the generated ones."""
    (metrics,) = run.inputs.glob("metrics-*.jsonl")
    logs = tmp_path / "logs.jsonl"
    logs.write_text("".join(logs_line(run.resource, [log_record(t, run.pool, *encoded(row, t, max_cells))]) + "\n"
                            for row, t in zip(states, times)))
    telemetry = otlp_read.read([metrics, logs])
    assert telemetry.problems == []
    (r,) = [report.pool_report(telemetry, s, run.start_ns, several=False) for s in telemetry.pools()]
    return r


def test_binned_maps_are_reported_per_cell(run, tmp_path):
    r = _report_with_maps(run, tmp_path, run.states, run.times, max_cells=34)  # 34 cells of 3 blocks
    section = _section(report.render_text(r))
    assert section[0].startswith(f"Block layout ({MAPS} maps, every ~0.01 s, {BLOCKS} blocks, 34 cells of 3 blocks;")
    regions = brute_regions(run.states, 3)
    assert f"    blocks {regions[0]['first']}-{regions[0]['last']}: {regions[0]['changes']} changes" \
           f" ({100 * regions[0]['share']:.1f}%)" in "\n".join(section)
    assert regions[0]["last"] <= 18  # still the churning blocks
    hole = brute_holes(run.states, 3, run.seconds)[0]
    assert (hole["first"], hole["last"]) == (67, 78)  # the whole cells inside blocks 65-80
    assert f"      blocks 67-78 (12 blocks): since 0.000 s → until {run.seconds[-1]:.3f} s" in section[
        next(i for i, line in enumerate(section) if line.startswith("    never used")) + 1]
    assert "Cells are bins of 3 blocks" in section[-1]
    (chart,) = [c for c in report.charts(r) if c.name == "block_layout"]
    heat, churn = chart.panels
    sizes = [3] * 33 + [1]
    expected = [[sum(cell_counts(row, 3)[s][c] / sizes[c] * layout.STATE_COLOURS[s] for s in range(5))
                 for row in run.states] for c in range(34)]
    assert np.allclose(heat.image, np.array(expected))
    changes = brute_churn(run.states, 3)
    edges = equal_edges(34, 32)
    assert churn.image.tolist() == [[sum(changes[t][lo:hi]) for t in range(MAPS - 1)]
                                    for lo, hi in zip(edges, edges[1:])]


def test_binned_state_shares_are_of_the_pools_blocks_not_of_its_cells(run, tmp_path):
    """100 blocks in 34 cells of 3: the last cell holds one block, not three. The shares of
    blocks by state are of the 100 blocks (they add up to 100%), each equal to a count of the
    generated per-block states; cells x bin size (102) would show every share too small and a
    sum of 98%, which no one-block-per-cell test can see."""
    r = _report_with_maps(run, tmp_path, run.states, run.times, max_cells=34)
    assert (r.block_layout.cells, r.block_layout.bin_size) == (34, 3) and 34 * 3 != BLOCKS
    (line,) = [x for x in _section(report.render_text(r)) if x.startswith("  blocks by state, averaged over the maps: ")]
    shown = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", "))
    totals = Counter(s for row in run.states for s in row)
    assert shown == {name: f"{100 * totals[code] / (MAPS * BLOCKS):.1f}%" for code, name in enumerate(BLOCK_STATES)}
    # five shares rounded to 0.1%: their sum is 100% within 5 x 0.05%
    assert abs(sum(float(v.rstrip("%")) for v in shown.values()) - 100) <= 0.25


def test_a_single_map_has_no_churn_to_show(run, tmp_path):
    r = _report_with_maps(run, tmp_path, run.states[:1], run.times[:1], max_cells=4096)
    section = _section(report.render_text(r))
    assert section[0].startswith(f"Block layout (1 map, {BLOCKS} blocks")
    assert "  one map: no state changes to count" in section
    assert any("blocks 65-80 (16 blocks): since 0.000 s → until 0.000 s" in line for line in section)
    (chart,) = [c for c in report.charts(r) if c.name == "block_layout"]
    assert len(chart.panels) == 1 and chart.panels[0].image.shape == (BLOCKS, 1, 3)
    from vllm_frag_otel.analysis.plots import render

    assert render(chart, tmp_path).read_bytes().startswith(b"\x89PNG")


def test_many_maps_are_thinned_evenly_keeping_the_first_and_last(run, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "LAYOUT_MAX_MAPS", 7)
    r = _report_with_maps(run, tmp_path, run.states, run.times, max_cells=4096)
    kept = [round(i * (MAPS - 1) / 6) for i in range(7)]
    assert r.block_layout.times.tolist() == [run.times[i] for i in kept]
    assert r.block_layout.counts.tolist() == [cell_counts(run.states[i], 1) for i in kept]
    section = _section(report.render_text(r))
    assert section[0].startswith("Block layout (7 maps, every ~") and f"evenly spaced among {MAPS}" in section[0]


def test_heat_map_columns_sit_at_their_times(run, tmp_path):
    """Maps 10 ms apart, then 50 ms apart: each column spans halfway to its neighbours, not an even share."""
    times = [run.times[0] + t * STEP_NS for t in range(10)] + [run.times[0] + 9 * STEP_NS + t * 5 * STEP_NS
                                                                for t in range(1, 6)]
    r = _report_with_maps(run, tmp_path, run.states[:15], times, max_cells=4096)
    (chart,) = [c for c in report.charts(r) if c.name == "block_layout"]
    heat, churn = chart.panels
    seconds = [(t - run.start_ns) / 1e9 for t in times]
    middles = [(a + b) / 2 for a, b in zip(seconds, seconds[1:])]
    assert heat.x_edges == pytest.approx([2 * seconds[0] - middles[0], *middles, 2 * seconds[-1] - middles[-1]])
    widths = np.diff(heat.x_edges)
    assert widths[1] == pytest.approx(0.01) and widths[-2] == pytest.approx(0.05)
    assert churn.x_edges == pytest.approx(seconds)  # interval i from map i to map i + 1
    from vllm_frag_otel.analysis.plots import figure

    (mesh,) = figure(chart).axes[0].collections
    columns = mesh.get_coordinates()[0, :, 0]
    assert columns.tolist() == pytest.approx(heat.x_edges.tolist())

"""`vllm-frag-otel report` on recorded simulations: every number it shows is
checked against what the run recorded (the raw OTLP/JSON lines, read here with
plain json, and simulate's summary.json), not against the reporting code.

Two runs of the real `vllm-frag-otel simulate` (a fresh interpreter, the plugin
loaded by vLLM's entry point): one exporting cumulative metrics after every
scheduler step (so the report sees every state the summary saw), one exporting
delta metrics every few steps.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, trace_spans

from vllm_frag_otel import cli, jsonlines
from vllm_frag_otel.analysis import otlp_read
from vllm_frag_otel.analysis import report
from vllm_frag_otel.sim import workloads

SIMULATE = ["--workload", "alpaca", "--num-requests", "40", "--num-blocks", "30", "--max-num-seqs", "8", "--seed", "3"]
GAUGES = ["used_blocks", "cached_blocks", "empty_blocks", "free_runs", "largest_free_run", "external_fragmentation",
          "unused_slots", "partial_blocks", "internal_fragmentation", "slot_utilization", "tracked_requests"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _simulate(out: Path, env_overrides: dict[str, str], *flags: str) -> Path:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VLLM_FRAG_OTEL_"))}
    # only the step-driven exports (and the last one at exit), no timer in between
    env.update({"OTEL_METRIC_EXPORT_INTERVAL": "600000", **env_overrides})
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_frag_otel.cli", "simulate", *SIMULATE, *flags, "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def cumulative(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory.mktemp("cumulative"), {}, "--export-every", "1")


@pytest.fixture(scope="module")
def delta(tmp_path_factory) -> Path:
    # and fewer open spans than requests: the report must say whom its per-request figures leave out
    # every allocate_slots call timed, so the histogram's deltas can be checked against the call count
    return _simulate(tmp_path_factory.mktemp("delta"), {"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta",
                                                        "VLLM_FRAG_OTEL_MAX_OPEN_SPANS": "4",
                                                        "VLLM_FRAG_OTEL_ALLOCATION_SAMPLE_RATE": "1"},
                     "--export-every", "7")


@pytest.fixture(scope="module")
def built(cumulative, tmp_path_factory):
    """The report of the cumulative run, through the command line, and what it printed."""
    out = tmp_path_factory.mktemp("report")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["report", str(cumulative), "--output", str(out)]) == 0
    return out, stdout.getvalue()


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# -- the recorded data, read independently ----------------------------------------------


def _value(v: dict):
    (kind, raw), = v.items()
    return {"intValue": int, "doubleValue": float}.get(kind, lambda x: x)(raw)


def raw_points(run: Path) -> dict[tuple, list[dict]]:
    """(metric, attributes without the pool) -> points in file order, from the raw lines."""
    points: dict[tuple, list[dict]] = {}
    for path in sorted((run / "telemetry").glob("metrics-*.jsonl")):
        for line in path.read_text().splitlines():
            for rm in json.loads(line)["resourceMetrics"]:
                for sm in rm["scopeMetrics"]:
                    for m in sm["metrics"]:
                        kind = next(k for k in ("gauge", "sum", "histogram") if k in m)
                        for dp in m[kind]["dataPoints"]:
                            attrs = {a["key"]: _value(a["value"]) for a in dp.get("attributes", [])}
                            attrs.pop("vllm.kv_cache.pool", None)
                            point = {"time": int(dp["timeUnixNano"]), "kind": kind,
                                     "delta": m[kind].get("aggregationTemporality") == 1}
                            if kind == "histogram":
                                # protobuf JSON leaves out zero values
                                point.update(count=int(dp.get("count", 0)),
                                             buckets=[int(c) for c in dp.get("bucketCounts", [])],
                                             bounds=[float(b) for b in dp.get("explicitBounds", [])])
                            else:
                                point["value"] = float(dp.get("asDouble", dp.get("asInt", 0)))
                            key = (m["name"], tuple(sorted((k, _text(v)) for k, v in attrs.items())))
                            points.setdefault(key, []).append(point)
    return points


def _text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def raw_matching(run: Path, metric: str, attributes: dict[str, str] | None = None) -> list[dict]:
    """The points of the one series of `metric` with (at least) these attributes."""
    wanted = set((attributes or {}).items())
    (points,) = [p for (name, attrs), p in raw_points(run).items() if name == metric and wanted <= set(attrs)]
    return points


def raw_series(run: Path, metric: str, attributes: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Times and values (running totals for delta sums) of the one matching series."""
    points = raw_matching(run, metric, attributes)
    values = np.array([p["value"] for p in points])
    return np.array([p["time"] for p in points]), np.cumsum(values) if points[0]["delta"] else values


def first_time(run: Path) -> int:
    return min(p["time"] for points in raw_points(run).values() for p in points)


def raw_spans(run: Path) -> list[dict]:
    return [{a["key"]: _value(a["value"]) for a in span["attributes"]} | {"events": span.get("events", [])}
            for span in trace_spans(run)]


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- the report against the recording --------------------------------------------------------


def test_every_state_the_summary_saw_is_in_the_report(cumulative, built):
    """Exported after every step, the report's gauges reach the same extremes as
    simulate's per-step summary, and every total ends where the summary ended."""
    summary = _summary(cumulative)
    telemetry = otlp_read.read([cumulative])
    (pool,) = telemetry.pools()
    r = report.pool_report(telemetry, pool, 0, several=False)
    assert r.exports >= summary["steps"]
    for name, stats in r.stats.items():
        assert stats["final"] == pytest.approx(summary["fields"][name]["final"]), name
    for name in GAUGES:
        assert r.stats[name]["max"] == pytest.approx(summary["fields"][name]["max"]), name
    assert summary["fields"]["preemptions"]["final"] > 0 and summary["fields"]["evictions"]["final"] > 0


def test_series_are_the_raw_points(cumulative, built):
    telemetry = otlp_read.read([cumulative])
    start = first_time(cumulative)
    r = report.pool_report(telemetry, telemetry.pools()[0], start, several=False)
    for name, metric, attributes in [
        ("used_blocks", "vllm.kv_cache.blocks", {"vllm.kv_cache.block.state": "used"}),
        ("cached_blocks", "vllm.kv_cache.blocks", {"vllm.kv_cache.block.state": "cached"}),
        ("internal_fragmentation", "vllm.kv_cache.fragmentation.internal", {}),
        ("preemptions", "vllm.kv_cache.preemptions", {}),
        ("allocation_failures", "vllm.kv_cache.allocation.attempts", {"vllm.kv_cache.allocation.outcome": "failure"}),
    ]:
        times, values = raw_series(cumulative, metric, attributes)
        assert np.array_equal(r.quantities[name].seconds, (times - start) / 1e9), name
        assert np.array_equal(r.quantities[name].values, values), name


def test_delta_temporality_is_accumulated(delta, tmp_path):
    summary = _summary(delta)
    telemetry = otlp_read.read([delta])
    r = report.pool_report(telemetry, telemetry.pools()[0], 0, several=False)
    _, raw_preemptions = raw_series(delta, "vllm.kv_cache.preemptions")
    assert np.array_equal(r.quantities["preemptions"].values, raw_preemptions)
    for name in ("preemptions", "evictions", "evicted_never_reused", "allocation_attempts", "allocation_failures",
                 "prefix_queried_tokens", "prefix_hit_tokens", "blocks_allocated_recycled"):
        assert r.final[name] == summary["fields"][name]["final"] > 0, name
    # a histogram's deltas add up to every allocate_slots call
    assert sum(h.values[-1] for h in r.latency.values()) == summary["fields"]["allocation_attempts"]["final"]
    _, untraced = raw_series(delta, "vllm.frag_otel.requests.untraced")
    assert len(r.requests) == len(raw_spans(delta)) < 40 and untraced[-1] > 0
    assert f"caveat: some requests had no span (VLLM_FRAG_OTEL_MAX_OPEN_SPANS were open;" \
           f" vllm.frag_otel.requests.untraced = {untraced[-1]:.0f})" in report.render_text(r)


def test_csv_and_json_hold_every_series(cumulative, built):
    out, _ = built
    raw = raw_points(cumulative)
    rows = _read_csv(out / "series.csv")
    by_series: dict[tuple, list[dict]] = {}
    for row in rows:
        attrs = tuple(sorted(tuple(kv.split("=", 1)) for kv in row["attributes"].split(";") if kv))
        by_series.setdefault((row["metric"], attrs), []).append(row)
    assert set(by_series) == set(raw)  # every series, histograms included
    for key, points in raw.items():
        exported = by_series[key]
        assert [int(row["time_unix_nano"]) for row in exported] == [p["time"] for p in points], key
        expected = [p["count"] if p["kind"] == "histogram" else p["value"] for p in points]
        assert [float(row["value"]) for row in exported] == expected, key
    document = json.loads((out / "series.json").read_text())
    assert len(document["series"]) == len(raw)
    (failures,) = [s for s in document["series"] if s["metric"] == "vllm.kv_cache.allocation.duration"
                   and s["attributes"]["vllm.kv_cache.allocation.outcome"] == "failure"]
    raw_failures = raw_matching(cumulative, "vllm.kv_cache.allocation.duration",
                                {"vllm.kv_cache.allocation.outcome": "failure"})
    assert failures["buckets"][-1] == raw_failures[-1]["buckets"]
    histogram_rows = _read_csv(out / "histograms.csv")
    last = [r for r in histogram_rows if r["metric"] == "vllm.kv_cache.allocation.duration"
            and "vllm.kv_cache.allocation.outcome=failure" in r["attributes"]
            and int(r["time_unix_nano"]) == raw_failures[-1]["time"]]
    # one row per bucket: its upper bound, the calls in it, and in it and below (the +Inf row: all of them)
    point = raw_failures[-1]
    assert [r["upper_bound"] for r in last] == [*map(str, point["bounds"]), "+Inf"]
    assert [float(r["count_in_bucket"]) for r in last] == point["buckets"]
    assert [float(r["cumulative_count"]) for r in last] == np.cumsum(point["buckets"]).tolist()
    assert float(last[-1]["cumulative_count"]) == float(last[-1]["total_count"]) == point["count"] > 0


def test_requests_come_from_the_spans(cumulative, built):
    out, _ = built
    summary = _summary(cumulative)
    spans = raw_spans(cumulative)
    rows = _read_csv(out / "requests.csv")
    assert len(rows) == len(spans) == 40
    by_id = {row["request_id"]: row for row in rows}
    for span in spans:
        row = by_id[span["vllm.request.id"]]
        assert int(row["unused_slots"]) == span["vllm.kv_cache.slot.unused"]
        assert int(row["preemptions"]) == span["vllm.request.preemptions"]
        released = sum(_value(a["value"]) for e in span["events"] if e["name"] == "preempted" for a in e["attributes"])
        assert int(row["released_blocks"]) == released
    # output lengths are derived from slots: they are the workload's
    specs = workloads.generate("alpaca", 40, seed=3, max_len=(30 - 1) * 16)
    assert [int(by_id[f"req-{i}"]["output_tokens"]) for i in range(40)] == [s.output_len for s in specs]
    # the blocks each request took from the free list add up to the pool's fresh and recycled allocations
    fields = summary["fields"]
    taken = fields["blocks_allocated_fresh"]["final"] + fields["blocks_allocated_recycled"]["final"]
    assert sum(int(row["new_blocks"]) for row in rows) == taken
    classes = _read_csv(out / "request_classes.csv")
    assert sum(int(c["requests"]) for c in classes) == 40
    assert sum(int(c["preemptions"]) for c in classes) == fields["preemptions"]["final"]
    assert sum(int(c["unused_slots"]) for c in classes) == sum(s["vllm.kv_cache.slot.unused"] for s in spans)


def test_charts_are_drawn_from_the_recorded_series(cumulative, built):
    telemetry = otlp_read.read([cumulative])
    start = first_time(cumulative)
    r = report.pool_report(telemetry, telemetry.pools()[0], start, several=False)
    charts = {c.name: c for c in report.charts(r)}
    assert set(charts) == {"block_states", "slot_utilization", "fragmentation", "evictions", "preemptions",
                           "allocation_latency", "request_classes", "request_latency", "block_layout"}
    lines = {(name, line.label): line for name, c in charts.items() for panel in c.panels for line in panel.lines}
    for (chart, label), metric, attributes in [
        (("block_states", "used"), "vllm.kv_cache.blocks", {"vllm.kv_cache.block.state": "used"}),
        (("block_states", "cached (evictable)"), "vllm.kv_cache.blocks", {"vllm.kv_cache.block.state": "cached"}),
        (("block_states", "empty"), "vllm.kv_cache.blocks", {"vllm.kv_cache.block.state": "empty"}),
        (("slot_utilization", "slot utilization (token slots holding computed tokens / all slots)"),
         "vllm.kv_cache.slot.utilization", {}),
        (("fragmentation", "internal (unused / allocated slots)"), "vllm.kv_cache.fragmentation.internal", {}),
        (("fragmentation", "external (free blocks outside the largest free run / usable blocks)"),
         "vllm.kv_cache.fragmentation.external", {}),
        (("evictions", "evicted, never reused after caching"), "vllm.kv_cache.block.evictions",
         {"vllm.kv_cache.block.reused": "false", "vllm.kv_cache.eviction.reason": "capacity"}),
        (("preemptions", "preemptions"), "vllm.kv_cache.preemptions", {}),
        (("preemptions", "failed allocate_slots calls"), "vllm.kv_cache.allocation.attempts",
         {"vllm.kv_cache.allocation.outcome": "failure"}),
    ]:
        times, values = raw_series(cumulative, metric, attributes)
        line = lines[(chart, label)]
        assert np.array_equal(line.y, values), (chart, label)
        assert np.array_equal(line.x, (times - start) / 1e9), (chart, label)
    # the external ratio's ceiling: the free share of the pool, from the raw block counts
    _, empty = raw_series(cumulative, "vllm.kv_cache.blocks", {"vllm.kv_cache.block.state": "empty"})
    _, cached = raw_series(cumulative, "vllm.kv_cache.blocks", {"vllm.kv_cache.block.state": "cached"})
    _, limit = raw_series(cumulative, "vllm.kv_cache.block.limit", {})
    ceiling = lines[("fragmentation", "free blocks (empty or cached) / usable blocks: its ceiling")].y
    assert np.allclose(ceiling, (empty + cached) / limit[-1])
    assert (lines[("fragmentation", "external (free blocks outside the largest free run / usable blocks)")].y
            <= ceiling + 1e-12).all()
    for outcome in ("success", "failure"):
        expected = raw_matching(cumulative, "vllm.kv_cache.allocation.duration",
                                {"vllm.kv_cache.allocation.outcome": outcome})[-1]
        assert lines[("allocation_latency", outcome)].y.tolist() == expected["buckets"]
    shares = {line.label: line.y for line in charts["request_classes"].panels[0].lines}
    assert all(y.sum() == pytest.approx(1.0) for y in shares.values())


def test_pngs_and_the_self_contained_html(built):
    out, _ = built
    pngs = sorted(out.glob("*.png"))
    assert [p.stem for p in pngs] == sorted(["block_states", "slot_utilization", "fragmentation", "evictions",
                                             "preemptions", "allocation_latency", "request_classes", "request_latency",
                                             "block_layout"])
    from PIL import Image

    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, png
        pixels = np.asarray(Image.open(png).convert("L"))
        assert pixels.std() > 10, png  # something was drawn
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs)
    for png in pngs:
        assert base64.b64encode(png.read_bytes()).decode() in page
    assert "src=\"http" not in page and "href=" not in page  # nothing to fetch


def test_the_summary_answers_the_four_questions_with_the_recorded_numbers(cumulative, built):
    out, printed = built
    fields = _summary(cumulative)["fields"]
    text = (out / "summary.txt").read_text()
    assert text.strip() in printed
    for question in ("1. What is the fragmentation pattern?", "2. What causes it?", "3. What does it cost?",
                     "4. How to reduce it?"):
        assert question in text
    final = {k: int(v["final"]) for k, v in fields.items()}
    assert f"preemptions         {final['preemptions']}" in text
    assert f"{final['allocation_failures']} of {final['allocation_attempts']} allocate_slots calls failed" in text
    assert f"The pool runs out ({final['preemptions']} preemptions, {final['allocation_failures']} failed" in text
    assert "block size 16" in text


def test_the_share_of_failed_calls_is_of_all_calls_and_the_same_in_summary_and_advice(cumulative, built):
    """The failed allocate_slots calls as a share of all calls (failures + successes), in the
    "waiting" line and in the advice, recomputed here from the run's own summary.json: a share
    of the successes only (324 of 2429 failed: 15.4% instead of 13.3%) would have the two lines
    of one report disagree, and the count check above still pass."""
    out, _ = built
    final = {k: int(v["final"]) for k, v in _summary(cumulative)["fields"].items()}
    failures, attempts = final["allocation_failures"], final["allocation_attempts"]
    assert 0 < failures < attempts  # the run failed some calls, not all
    share = f"{100 * failures / attempts:.1f}%"
    assert share != f"{100 * failures / (attempts - failures):.1f}%"  # the two readings differ at this precision
    text = (out / "summary.txt").read_text()
    (waiting,) = [line for line in text.splitlines() if line.startswith("  - waiting: ")]
    assert f"{failures} of {attempts} allocate_slots calls failed ({share});" in waiting
    (advice,) = [line for line in text.splitlines() if "The pool runs out (" in line]
    assert f"{failures} failed allocations, {share} of calls)" in advice


def test_one_kv_cache_group_gets_one_line_not_a_section(cumulative, built):
    """A single-group pool: the header names its group; no groups table, no groups
    chart; groups.csv has its one row, as recounted from the raw points."""
    out, _ = built
    text = (out / "summary.txt").read_text()
    assert "29 usable blocks; one KV-cache group (full_attention); 40 request spans" in text
    assert "KV-cache groups" not in text and "state pages" not in text
    assert not (out / "kv_cache_groups.png").exists()
    (row,) = _read_csv(out / "groups.csv")
    times, blocks = raw_series(cumulative, "vllm.kv_cache.group.blocks")
    assert (row["group"], row["kind"], row["token_slots"], row["block_size"]) == ("0", "full_attention", "true", "16")
    assert int(row["exports"]) == len(times)
    assert float(row["blocks_mean"]) == pytest.approx(blocks.mean())
    assert float(row["blocks_max"]) == blocks.max() > 0
    _, unused = raw_series(cumulative, "vllm.kv_cache.slots", {"vllm.kv_cache.slot.state": "unused"})
    assert float(row["unused_slots_mean"]) == pytest.approx(unused.mean())


# -- bad input ---------------------------------------------------------------------------------


def test_bad_lines_are_named_and_the_rest_is_reported(cumulative, tmp_path, capsys):
    broken = tmp_path / "in"
    broken.mkdir()
    (source,) = (cumulative / "telemetry").glob("metrics-*.jsonl")
    lines = source.read_text().splitlines()
    lines[2] = "this is not json"
    lines[4] = json.dumps({"hello": "world"})
    damaged = broken / "metrics-damaged.jsonl"
    damaged.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # cut mid-record
    for traces in (cumulative / "telemetry").glob("traces-*.jsonl"):
        shutil.copy(traces, broken)
    missing = tmp_path / "nowhere.jsonl"
    out = tmp_path / "report"
    assert cli.main(["report", str(broken), str(missing), "--output", str(out), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert f"{damaged}:3: not valid JSON" in err
    assert f"{damaged}:5: not OTLP" in err
    assert f"{damaged}:{len(lines)}: truncated line" in err
    assert f"{missing}: no such file or directory" in err
    rows = [r for r in _read_csv(out / "series.csv") if r["metric"] == "vllm.kv_cache.preemptions"]
    assert len(rows) == len(lines) - 3  # every intact line
    assert "3 problem(s)" not in (out / "summary.txt").read_text()
    assert "4 problem(s)" in (out / "summary.txt").read_text()
    assert len(_read_csv(out / "requests.csv")) == 40


def test_missing_metrics_are_named(cumulative, tmp_path, capsys):
    (source,) = (cumulative / "telemetry").glob("metrics-*.jsonl")
    filtered = tmp_path / "metrics-filtered.jsonl"
    with open(filtered, "w") as fh:
        for line in source.read_text().splitlines():
            request = json.loads(line)
            for rm in request["resourceMetrics"]:
                for sm in rm["scopeMetrics"]:
                    sm["metrics"] = [m for m in sm["metrics"] if m["name"] != "vllm.kv_cache.preemptions"]
            fh.write(json.dumps(request) + "\n")
    assert cli.main(["report", str(filtered), "--output", str(tmp_path / "out")]) == 2  # an input with nothing to report
    assert "no vllm.kv_cache.preemptions in the input; pool skipped" in capsys.readouterr().err


def test_no_metrics_at_all_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "notes.json").write_text(json.dumps({"hello": "world"}))
    (tmp_path / "metrics-1.jsonl").write_text('{"resourceMetrics": [{"scopeMetrics": [')
    assert cli.main(["report", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "vllm-frag-otel: error: no vllm.kv_cache metrics in" in err
    assert f"{tmp_path / 'metrics-1.jsonl'}:1: truncated line" in err


def test_a_file_of_garbage_is_summed_up_not_listed(tmp_path):
    garbage = tmp_path / "binary.jsonl"
    garbage.write_bytes(b"\x00\x01garbage\n" * 500 + b'{"ok": 1}\n')
    problems: list[jsonlines.InputProblem] = []
    assert list(jsonlines.json_records(garbage, problems)) == [(501, {"ok": 1})]
    assert [p.line for p in problems] == [*range(1, jsonlines.NAMED_BAD_LINES + 1), 0]
    assert str(problems[-1]) == f"{garbage}: 500 lines are not valid JSON in all (the first 10 named above); all skipped"


# -- issue 13: what the report shows is right ---------------------------------------------------


def _copy_telemetry(run: Path, to: Path, keep_metrics=lambda lines: lines, signals=("metrics", "traces", "logs")):
    """The run's OTLP files in `to`, the metrics lines filtered by `keep_metrics`."""
    to.mkdir()
    for path in (run / "telemetry").glob("*.jsonl"):
        signal = path.name.split("-")[0]
        if signal in signals:
            lines = path.read_text().splitlines(keepends=True)
            (to / path.name).write_text("".join(keep_metrics(lines) if signal == "metrics" else lines))
    return to


def test_inputs_covering_different_times_are_said_so(cumulative, built, tmp_path, capsys):
    _, printed = built
    assert "cover different times" not in printed  # the whole run
    # what rotation leaves when it deleted the older metrics files: the last part only
    trimmed = _copy_telemetry(cumulative, tmp_path / "in", keep_metrics=lambda lines: lines[len(lines) // 2:])
    assert cli.main(["report", str(trimmed), "--output", str(tmp_path / "out"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    (line,) = [line for line in printed.splitlines() if "cover different times" in line]
    assert line.startswith("  caveat: the inputs cover different times (metrics ")
    assert "request spans " in line and "block maps " in line and "VLLM_FRAG_OTEL_FILE_MAX_FILES" in line
    assert line in (tmp_path / "out" / "summary.txt").read_text()


def test_a_report_directory_reused_holds_no_stale_outputs(cumulative, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["report", str(cumulative), "--output", str(out)]) == 0
    assert (out / "block_layout.png").exists() and (out / "hotspots.csv").exists()
    (out / "my-notes.txt").write_text("mine")
    (out / "layout.png").write_bytes(b"not the report's")
    without_maps = _copy_telemetry(cumulative, tmp_path / "in", signals=("metrics",))
    assert cli.main(["report", str(without_maps), "--output", str(out)]) == 0
    for stale in ("block_layout.png", "block_layout.npz", "hotspots.csv", "requests.csv", "request_classes.csv"):
        assert not (out / stale).exists(), stale
    assert (out / "my-notes.txt").read_text() == "mine" and (out / "layout.png").read_bytes() == b"not the report's"
    assert (out / "summary.txt").exists() and (out / "block_states.png").exists()
    assert "Block layout" not in (out / "report.html").read_text()


def test_charts_an_operator_can_read(cumulative, tmp_path):
    from vllm_frag_otel.analysis.plots import figure

    telemetry = otlp_read.read([cumulative])
    r = report.pool_report(telemetry, telemetry.pools()[0], 0, several=False)
    charts = {c.name: c for c in report.charts(r, smooth=5)}
    # slot utilisation beside the blocks in use: the gap is allocated but empty slots
    (panel,) = charts["slot_utilization"].panels
    lines = {line.label.split(" (")[0]: line for line in panel.lines}
    _, used = raw_series(cumulative, "vllm.kv_cache.blocks", {"vllm.kv_cache.block.state": "used"})
    assert np.allclose(lines["blocks in use"].y, used / 29)
    _, utilization = raw_series(cumulative, "vllm.kv_cache.slot.utilization")
    assert np.array_equal(lines["slot utilization"].y, utilization)
    # each fragmentation ratio on its own axes, with its rolling mean (the external one with its ceiling)
    internal, external = charts["fragmentation"].panels
    assert len(internal.lines) == 2 and len(external.lines) == 3
    for panel, metric in ((internal, "vllm.kv_cache.fragmentation.internal"),
                          (external, "vllm.kv_cache.fragmentation.external")):
        raw, smoothed = panel.lines[:2]
        _, values = raw_series(cumulative, metric)
        assert np.array_equal(raw.y, values)
        assert smoothed.label == "rolling mean of 5 exports"
        assert smoothed.y[10] == pytest.approx(values[6:11].mean()) and smoothed.y[0] == values[0]
    drawn = figure(charts["fragmentation"])
    visible = [ax for ax in drawn.axes if ax.get_visible()]
    assert len(visible) == 2 and visible[0].get_ylim()[1] < 0.5 * visible[1].get_ylim()[1]  # not one 0-100% scale
    # allocation latency: counts on a log scale, failures beside successes
    latency = charts["allocation_latency"]
    assert latency.panels[0].log_y and {line.label for line in latency.panels[0].lines} == {"success", "failure"}
    (ax,) = [ax for ax in figure(latency).axes if ax.get_visible()]
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log"
    assert "smooth" not in " ".join(line.label for c in report.charts(r) for p in c.panels for line in p.lines)


def test_the_report_names_ignored_files_and_the_sample_rate(tmp_path, capsys):
    run = _simulate(tmp_path / "sampled", {}, "--export-every", "5")  # the default sample rate, 0.01
    assert cli.main(["report", str(run), "--output", str(tmp_path / "out"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "1 ignored (no OTLP)" in printed and f"  ignored {run / 'summary.json'}: no OTLP line in it" in printed
    (line,) = [line for line in printed.splitlines() if "allocate_slots time (success)" in line]
    assert "timed calls, a random 1.0% sample of all (vllm.kv_cache.allocation.sample_rate 0.01; about" in line


def _histogram(buckets: list[int], total: float) -> otlp_read.Series:
    return otlp_read.Series("vllm.kv_cache.allocation.duration", otlp_read.Source("i", "0"), {}, "histogram", "s",
                            np.array([1]), np.array([float(sum(buckets))]), sums=np.array([total]),
                            bounds=np.array([1e-6, 1e-5]), buckets=np.array([buckets], dtype=np.float64))


def test_a_quantile_beyond_the_last_bound_is_not_a_number_below_the_mean():
    # 5 calls, 4 of them slower than the last bound (10 µs): mean 1 ms
    line = report.latency_line("failure", _histogram([1, 0, 4], 5e-3))
    assert "mean 1.00 ms" in line and "p99 > 10.0 µs" in line and "p50 > 10.0 µs" in line
    assert "over 5 calls" in line  # no sample rate on the points: every call timed
    line = report.latency_line("success", _histogram([0, 10, 0], 5e-5))
    assert "p99 9.9 µs" in line


def test_one_rounding_for_every_percentage():
    from vllm_frag_otel.analysis.summary import gauge_lines, render

    stats = {name: {"mean": 0.0, "p50": 0.0, "max": 0.0, "final": 0.0}
             for name in cli.field_statistics.__globals__["FIELDS"]}
    stats["internal_fragmentation"] = {"mean": 0.010495, "p50": 0.010495, "max": 0.010495, "final": 0.010495}
    (row,) = [line for line in gauge_lines(stats) if "internal fragmentation" in line]
    assert row.split()[-3:] == ["1.0%"] * 3
    text = render(stats, 10, 16)
    assert "1.0% of allocated token slots were empty" in text
    assert "0 allocations" not in text and "0 preemptions" not in text
    assert "no allocation failed for lack of free blocks and no request was preempted" in text


# -- the request spans as a workload to replay (see also test_replay.py) -----------------------


def test_the_workload_file_holds_every_request_in_the_order_vllm_took_them(cumulative, built):
    """All 40 requests, queued or not: exact prompt and output lengths in the order vLLM first
    looked them up (its queue order, here the workload's), each arriving when it was sent
    (not when vLLM first looked it up); the prefix estimate is 0 for
    requests without a shared system prompt and at most its 64 tokens for those with one."""
    out, printed = built
    lines = [json.loads(line) for line in (out / "workload.jsonl").read_text().splitlines()]
    specs = workloads.generate("alpaca", 40, seed=3, max_len=(30 - 1) * 16)
    assert [(line["prompt_len"], line["output_len"]) for line in lines] == \
        [(len(s.prompt_tokens), s.output_len) for s in specs]
    estimates = [line.get("prefix_len", 0) for line in lines]
    assert all(e == 0 for e in estimates[1::2]) and all(e <= 64 for e in estimates[0::2]) and any(estimates)
    times = [line["arrival_time"] for line in lines]
    assert times == [0.0] * 40  # all sent at once (simulate without --arrival-rate), queued or not
    assert f"{out / 'workload.jsonl'}: 40 requests" in printed
    assert (out / "request_latency.csv").exists() and "Latency and KV-cache events" in printed


def test_the_workload_file_says_which_requests_it_lacks(delta, tmp_path, capsys):
    """Requests the plugin did not follow with a span (VLLM_FRAG_OTEL_MAX_OPEN_SPANS) are not
    in the workload, and the report says how many."""
    assert cli.main(["report", str(delta), "--output", str(tmp_path / "out"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    lines = (tmp_path / "out" / "workload.jsonl").read_text().splitlines()
    _, untraced = raw_series(delta, "vllm.frag_otel.requests.untraced")
    assert len(lines) == len(raw_spans(delta)) == 40 - untraced[-1]
    assert f"  {untraced[-1]:.0f} request(s) had no span (VLLM_FRAG_OTEL_MAX_OPEN_SPANS): they are not in it" \
        in printed


# -- the page and the charts a person reads ----------------------------------------------------------


class _Element:
    def __init__(self, tag: str, attrs: dict[str, str], parent: _Element | None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.content: list[str | _Element] = []  # text and child elements, in page order

    @property
    def children(self) -> list[_Element]:
        return [c for c in self.content if isinstance(c, _Element)]

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def all_text(self) -> str:
        return "".join(c if isinstance(c, str) else c.all_text() for c in self.content)


def _parse_html(page: str) -> _Element:
    """The page as a tree of elements."""
    from html.parser import HTMLParser

    void = {"img", "meta", "br"}
    root = _Element("document", {}, None)

    class Builder(HTMLParser):
        current = root

        def handle_starttag(self, tag, attrs):
            element = _Element(tag, dict(attrs), self.current)
            self.current.content.append(element)
            if tag not in void:
                self.current = element

        def handle_endtag(self, tag):
            assert self.current.tag == tag, f"</{tag}> closes <{self.current.tag}>"
            self.current = self.current.parent

        def handle_data(self, data):
            self.current.content.append(data)

    builder = Builder()
    builder.feed(page)
    assert builder.current is root, "unclosed elements"
    return root


# where each chart belongs: the answer it supports
CHART_HEADINGS = {
    "block_states": "1. What is the fragmentation pattern?",
    "fragmentation": "1. What is the fragmentation pattern?",
    "evictions": "2. What causes it?",
    "slot_utilization": "3. What does it cost?",
    "preemptions": "3. What does it cost?",
    "allocation_latency": "3. What does it cost?",
    "request_classes": "Requests by size class",
    "request_latency": "Latency and KV-cache events",
    "block_layout": "Block layout",
}
# the widest fixed-width line that fits the page's 1180 px column at 12.5 px monospace (0.6 em per character)
WIDEST_TABLE_LINE = int(1180 / (12.5 * 0.6))


def test_the_html_page_reads_as_sections_with_each_chart_under_its_answer(built):
    out, _ = built
    page = (out / "report.html").read_text()
    tree = _parse_html(page)
    body = [e for e in tree.walk() if e.tag == "body"][0]
    # no one block holding everything: headings, then paragraphs, lists and narrow tables
    headings = [e.all_text() for e in body.walk() if e.tag in ("h2", "h3")]
    assert [h for h in headings if h[:2] in ("1.", "2.", "3.", "4.")] == [
        "1. What is the fragmentation pattern? (statistics over the exports)", "2. What causes it?",
        "3. What does it cost?", "4. How to reduce it?"]
    tables = [e for e in body.walk() if e.tag == "pre"]
    assert len(tables) >= 4
    for table in tables:
        assert all(len(line) <= WIDEST_TABLE_LINE for line in table.all_text().splitlines()), table.all_text()
    assert sum(len(t.all_text()) for t in tables) < 0.5 * len(body.all_text())
    # every line of the summary is on the page, prose in paragraphs or list items (which wrap)
    prose = [e.all_text() for e in body.walk() if e.tag in ("p", "li")]
    table_text = "\n".join(t.all_text() for t in tables)
    summary = (out / "summary.txt").read_text()
    for line in summary.splitlines():
        text = line.strip()
        if not text or text.startswith(("1. What", "2. What", "3. What", "4. How")):
            continue
        if "   " in text:
            assert text in table_text, line
        else:
            item = text[2:] if text.startswith("- ") else text.split(". ", 1)[1] if text[:1].isdigit() and \
                text[1:3] == ". " else text
            item = item.replace("`", "")  # commands in backquotes are <code> on the page
            assert any(p.startswith(item) or item in p for p in prose) or item in headings or \
                f"KV-cache report: {item}" in headings, line
    long_prose = [line for line in summary.splitlines() if len(line) > WIDEST_TABLE_LINE and "   " not in line.strip()]
    assert long_prose and not any(line.strip() in table_text for line in long_prose)
    # each chart in a figure under the heading of the answer it supports, captioned with what it shows
    stems = {base64.b64encode(png.read_bytes()).decode(): png.stem for png in out.glob("*.png")}
    figures = [e for e in body.walk() if e.tag == "figure"]
    assert len(figures) == len(stems) == len(CHART_HEADINGS)
    order = [e for e in body.walk() if e.tag in ("h2", "h3", "figure")]
    for figure in figures:
        (img,) = [e for e in figure.children if e.tag == "img"]
        (caption,) = [e.all_text() for e in figure.children if e.tag == "figcaption"]
        stem = stems[img.attrs["src"].removeprefix("data:image/png;base64,")]
        heading = [e for e in order[:order.index(figure)] if e.tag != "figure"][-1].all_text()
        assert heading.startswith(CHART_HEADINGS[stem]), (stem, heading)
        assert len(caption.split()) >= 5 and stem not in caption and ".png" not in caption, caption
        assert img.attrs["alt"] == caption
    assert len({e.children[-1].all_text() for e in figures}) == len(figures)  # a caption of its own each


def _visible_axes(chart):
    from vllm_frag_otel.analysis.plots import figure

    drawn = figure(chart)
    drawn.canvas.draw()
    return [ax for ax in drawn.axes if ax.get_visible()]


def test_legends_stay_off_the_data(cumulative):
    """Every legend sits outside its axes: none covers a line, an area or a bar."""
    telemetry = otlp_read.read([cumulative])
    r = report.pool_report(telemetry, telemetry.pools()[0], 0, several=False)
    with_legend = 0
    for chart in report.charts(r):
        for ax in _visible_axes(chart):
            legend = ax.get_legend()
            if legend is None or chart.name == "block_layout":  # the heat map's swatches sit right of it
                continue
            with_legend += 1
            box, area = legend.get_window_extent(), ax.get_window_extent()
            assert box.y0 >= area.y1 - 1, (chart.name, box, area)
    assert with_legend >= 7


def test_allocation_times_are_labelled_elapsed_on_the_range_they_fill(cumulative):
    """allocate_slots is timed with perf_counter: elapsed time, not CPU time; the axis spans the
    buckets holding calls (recomputed from the raw histogram points), not the decades around them."""
    telemetry = otlp_read.read([cumulative])
    r = report.pool_report(telemetry, telemetry.pools()[0], 0, several=False)
    charts = {c.name: c for c in report.charts(r)}
    (ax,) = _visible_axes(charts["allocation_latency"])
    assert "elapsed" in ax.get_xlabel() and "CPU" not in ax.get_xlabel()
    assert "CPU time" not in report.render_text(r)
    filled = []
    for outcome in ("success", "failure"):
        point = raw_matching(cumulative, "vllm.kv_cache.allocation.duration",
                             {"vllm.kv_cache.allocation.outcome": outcome})[-1]
        edges = [point["bounds"][0] / 10, *point["bounds"], point["bounds"][-1] * 10]
        filled += [(edges[i], edges[i + 1]) for i, count in enumerate(point["buckets"]) if count]
    low, high = min(a for a, _ in filled), max(b for _, b in filled)
    left, right = ax.get_xlim()
    assert low / 1.5 <= left <= low and high <= right <= high * 1.5, (ax.get_xlim(), low, high)


def test_request_latency_bars_show_their_differences(cumulative):
    """The medians differ by a few percent: the y axis spans their range, not from 0."""
    telemetry = otlp_read.read([cumulative])
    r = report.pool_report(telemetry, telemetry.pools()[0], 0, several=False)
    (chart,) = [c for c in report.charts(r) if c.name == "request_latency"]
    for ax, event in zip(_visible_axes(chart), ("preempted", "failed allocation")):
        medians = [value for row in r.request_latency if row.event == event
                   for value in (row.met.per_token[0], row.spared.per_token[0]) if np.isfinite(value)]
        bottom, top = ax.get_ylim()
        assert 0 < bottom < min(medians) and max(medians) < top, (event, ax.get_ylim(), medians)
        assert top - bottom < 1.5 * (max(medians) - min(medians)) + 1e-12


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory) -> Path:
    """A gpt-oss layout run: full attention and a 128-token sliding window, two KV-cache groups."""
    return _simulate(tmp_path_factory.mktemp("hybrid"), {}, "--layout", "gpt-oss")


def test_the_groups_chart_names_the_ratio_it_plots(hybrid):
    """Its second panel is each slotted group's unused / allocated token slots (recounted from
    the raw slot counts), on a percent axis labelled so, not "empty slots"."""
    telemetry = otlp_read.read([hybrid])
    r = report.pool_report(telemetry, telemetry.pools()[0], first_time(hybrid), several=False)
    (chart,) = [c for c in report.charts(r) if c.name == "kv_cache_groups"]
    assert "empty slots" not in chart.title and "empty slots" not in chart.caption
    blocks, internal = chart.panels
    assert internal.percent and "unused / allocated" in internal.ylabel
    for line, group in zip(internal.lines, ("0", "1")):
        where = {"vllm.kv_cache.group": group}
        _, used = raw_series(hybrid, "vllm.kv_cache.slots", {**where, "vllm.kv_cache.slot.state": "used"})
        _, unused = raw_series(hybrid, "vllm.kv_cache.slots", {**where, "vllm.kv_cache.slot.state": "unused"})
        assert np.allclose(line.y, np.divide(unused, used + unused, out=np.zeros_like(unused),
                                             where=used + unused > 0))
    _, axes = _visible_axes(chart)
    assert "unused / allocated" in axes.get_ylabel() and axes.get_ylim()[1] < 1  # a ratio, shown in percent


def test_new_blocks_are_left_out_where_the_spans_cannot_give_them(hybrid, tmp_path):
    """On two groups a span says what a request held at its peak and end, not what it took from
    the free list (the window retires blocks and takes new ones): no "0 (n/a)" column, but why."""
    spans = raw_spans(hybrid)
    assert {span["vllm.kv_cache.group.count"] for span in spans} == {2}
    out = tmp_path / "out"
    assert cli.main(["report", str(hybrid), "--output", str(out), "--no-plots"]) == 0
    text = (out / "summary.txt").read_text()
    table = text.split("Requests by size class", 1)[1].split("\n\n", 1)[0].splitlines()
    header, note = table[1], table[-1]
    assert "new blocks" not in header and "(n/a)" not in "\n".join(table)
    assert "New blocks (taken from the free list) are not shown: the model has several KV-cache groups" in note
    assert header.split()[-1] == "evictions"  # measured per request, so still known
    assert sum(int(row.split()[-1]) for row in table[2:-1]) == sum(s["vllm.kv_cache.block.evicted"] for s in spans)
    classes = _read_csv(out / "request_classes.csv")
    assert classes and all(c["new_blocks"] == "" and c["evictions_measured"] == "true" for c in classes)


def test_two_runs_of_one_engine_are_two_processes_not_one(tmp_path):
    """The default service.instance.id (host and rank) stays the same across an engine's restarts,
    so Prometheus series continue; the report still reads each run apart, by its process.pid:
    counters restarting from 0 in one series would read as nonsense."""
    def export(pid: int, time_ns: int, limit: int) -> str:
        resource = [{"key": "service.instance.id", "value": {"stringValue": "host-dp0"}},
                    {"key": "process.pid", "value": {"intValue": str(pid)}}]
        point = {"timeUnixNano": str(time_ns), "asInt": str(limit),
                 "attributes": [{"key": "vllm.kv_cache.pool", "value": {"stringValue": "0"}}]}
        metric = {"name": "vllm.kv_cache.block.limit", "unit": "{block}", "gauge": {"dataPoints": [point]}}
        return json.dumps({"resourceMetrics": [{"resource": {"attributes": resource},
                                                "scopeMetrics": [{"scope": {"name": "vllm_frag_otel"},
                                                                  "metrics": [metric]}]}]})

    (tmp_path / "metrics-1.jsonl").write_text(export(101, 1_000, 63) + "\n" + export(202, 2_000, 127) + "\n")
    telemetry = otlp_read.read([tmp_path])
    assert telemetry.pools() == [otlp_read.Source("host-dp0 pid 101", "0"), otlp_read.Source("host-dp0 pid 202", "0")]
    assert sorted(s.values.tolist() for s in telemetry.series) == [[63], [127]]

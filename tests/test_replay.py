"""Production traffic replayed: `report` turns the request spans into a workload
file that `simulate --workload-file` reads, and relates preemptions and failed
allocations to latency per prompt size class.

Real runs of `vllm-frag-otel simulate` (vLLM's scheduler in a fresh interpreter,
the plugin loaded by its entry point); the reports are checked against the
workload file the test wrote and against the raw OTLP/JSON span lines and clock
file, read here with plain json and csv, not with the reporting code.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, trace_spans

from vllm_frag_otel import cli
from vllm_frag_otel.sim import workloads

STEP = 0.02  # simulate's default --step-seconds
BLOCK = 16
# room for every request at once: no request waits in vLLM's queue before its first lookup,
# none is preempted, no allocation fails, so the spans see every arrival in its own step
ROOMY = ["--num-blocks", "1000", "--max-num-seqs", "64", "--max-num-batched-tokens", "4096",
         "--block-size", str(BLOCK), "--block-map-every", "0"]
# too little room: preemptions and failed allocations in several prompt size classes
TIGHT = ["--workload", "uniform", "--num-requests", "60", "--num-blocks", "120", "--max-num-seqs", "12",
         "--seed", "5", "--block-map-every", "0"]
COMPLETE = ("finished_stopped", "finished_length_capped")


def _simulate(out: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VLLM_FRAG_OTEL_"))}
    env["OTEL_METRIC_EXPORT_INTERVAL"] = "600000"
    proc = subprocess.run([sys.executable, "-m", "vllm_frag_otel.cli", "simulate", *flags, "--output", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _report(inputs: Path, out: Path) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["report", str(inputs), "--output", str(out), "--no-plots"]) == 0
    return printed.getvalue()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _raw_spans(run: Path) -> list[dict]:
    """Every request span of the run's traces files: attributes, times, in start order."""
    spans = []
    for span in trace_spans(run):
        if span["name"] != "vllm.kv_cache.request":
            continue
        attributes = {}
        for a in span["attributes"]:
            (kind, raw), = a["value"].items()
            attributes[a["key"]] = int(raw) if kind == "intValue" else raw
        spans.append({**attributes, "start": int(span["startTimeUnixNano"]), "end": int(span["endTimeUnixNano"])})
    return sorted(spans, key=lambda s: s["start"])


# -- 1. a known workload, through simulate and report, and back ------------------------------


def _known_workload(path: Path) -> list[dict]:
    """24 requests over 0.8 s: ties; arrivals at step 29, whose start floating point puts a
    step early (0.58 / 0.02 < 29); two prefix groups with per-line lengths."""
    rng = random.Random(7)
    arrivals = [0.0, 0.0, 0.013, 0.06, 0.06, 0.1, 0.14, 0.3, 0.3, 0.3, 0.31, 0.377, 0.585, 0.59]
    arrivals += sorted(round(rng.uniform(0.4, 0.8), 3) for _ in range(10))
    records = []
    for i, arrival in enumerate(arrivals):
        record = {"arrival_time": 100 + arrival, "prompt_len": rng.randint(20, 300), "output_len": rng.randint(3, 40)}
        if i % 3 == 0:
            record["prefix_group"] = "support"
            record["prefix_len"] = 48 if i % 2 else 80
        elif i % 3 == 1 and i > 4:
            record["prefix_group"] = "code"  # --prefix-len: 64 (simulate's default)
        records.append(record)
    rng.shuffle(records)  # any line order: simulate sorts by arrival
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def _true_shared(records: list[dict], order: list[int], steps: list[int] | None = None) -> list[int]:
    """Per request in arrival order, the longest prompt prefix it shares with a request
    that arrived no later (with `steps`: at an earlier step); requests of one
    prefix_group share their first prefix_len tokens."""
    shared = []
    for n, i in enumerate(order):
        mine = records[i]
        group = mine.get("prefix_group")
        own = min(mine.get("prefix_len", 64), mine["prompt_len"]) if group else 0
        best = 0
        for m, j in enumerate(order[:n]):
            other = records[j]
            if steps is not None and steps[m] >= steps[n]:
                continue
            if group is not None and other.get("prefix_group") == group:
                best = max(best, min(own, other.get("prefix_len", 64), other["prompt_len"]))
        shared.append(best)
    return shared


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    trace = root / "known.jsonl"
    records = _known_workload(trace)
    run = root / "run"
    _simulate(run, "--workload-file", str(trace), *ROOMY, "--export-every", "5")
    printed = _report(run, root / "report")
    return root, trace, records, run, printed


def test_the_workload_file_is_the_replayed_workload(round_trip):
    """Request count, arrival steps, prompt and output tokens come back exact; the
    prefix estimate never exceeds the real shared prefix (and is its block-aligned
    part when the sharing request was cached a step earlier)."""
    root, trace, records, run, printed = round_trip
    spans = _raw_spans(run)
    assert len(spans) == len(records) == 24
    # the premise of exact arrivals: nobody waited in the queue, was preempted or failed to allocate
    assert all(s["vllm.request.preemptions"] == 0 and s["vllm.kv_cache.allocation.failures"] == 0 for s in spans)
    written = root / "report" / "workload.jsonl"
    lines = _lines(written)
    assert len(lines) == 24
    assert all(set(line) <= set(workloads.TRACE_FIELDS) for line in lines)
    # the original as simulate read it (arrival order; ties in file order) against the written file
    original = workloads.load_trace(trace, [])
    assert [len(s.prompt_tokens) for s in original] == [line["prompt_len"] for line in lines]
    assert [s.output_len for s in original] == [line["output_len"] for line in lines]
    times = np.array([line["arrival_time"] for line in lines])
    steps = np.floor(times / STEP)  # as simulate maps seconds onto steps
    assert steps.tolist() == workloads.arrival_steps(original, STEP).tolist()
    assert steps.tolist().count(29) >= 2
    assert times[0] == 0.0 and np.all(np.abs(times - np.array([s.arrival_s for s in original])) <= STEP + 1e-9)
    replayed = workloads.load_trace(written, [])
    assert workloads.arrival_steps(replayed, STEP).tolist() == workloads.arrival_steps(original, STEP).tolist()
    # the prefix estimate: a lower bound of the real sharing
    order = sorted(range(len(records)), key=lambda i: (records[i]["arrival_time"], i))
    truth = _true_shared(records, order)
    estimate = [line.get("prefix_len", 0) for line in lines]
    assert all(e <= t for e, t in zip(estimate, truth)), list(zip(estimate, truth))
    assert all((line.get("prefix_group") is not None) == bool(line.get("prefix_len")) for line in lines)
    # and it is exact, block-aligned, where the request sharing it had been cached at an earlier step
    arrived = workloads.arrival_steps(original, STEP).tolist()
    earlier = _true_shared(records, order, arrived)
    for n, i in enumerate(order):
        aligned = min(earlier[n], records[i]["prompt_len"] - 1) // BLOCK * BLOCK
        assert estimate[n] == aligned, (n, estimate[n], earlier[n], truth[n])
    assert sum(1 for e in estimate if e) >= 5
    # and the report says where it is and how to replay it
    assert f"{written}: 24 requests" in printed
    assert f"vllm-frag-otel simulate --sweep --workload-file {written}" in printed
    assert f"`vllm-frag-otel simulate --sweep --workload-file {written} --num-blocks " in printed  # the advice names it


def test_the_written_workload_replays(round_trip):
    """simulate runs the written file: the same requests, in the same order, with no
    more prefix-cache hits than the original had; its report writes the same file
    again; and a small sweep runs on it."""
    root, _, _, run, _ = round_trip
    written = root / "report" / "workload.jsonl"
    again = root / "again"
    proc = _simulate(again, "--workload-file", str(written), *ROOMY, "--export-every", "5")
    assert "24 requests in" in proc.stdout
    summary = json.loads((again / "summary.json").read_text())
    assert summary["finished_requests"] == 24 and not summary["partial"]
    first, second = _raw_spans(run), _raw_spans(again)
    assert [(s["gen_ai.usage.input_tokens"], s["gen_ai.usage.output_tokens"]) for s in second] == \
        [(s["gen_ai.usage.input_tokens"], s["gen_ai.usage.output_tokens"]) for s in first]
    hits = [(b["gen_ai.usage.cache_read.input_tokens"], a["gen_ai.usage.cache_read.input_tokens"])
            for a, b in zip(first, second)]
    assert all(replayed <= original for replayed, original in hits) and sum(r for r, _ in hits) > 0
    _report(again, root / "report-again")
    strip = [{k: v for k, v in line.items() if k not in ("prefix_group", "prefix_len")}
             for line in _lines(root / "report-again" / "workload.jsonl")]
    assert strip == [{k: v for k, v in line.items() if k not in ("prefix_group", "prefix_len")}
                     for line in _lines(written)]
    sweep = root / "sweep"
    proc = _simulate(sweep, "--sweep", "--workload-file", str(written), *ROOMY, "--sweep-max-num-seqs", "4")
    assert f"What-if sweep: {written}, 24 requests, 2 settings" in proc.stdout
    assert "Workload: a replay of recorded traffic (24 of 24 requests from a report's workload.jsonl)." in proc.stdout
    assert "what the client waited for before sending" in proc.stdout
    with open(sweep / "sweep.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["max_num_seqs"] for r in rows] == ["64", "4"]
    # the hand-written original is no replay: its sweep says nothing of one
    proc = _simulate(root / "sweep-original", "--sweep", "--workload-file", str(root / "known.jsonl"), *ROOMY,
                     "--sweep-max-num-seqs", "4")
    assert "What-if sweep:" in proc.stdout and "recorded traffic" not in proc.stdout


def test_without_the_clock_file_arrivals_are_wall_clock_seconds(round_trip, tmp_path):
    """A real server's spans (no simulator clock): arrival times are wall-clock seconds
    since the first request arrived (vLLM's Request.arrival_time, on every span), in
    arrival order."""
    root, _, _, run, _ = round_trip
    copy = tmp_path / "telemetry"
    shutil.copytree(run / "telemetry", copy, ignore=shutil.ignore_patterns("clock-*.csv"))
    printed = _report(copy, tmp_path / "report")
    lines = _lines(tmp_path / "report" / "workload.jsonl")
    spans = sorted(_raw_spans(run), key=lambda s: (s["vllm.request.arrival_time"], s["start"]))
    first = spans[0]["vllm.request.arrival_time"]
    assert all(s["vllm.request.arrival_time"] * 1e9 <= s["start"] for s in spans)  # it came in, then was looked up
    assert [line["arrival_time"] for line in lines] == pytest.approx(
        [s["vllm.request.arrival_time"] - first for s in spans], abs=2e-6)
    assert [line["prompt_len"] for line in lines] == [s["gen_ai.usage.input_tokens"] for s in spans]
    assert "in wall-clock seconds" in printed and "simulated" not in printed.split("Replay this traffic")[1]


# -- 2. latency against KV-cache events, recounted from the raw spans ----------------------


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), by hand."""
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _prompt_class(tokens: int) -> str:
    for low, high in ((0, 128), (128, 512), (512, 2048)):
        if low <= tokens < high:
            return f"{low}-{high - 1}"
    return ">=2048"


def _simulated_seconds(run: Path):
    """The clock file, read by hand: wall-clock ns -> simulated seconds, linear between steps;
    and how far a duration may be off when the wall-clock ns are read through a float64 (as
    the report's simclock does: ~256 ns apart at today's times) at the clock's steepest."""
    (path,) = (run / "telemetry").glob("clock-*.csv")
    rows = [line.split(",") for line in path.read_text().splitlines()[2:] if line]
    wall = np.array([int(w) for w, _ in rows], dtype=np.int64)
    simulated = np.array([float(s) for _, s in rows])
    slope = float(np.max(np.diff(simulated) / np.maximum(np.diff(wall), 1)))
    return (lambda ns: float(np.interp(ns - wall[0], wall - wall[0], simulated))), 2 * 512 * slope


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    root = tmp_path_factory.mktemp("tight")
    run = root / "run"
    _simulate(run, *TIGHT, "--export-every", "10")
    printed = _report(run, root / "report")
    return run, root / "report", printed


def test_latency_of_preempted_and_failed_requests_is_the_raw_spans(tight):
    run, out, printed = tight
    clock, tolerance = _simulated_seconds(run)
    spans = _raw_spans(run)
    expected = {}
    for event, attribute in (("preempted", "vllm.request.preemptions"),
                             ("failed allocation", "vllm.kv_cache.allocation.failures")):
        groups: dict[tuple[str, bool], list[tuple[float, float]]] = {}
        for s in spans:
            if s["vllm.request.finish_status"] not in COMPLETE or not s["gen_ai.usage.output_tokens"]:
                continue
            duration = clock(s["end"]) - clock(s["start"])
            key = (_prompt_class(s["gen_ai.usage.input_tokens"]), s[attribute] > 0)
            groups.setdefault(key, []).append((duration / s["gen_ai.usage.output_tokens"], duration))
        for prompt in {p for p, _ in groups}:
            expected[(prompt, event)] = (groups.get((prompt, True), []), groups.get((prompt, False), []))
    # not vacuous: both events, with and without, in more than one class
    both = [key for key, (met, spared) in expected.items() if met and spared]
    assert {event for _, event in both} == {"preempted", "failed allocation"} and len({p for p, _ in both}) >= 2
    with open(out / "request_latency.csv", newline="") as fh:
        rows = {(r["prompt_class"], r["event"]): r for r in csv.DictReader(fh)}
    assert set(rows) == set(expected)
    for key, (met, spared) in expected.items():
        row = rows[key]
        assert (int(row["with_requests"]), int(row["without_requests"])) == (len(met), len(spared)), key
        for side, group in (("with", met), ("without", spared)):
            for index, what in ((0, "per_token"), (1, "duration")):
                for q in (50, 90):
                    cell = row[f"{side}_{what}_p{q}_s"]
                    if not group:
                        assert cell == "", (key, side)
                        continue
                    assert float(cell) == pytest.approx(_percentile([g[index] for g in group], q), rel=1e-9,
                                                        abs=tolerance), key
        # the summary's row: counts, medians per token and their ratio
        # (the CSV's numbers, just checked, as printed: a recount differs in the last bits)
        line = next(x for x in printed.splitlines() if x.startswith(f"  {key[0]:<15}{key[1]:<19}"))
        assert f"{len(met)} / {len(spared)}" in line
        if met and spared:
            p50 = float(row["with_per_token_p50_s"]), float(row["without_per_token_p50_s"])
            assert f"{p50[0]:.4g} / {p50[1]:.4g} (x{p50[0] / p50[1]:.2f})" in line, line
            assert p50[0] / p50[1] == pytest.approx(_percentile([g[0] for g in met], 50)
                                                     / _percentile([g[0] for g in spared], 50), rel=1e-3)
    assert "Latency and KV-cache events (from the request spans: 60 of 60 requests complete)" in printed


def test_the_workload_of_a_run_under_pressure_keeps_every_request(tight):
    """Queued, preempted and failing requests are all in the workload, in the order vLLM
    first looked them up; a request's arrival is the step it was sent in."""
    run, out, _ = tight
    lines = _lines(out / "workload.jsonl")
    spans = _raw_spans(run)
    assert [(line["prompt_len"], line["output_len"]) for line in lines] == \
        [(s["gen_ai.usage.input_tokens"], s["gen_ai.usage.output_tokens"]) for s in spans]
    specs = workloads.generate("uniform", 60, seed=5)
    assert sorted((len(s.prompt_tokens), s.output_len) for s in specs) == \
        sorted((line["prompt_len"], line["output_len"]) for line in lines)
    # all 60 were sent before the first step; many waited for blocks, and their first lookups
    # came steps later: the arrival is when they were sent, not when vLLM got to them
    assert {line["arrival_time"] for line in lines} == {0.0}
    assert spans[-1]["start"] - spans[0]["start"] > 1e6


# -- requests that never finished -----------------------------------------------------------


def test_aborted_and_unfinished_requests(tmp_path):
    """A request aborted before its first token is left out of the workload and counted;
    aborted and engine-stopped ones with output stay, with the output they had, and are
    counted; the latency rows leave out every request that did not finish."""
    from vllm_frag_otel.analysis import replay
    from vllm_frag_otel.analysis.otlp_read import RequestSpan
    from vllm_frag_otel.analysis.report import Clock

    def span(n: int, status: str, output: int | None, start_s: float, end_s: float, preemptions: int = 0):
        return RequestSpan(instance="i", request_id=f"r{n}", prompt_tokens=100 + n, output_tokens=output,
                           hit_tokens=0 if n % 2 else 32, peak_blocks=0, allocated_slots=0, unused_slots=0,
                           preemptions=preemptions, allocation_failures=0, finish_status=status, groups=1,
                           released_blocks=0, resumed_hit_tokens=0, start_ns=int(start_s * 1e9),
                           end_ns=int(end_s * 1e9))

    spans = [span(0, "finished_length_capped", 10, 5.0, 6.0), span(1, "finished_aborted", 0, 5.5, 5.6),
             span(2, "finished_aborted", 4, 5.25, 9.0, preemptions=1), span(3, "engine_stopped", 7, 6.0, 8.0),
             span(4, "finished_stopped", 20, 7.0, 9.0, preemptions=1), span(5, "finished_length_capped", None, 8, 9)]
    found = replay.workload(spans, Clock(0))
    assert (len(found.lines), found.skipped, found.partial, found.step_seconds) == (4, 2, 2, None)
    assert [(line.arrival_time, line.prompt_len, line.output_len, line.prefix_len) for line in found.lines] == \
        [(0.0, 100, 10, 32), (0.25, 102, 4, 32), (1.0, 103, 7, None), (2.0, 104, 20, 32)]
    path = replay.write_workload(found, tmp_path / "workload.jsonl")
    assert [len(s.prompt_tokens) for s in workloads.load_trace(path, [])] == [100, 102, 103, 104]
    text = "\n".join(replay.workload_text(found, untraced=3))
    assert "left out: 2 request span(s) without an output token" in text
    assert "2 aborted or engine-stopped request(s) are in it" in text and "3 request(s) had no span" in text
    (class_row,) = [r for r in replay.latency_rows(spans, Clock(0)) if r.event == "preempted"]
    assert (class_row.met.requests, class_row.spared.requests) == (1, 1)  # spans 4 and 0: complete only
    assert class_row.met.per_token[0] == pytest.approx(2.0 / 20) and class_row.spared.duration[0] == pytest.approx(1)


# -- the workload from hand-made spans: arrivals and the prefix estimate --------------------------


def _span(n: int, start_ns: int, hits: int = 0, resumed_hits: int = 0, preemptions: int = 0):
    from vllm_frag_otel.analysis.otlp_read import RequestSpan

    return RequestSpan(instance="i", request_id=f"r{n}", prompt_tokens=200 + n, output_tokens=5 + n,
                       hit_tokens=hits, peak_blocks=0, allocated_slots=0, unused_slots=0,
                       preemptions=preemptions, allocation_failures=0, finish_status="finished_stopped", groups=1,
                       released_blocks=0, resumed_hit_tokens=resumed_hits, start_ns=start_ns,
                       end_ns=start_ns + 10**9)


def test_arrivals_count_from_the_first_requests_step_not_from_step_0(tmp_path):
    """A real server (or a simulator run's traffic) rarely sends its first request at step 0.
    Arrivals are measured from the step of the first lookup: the first request arrives at 0.0
    and every other one as many steps later as the clock file says, exactly (a replay puts each
    request back in its own step: `floor(arrival / step_seconds)`). Every run of the round trip
    above starts at step 0, so it cannot tell "since the first request" from "since step 0"; here
    the first lookup is at step 10, and later ones at offsets 0..29 (29 steps of 0.02 s: 0.58 s,
    where floating point puts a subtraction of two step starts one step early)."""
    from vllm_frag_otel.analysis import replay
    from vllm_frag_otel.analysis.report import Clock
    from vllm_frag_otel.sim import simclock

    step_s, base = 0.02, 1_700_000_000_000_000_000
    # the clock file: one line after each of 60 steps, 1 ms of wall-clock time per step
    wall = np.array([base + (k + 1) * 1_000_000 for k in range(60)], dtype=np.int64)
    steps = simclock.StepClock(tmp_path / "clock-1-1.csv", "h", "1", step_s, wall,
                               np.array([(k + 1) * step_s for k in range(60)]))
    # (step of the first lookup, request): the example's three, then one request per step 10..39
    arrivals = [(10, 0), (12, 1), (15, 2)] + [(10 + offset, 3 + offset) for offset in range(30)]
    spans = [_span(n, int(wall[step - 1]) + 400_000) for step, n in arrivals]  # inside step `step`
    found = replay.workload(spans[::-1], Clock(base, steps))  # any input order: sorted by arrival
    assert found.step_seconds == step_s and not found.skipped
    by_request = {line.request_id: line.arrival_time for line in found.lines}
    assert [by_request[f"r{n}"] for n in (0, 1, 2)] == [0.0, 0.04, 0.1]
    for step, n in arrivals:
        assert math.floor(by_request[f"r{n}"] / step_s) == step - 10, (step, by_request[f"r{n}"])
        assert by_request[f"r{n}"] == pytest.approx((step - 10) * step_s, abs=1e-8)
    # and through the file, as simulate reads it
    path = replay.write_workload(found, tmp_path / "workload.jsonl")
    replayed = workloads.load_trace(path, [])
    assert workloads.arrival_steps(replayed, step_s).tolist() == sorted(step - 10 for step, _ in arrivals)


def _otlp_span(n: int, start_ns: int, hits: int, resumed_hits: list[int]) -> dict:
    """A request span as the plugin's OTLP/JSON file exporter writes it: hits at the first
    admission as attributes, each re-admission after a preemption as a "resumed" event."""
    def attribute(key: str, value) -> dict:
        return {"key": key, "value": {"intValue": str(value)} if isinstance(value, int) else {"stringValue": value}}

    attributes = [attribute("vllm.request.id", f"r{n}"), attribute("gen_ai.usage.input_tokens", 300 + n),
                  attribute("gen_ai.usage.output_tokens", 7), attribute("vllm.kv_cache.prefix_cache.hit_tokens", hits),
                  attribute("gen_ai.usage.cache_read.input_tokens", hits),
                  attribute("vllm.request.preemptions", len(resumed_hits)),
                  attribute("vllm.request.finish_status", "finished_length_capped")]
    events = []
    for i, resumed in enumerate(resumed_hits):
        events.append({"name": "preempted", "timeUnixNano": str(start_ns + 10 * i + 1),
                       "attributes": [attribute("vllm.kv_cache.block.released", 5)]})
        events.append({"name": "resumed", "timeUnixNano": str(start_ns + 10 * i + 2),
                       "attributes": [attribute("vllm.kv_cache.prefix_cache.hit_tokens", resumed)]})
    return {"traceId": f"{n + 1:032x}", "spanId": f"{n + 1:016x}", "name": "vllm.kv_cache.request",
            "startTimeUnixNano": str(start_ns), "endTimeUnixNano": str(start_ns + 10**9),
            "attributes": attributes, "events": events}


def test_the_prefix_estimate_is_the_first_admissions_hits_not_the_resumptions(tmp_path):
    """`prefix_len` says how much of a request's prompt an earlier request had cached when it
    arrived. A preempted request hits its own blocks when it is re-admitted (whatever survived
    of them in the prefix cache): those hits say nothing about sharing with other requests, and
    counted in they would make a replay share prefixes the traffic never shared (a request that
    shared nothing would get a prefix group). From the raw span lines, through the reader."""
    from vllm_frag_otel.analysis import otlp_read, replay
    from vllm_frag_otel.analysis.report import Clock

    base = 1_700_000_000_000_000_000
    # (first-admission hits, hits at each re-admission)
    stories = [(0, [256, 112]), (64, [320]), (0, []), (32, [0, 48]), (0, [16])]
    spans = [_otlp_span(n, base + n * 10**8, hits, resumed) for n, (hits, resumed) in enumerate(stories)]
    record = {"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.instance.id", "value": {"stringValue": "a"}}]},
        "scopeSpans": [{"scope": {"name": "vllm_frag_otel"}, "spans": spans}]}]}
    path = tmp_path / "traces-1.jsonl"
    path.write_text(json.dumps(record) + "\n")
    telemetry = otlp_read.read([path])
    assert telemetry.problems == []
    read = {s.request_id: s for s in telemetry.spans}
    for n, (hits, resumed) in enumerate(stories):
        assert (read[f"r{n}"].hit_tokens, read[f"r{n}"].resumed_hit_tokens) == (hits, sum(resumed))
    found = replay.workload(telemetry.spans, Clock(base))
    assert [(line.request_id, line.prefix_len) for line in found.lines] == [
        (f"r{n}", hits or None) for n, (hits, _) in enumerate(stories)]
    replay.write_workload(found, tmp_path / "workload.jsonl")
    lines = _lines(tmp_path / "workload.jsonl")
    assert [line.get("prefix_len") for line in lines] == [None, 64, None, 32, None]
    assert [line.get("prefix_group") for line in lines] == [None, "shared", None, "shared", None]
    assert found.with_prefix == 2


# -- 3. a replay reproduces the run it came from ---------------------------------------------

PRESSURED_ARRIVALS = ["--num-blocks", "120", "--max-num-seqs", "12", "--seed", "5", "--block-map-every", "0"]


def _mean_latency(printed: str) -> float:
    return float(re.search(r"mean request latency ([0-9.]+) s \(simulated\)", printed).group(1))


def test_a_replay_reproduces_the_mean_latency_of_the_run_it_came_from(tmp_path):
    """Requests arriving faster than the pool serves them queue for blocks: their first
    lookups come long after they were sent. The workload file keeps when they were sent
    (the spans' vllm.request.arrival_time), so replaying it queues them again: the same
    mean latency (arrival to last token) within 5%. Arrivals taken from the first lookups
    would queue nothing: the replay's latency would be a fraction of the original's."""
    run = tmp_path / "run"
    original = _mean_latency(_simulate(run, "--workload", "uniform", "--num-requests", "60", "--arrival-rate", "30",
                                       *PRESSURED_ARRIVALS).stdout)
    _report(run, tmp_path / "report")
    written = tmp_path / "report" / "workload.jsonl"
    # the steps the requests were sent in, from the arrival process itself
    sent = workloads.with_poisson_arrivals(workloads.generate("uniform", 60, seed=5), 30, seed=5)
    sent_steps = np.floor(np.array([s.arrival_s for s in sent]) / STEP)
    assert sorted(np.round(np.array([line["arrival_time"] for line in _lines(written)]) / STEP)) == \
        sorted(sent_steps - sent_steps.min())
    clock, _ = _simulated_seconds(run)
    queued = [clock(s["start"]) - clock(s["vllm.request.arrival_time"] * 1e9) for s in _raw_spans(run)]
    assert np.mean(queued) > 0.3 * original  # not vacuous: queueing is much of the latency
    replayed = _mean_latency(_simulate(tmp_path / "again", "--workload-file", str(written),
                                       *PRESSURED_ARRIVALS).stdout)
    assert replayed == pytest.approx(original, rel=0.05)

"""End to end, with real processes on loopback: a real vLLM engine doing real inference on the
CPU with the plugin loaded by its entry point and vLLM's own tracing on; a real OpenTelemetry
Collector running collector-config.yaml; VictoriaMetrics answering PromQL; vmalert evaluating
the shipped alert rules; Phoenix storing the spans.

What is proved: every PromQL expression of the dashboard and of the rule file parses (Prometheus'
own parser, promtool) and returns data; the rules evaluate without error and the alerts that
the workload should raise are raised, the others not; the plugin's request span and vLLM's
llm_request span of a request sent with a traceparent header are in the same trace; allocation
latency exemplars point at those traces; the collector accepted its configuration.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from datetime import datetime

import numpy as np
import pytest

import e2e_harness as h
from e2e_harness import BLOCK_MAP_INTERVAL_S, MAX_TOKENS, MODEL_NAME, NUM_REQUESTS
from vllm_frag_otel.core.layout import CACHED, EMPTY, EVENT_NAME, FULL, PARTIAL, BlockMap

pytestmark = pytest.mark.e2e

# What Grafana would put for $__rate_interval (4 x the 3 s export interval, rounded up) and for
# $__range (a range covering the whole run) in the checks.
RATE_INTERVAL = "30s"
TIME_RANGE = "10m"
STEP = 5


def _values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result]


def _total(q: h.PromQL, expr: str) -> float:
    result = q.query(expr)
    return sum(_values(result)) if result else 0.0


# -- the engine and the plugin ------------------------------------------------------------

def test_plugin_loaded_and_healthy(stack, arrived):
    log = arrived.server.log_text()
    assert "vllm-frag-otel: not instrumenting" not in log, [l for l in log.splitlines() if "vllm-frag-otel" in l]
    assert "disabled after" not in log
    q = stack.promql
    active = q.query("vllm_frag_otel_active")
    assert active and _values(active) == [1.0] * len(active), active
    assert _total(q, "vllm_frag_otel_hook_errors_total") == 0
    (series,) = q.query("vllm_kv_cache_block_limit")
    labels = series["metric"]
    # the resource attributes that tell replicas, ranks and models apart arrive as labels
    assert labels["model_name"] == MODEL_NAME
    assert labels["engine"] == "0"
    assert labels["service_name"] == "vllm"
    assert labels["service_instance_id"] and labels["host_name"]
    assert float(series["value"][1]) == 63  # 64 blocks, minus vLLM's null block


def test_workload_exercised_the_cache(stack, arrived):
    """The run is only a proof if the interesting paths happened."""
    q = stack.promql
    facts = {
        "requests": len(arrived.requests),
        "preemptions": _total(q, "vllm_kv_cache_preemptions_total"),
        "failed allocations": _total(q, 'vllm_kv_cache_allocation_attempts_total{vllm_kv_cache_allocation_outcome="failure"}'),
        "allocations": _total(q, "vllm_kv_cache_allocation_attempts_total"),
        "prefix-hit tokens": _total(q, "vllm_kv_cache_prefix_cache_hit_total"),
        "looked-up tokens": _total(q, "vllm_kv_cache_prefix_cache_queried_total"),
        "evictions": _total(q, "vllm_kv_cache_block_evictions_total"),
        "evicted never reused": _total(q, 'vllm_kv_cache_block_evictions_total{vllm_kv_cache_block_reused="false"}'),
        "series per engine": _total(q, 'count({__name__=~"vllm_.+|otel_.+", service_instance_id!=""})'),
    }
    h.TIMINGS.facts.update(facts)
    assert len(arrived.requests) == NUM_REQUESTS
    assert all(r.response["usage"]["completion_tokens"] == MAX_TOKENS for r in arrived.requests)
    assert _total(q, "vllm_kv_cache_preemptions_total") > 0
    assert _total(q, 'vllm_kv_cache_allocation_attempts_total{vllm_kv_cache_allocation_outcome="failure"}') > 0
    assert _total(q, 'vllm_kv_cache_prefix_cache_hit_total{vllm_request_resumed="false"}') > 0
    assert _total(q, "vllm_kv_cache_block_evictions_total") > 0
    assert _total(q, 'vllm_kv_cache_block_allocations_total{vllm_kv_cache_block_source="prefix_hit"}') > 0


# -- the collector -------------------------------------------------------------------------

def test_collector_accepted_the_config(stack, arrived):
    proc = subprocess.run([str(h.OTELCOL), "validate", f"--config={h.COLLECTOR_CONFIG}"],
                          env={**stack.collector_env(), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = stack.procs["otelcol"].log_text()
    assert "Everything is ready. Begin running and processing data." in log
    errors = [line for line in log.splitlines() if re.match(r"^\S+\s+(error|fatal|panic)\s", line)]
    assert not errors, "\n".join(errors[:20])
    # defaults hold when nothing is overridden (deploy/compose.yaml relies on them)
    proc = subprocess.run([str(h.OTELCOL), "validate", f"--config={h.COLLECTOR_CONFIG}"],
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- metric names, the dashboard, the rules ------------------------------------------------

def _referenced_metrics(exprs: list[str], label_names: set[str]) -> set[str]:
    tokens = set()
    for expr in exprs:
        expr = re.sub(r'"[^"]*"', '""', expr)
        tokens |= set(re.findall(r"\b((?:vllm|otel)_[a-z0-9_:]+)", expr))
    recorded = {r["record"] for r in h.load_rules() if "record" in r}
    return tokens - label_names - recorded


def test_metric_names_match_what_arrives(stack, arrived):
    q = stack.promql
    names = q.metric_names()
    label_names = set(h.http_json(q.base + "/api/v1/labels")["data"])
    dashboard = json.loads(h.DASHBOARD.read_text())
    exprs = [e for _, e, _ in h.dashboard_queries(dashboard)] + [r["expr"] for r in h.load_rules()]
    missing = sorted(_referenced_metrics(exprs, label_names) - names)
    assert not missing, f"referenced but never arrived: {missing}\narrived: {sorted(names)}"
    expected = {
        "vllm_kv_cache_blocks", "vllm_kv_cache_block_limit", "vllm_kv_cache_free_runs",
        "vllm_kv_cache_free_run_largest", "vllm_kv_cache_fragmentation_external_ratio",
        "vllm_kv_cache_slots", "vllm_kv_cache_partial_blocks",
        "vllm_kv_cache_fragmentation_internal_ratio", "vllm_kv_cache_slot_utilization_ratio",
        "vllm_kv_cache_requests", "vllm_kv_cache_prefix_cache_queried_total",
        "vllm_kv_cache_prefix_cache_hit_total", "vllm_kv_cache_block_evictions_total",
        "vllm_kv_cache_block_allocations_total", "vllm_kv_cache_allocation_attempts_total",
        "vllm_kv_cache_preemptions_total", "vllm_kv_cache_allocation_duration_seconds_bucket",
        "vllm_kv_cache_block_cache_duration_seconds_bucket", "vllm_kv_cache_block_idle_duration_seconds_bucket",
        "vllm_frag_otel_active", "vllm_frag_otel_hook_errors_total",
        "vllm_frag_otel_measurements_dropped_total", "vllm_frag_otel_requests_untraced_total",
    }
    assert expected <= names, sorted(expected - names)


REGIONS = 8  # VLLM_FRAG_OTEL_REGIONS in conftest._vllm_env


def test_region_metric_is_bounded_and_adds_up_to_the_pool(stack, arrived):
    """vllm.kv_cache.region.blocks: R x 5 series per engine, no more; each region's states
    add up to its share of the pool and, the engine idle after the workload, the per-state
    totals equal those of vllm.kv_cache.blocks."""
    from vllm_frag_otel.core.layout import BLOCK_STATES

    q = stack.promql
    series = q.query("vllm_kv_cache_region_blocks")
    limits = {s["metric"]["service_instance_id"]: int(float(s["value"][1])) for s in q.query("vllm_kv_cache_block_limit")}
    assert series and limits
    by_engine: dict[str, dict[tuple[int, str], float]] = {}
    for s in series:
        m = s["metric"]
        key = (int(m["vllm_kv_cache_region"]), m["vllm_kv_cache_block_state"])
        points = by_engine.setdefault(m["service_instance_id"], {})
        assert key not in points, m
        points[key] = float(s["value"][1])
    assert by_engine.keys() == limits.keys()
    for engine, points in by_engine.items():
        n, regions = limits[engine], min(REGIONS, limits[engine])
        assert set(points) == {(r, state) for r in range(regions) for state in BLOCK_STATES}
        sizes = [sum(points[(r, state)] for state in BLOCK_STATES) for r in range(regions)]
        assert sizes == [(r + 1) * n // regions - r * n // regions for r in range(regions)], sizes
        totals = {s["metric"]["vllm_kv_cache_block_state"]: float(s["value"][1]) for s in
                  q.query(f'vllm_kv_cache_blocks{{service_instance_id="{engine}"}}')}
        by_state = {state: sum(v for (_, st), v in points.items() if st == state) for state in BLOCK_STATES}
        assert (by_state["empty"], by_state["cached"]) == (totals["empty"], totals["cached"]), (by_state, totals)
        assert by_state["full"] + by_state["partial"] + by_state["reserved"] == totals["used"], (by_state, totals)


def _promtool_parses(exprs: dict[str, str], tmp_path) -> None:
    """Prometheus' own PromQL parser (promtool 2.42) on each expression."""
    import yaml

    rules = {"groups": [{"name": "parse-check", "rules": [
        {"record": f"check:{i}", "expr": expr} for i, expr in enumerate(exprs.values())]}]}
    path = tmp_path / "parse-check.rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    proc = subprocess.run([str(h.PROMTOOL), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_queries_parse_and_return_data(stack, arrived, tmp_path):
    """As Grafana asks: range queries over the run for graphs, instant queries for stats."""
    dashboard = json.loads(h.DASHBOARD.read_text())
    queries = h.dashboard_queries(dashboard)
    assert len(queries) >= 30
    exprs = {f"{title} #{i}": h.substitute_grafana_variables(expr, RATE_INTERVAL, TIME_RANGE)
             for i, (title, expr, _) in enumerate(queries)}
    _promtool_parses(exprs, tmp_path)
    q = stack.promql
    start, end = arrived.started - 10, time.time()
    empty = {}
    for (name, expr), (_, _, instant) in zip(exprs.items(), queries):
        if instant:
            values = _values(q.query(expr))
        else:
            values = [float(v) for series in q.query_range(expr, start, end, STEP) for _, v in series["values"]]
        if not values or all(math.isnan(v) for v in values):
            empty[name] = expr
    assert not empty, "queries without data:\n" + "\n".join(f"  {k}: {v}" for k, v in empty.items())
    # the variables: label_values(metric, label)
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
        assert m, var["query"]
        match = h.substitute_grafana_variables(m.group(1), RATE_INTERVAL, TIME_RANGE)
        assert q.label_values(m.group(2), match), f"variable {var['name']} has no values"


def _vmalert_rules(stack) -> list[dict]:
    groups = h.http_json(stack.vmalert + "/api/v1/rules")["data"]["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_rules_parse_evaluate_and_return_data(stack, arrived, tmp_path):
    rules = h.load_rules()
    _promtool_parses({r.get("record") or r["alert"]: r["expr"] for r in rules}, tmp_path)
    q = stack.promql
    records = [r["record"] for r in rules if "record" in r]

    # vmalert evaluates every rule of the file on data from after the workload; recorded series
    # land in VictoriaMetrics
    def evaluated_after_workload():
        vm_rules = _vmalert_rules(stack)
        if len(vm_rules) != len(rules):
            return False
        for rule in vm_rules:
            detail = h.http_json(stack.vmalert + "/api/v1/rule", {"group_id": rule["group_id"], "rule_id": rule["id"]})
            updates = detail.get("updates") or []
            if not updates or _rfc3339(updates[0]["at"]) < arrived.finished + 1:
                return False
        return all(q.query(name) for name in records)

    h.wait_until("vmalert to evaluate every rule on data from after the workload, and the recorded series",
                 evaluated_after_workload, 150, interval=2, proc=stack.procs["vmalert"])
    unhealthy = [(r["name"], r.get("lastError")) for r in _vmalert_rules(stack)
                 if r["health"] != "ok" or r.get("lastError")]
    assert not unhealthy, unhealthy

    # each threshold's signal returns data; every poll with filters never used before (a series
    # created while a filter was first used can stay unseen by it: see Stack.unique_filter)
    names = q.metric_names()
    signals = [(rule.get("record") or rule["alert"], part) for rule in rules
               for part in ([rule["expr"]] if "record" in rule else h.split_top_level(rule["expr"]))]
    deadline = time.monotonic() + 60
    while True:
        empty = [(name, part) for name, part in signals if not q.query(_fresh_filters(part, names, stack))]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not empty, "rule signals without data:\n" + "\n".join(f"  {n}: {e}" for n, e in empty)


def _fresh_filters(expr: str, names: set[str], stack) -> str:
    """`expr` with a filter never used before added to the selector of every known metric in it."""
    pattern = re.compile(r"(?<![\w:])(%s)(?![\w:])(\{)?" % "|".join(
        re.escape(n) for n in sorted(names, key=len, reverse=True)))
    return pattern.sub(lambda m: f"{m.group(1)}{{{stack.unique_filter()}" + (", " if m.group(2) else "}"), expr)


def _rfc3339(stamp: str) -> float:
    from datetime import datetime

    stamp = re.sub(r"(\.\d{6})\d*", r"\1", stamp).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def test_alerts_fire_as_the_workload_says(stack, arrived):
    """Preempting sequences from a 63-block cache, and evicting blocks no request comes back
    for, is what VLLMKVCachePreemptions and VLLMKVCacheThrash are for; a healthy plugin on a
    reporting engine must not raise the plugin alerts."""
    # the thrash alert fires above 90% never-reused evictions; this workload lands at 90-93%,
    # so it is expected only when the data that arrived is clearly past the threshold
    share = stack.promql.query(
        'sum(vllm_kv_cache_block_evictions_total{vllm_kv_cache_block_reused="false"})'
        " / sum(vllm_kv_cache_block_evictions_total)"
    )
    thrashing = bool(share) and float(share[0]["value"][1]) > 0.93
    expected = ("VLLMKVCachePreemptions", "VLLMKVCacheThrash") if thrashing else ("VLLMKVCachePreemptions",)

    def active_alerts():
        alerts = {a["name"]: a["state"] for a in h.http_json(stack.vmalert + "/api/v1/alerts")["data"]["alerts"]}
        return alerts if all(name in alerts for name in expected) else None

    alerts = h.wait_until(f"{' and '.join(expected)} to be pending or firing in vmalert", active_alerts,
                          300, interval=2, proc=stack.procs["vmalert"])
    for name in expected:
        assert alerts[name] in ("pending", "firing"), alerts
    for quiet in ("VLLMFragOtelHookErrors", "VLLMFragOtelDisabled", "VLLMFragOtelTelemetryAbsent"):
        assert quiet not in alerts, alerts


# -- traces --------------------------------------------------------------------------------

def _phoenix_spans(stack) -> list[dict]:
    spans, cursor = [], None
    while True:
        params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = h.http_json(stack.phoenix + "/v1/projects/default/spans", params)
        spans += page["data"]
        cursor = page.get("next_cursor")
        if not cursor:
            return spans


def _spans_by_trace(stack) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for span in _phoenix_spans(stack):
        out.setdefault(span["context"]["trace_id"], {})[span["name"]] = span
    return out


def test_plugin_span_and_vllm_span_share_the_trace(stack, arrived):
    sent = {r.trace_id: r for r in arrived.requests}

    def all_joined():
        traces = _spans_by_trace(stack)
        return traces if all({"llm_request", "vllm.kv_cache.request"} <= traces.get(t, {}).keys() for t in sent) else None

    traces = h.wait_until("both spans of every request in Phoenix", all_joined, 120, interval=2)
    for trace_id, request in sent.items():
        vllm_span, kv_span = traces[trace_id]["llm_request"], traces[trace_id]["vllm.kv_cache.request"]
        # both are children of the client's span (the traceparent header)
        assert vllm_span["parent_id"] == request.parent_span_id
        assert kv_span["parent_id"] == request.parent_span_id
        assert kv_span["attributes"]["gen_ai.request.id"] == vllm_span["attributes"]["gen_ai.request.id"]
        assert kv_span["attributes"]["gen_ai.usage.input_tokens"] == request.prompt_tokens
        # vLLM starts its llm_request span at the request's arrival: the plugin's span says the same arrival
        vllm_start = datetime.fromisoformat(vllm_span["start_time"]).timestamp()
        assert kv_span["attributes"]["vllm.request.arrival_time"] == pytest.approx(vllm_start, abs=1e-3)
        assert kv_span["attributes"]["gen_ai.usage.output_tokens"] == MAX_TOKENS
        assert kv_span["attributes"]["gen_ai.usage.cache_read.input_tokens"] == \
            kv_span["attributes"]["vllm.kv_cache.prefix_cache.hit_tokens"]
        assert kv_span["attributes"]["vllm.request.finish_status"] == "finished_length_capped"
    kv = [traces[t]["vllm.kv_cache.request"]["attributes"] for t in sent]
    assert any(a["vllm.request.preemptions"] > 0 for a in kv), "no span tells of a preemption"
    assert any(a["gen_ai.usage.cache_read.input_tokens"] > 0 for a in kv), "no span tells of a prefix hit"
    assert any(a["vllm.kv_cache.block.evicted"] > 0 for a in kv), "no span tells of an eviction it caused"


# -- block-layout maps ------------------------------------------------------------------------

def test_block_maps_reach_the_logs_back_end(stack, arrived):
    """VLLM_FRAG_OTEL_BLOCK_MAP_INTERVAL=1 on the engine: its maps go through the collector's logs
    pipeline to the logs back-end, one a second, each a whole, well-formed map of the pool."""
    records = h.wait_until(
        "block maps from after the workload at the logs back-end",
        lambda: [r for r in stack.logs_backend.received_logs() if r["time_unix_nano"] > arrived.finished * 1e9] and
        stack.logs_backend.received_logs(), 60, interval=1)
    maps = sorted((BlockMap.decode(r["body"], {k: str(v) for k, v in r["attributes"].items()}, r["time_unix_nano"])
                   for r in records if r["event_name"] == EVENT_NAME), key=lambda m: m.time_unix_nano)
    assert {r["resource"]["service.name"] for r in records} == {"vllm"}
    assert {r["attributes"]["model_name"] for r in records} == {MODEL_NAME}
    (series,) = stack.promql.query("vllm_kv_cache_block_limit")  # the same engine as the metrics
    assert {r["resource"]["service.instance.id"] for r in records} == {series["metric"]["service_instance_id"]}
    assert all(m.num_blocks == 63 and m.bin_size == 1 for m in maps)  # 64 blocks, minus the null block
    during = [m for m in maps if arrived.started * 1e9 <= m.time_unix_nano <= arrived.finished * 1e9]
    seconds = arrived.finished - arrived.started
    assert len(during) >= int(seconds / BLOCK_MAP_INTERVAL_S) - 1, (len(during), seconds)
    gaps = np.diff([m.time_unix_nano for m in maps]) / 1e9
    assert np.median(gaps) == pytest.approx(BLOCK_MAP_INTERVAL_S, rel=0.2)
    held = [m.counts[[FULL, PARTIAL]].sum() for m in during]
    assert max(held) > 32, "no map caught the pool in use"  # the workload fills it (it preempts)
    # after the workload every block is unheld again, most holding prefix-cache content
    assert maps[-1].counts[[EMPTY, CACHED]].sum() == 63 and maps[-1].counts[CACHED].sum() > 0


def test_allocation_exemplars_point_at_request_traces(stack, arrived):
    """Exemplars on vllm.kv_cache.allocation.duration reach the collector (which forwards them to
    the PromQL back-end) carrying the trace id of a request sent with a traceparent header."""
    sent = {r.trace_id for r in arrived.requests}
    log = stack.procs["otelcol"].log_text()
    found = set()
    for block in log.split("Descriptor:")[1:]:
        if "-> Name: vllm.kv_cache.allocation.duration" not in block:
            continue
        found |= set(re.findall(r"-> Trace ID: ([0-9a-f]{32})", block))
    assert found, "no exemplar with a trace id on vllm.kv_cache.allocation.duration in the collector's debug output"
    assert found <= sent, sorted(found - sent)[:5]


# -- last: the engine goes away ------------------------------------------------------------

def test_absence_of_a_reporting_engine_is_noticed(stack, arrived):
    """Stop vLLM: the absence alert's expression must name the replica that stopped reporting."""
    rule = next(r for r in h.load_rules() if r.get("alert") == "VLLMFragOtelTelemetryAbsent")
    q = stack.promql
    assert not q.query(rule["expr"]), "absence reported while the engine runs"
    with h.TIMINGS.stage("absence detection after engine stop"):
        arrived.server.stop()
        result = h.wait_until("VLLMFragOtelTelemetryAbsent's expression to name the stopped replica",
                              lambda: q.query(rule["expr"]), 420, interval=5)
    (series,) = result
    assert series["metric"]["model_name"] == MODEL_NAME
    assert series["metric"]["engine"] == "0"

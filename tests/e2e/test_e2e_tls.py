"""TLS between the plugin and the real OpenTelemetry Collector, over OTLP/gRPC and OTLP/HTTP.

    vllm-frag-otel simulate (vLLM's scheduler, plugin by entry point, the SDK's OTLP exporters)
        │  https://127.0.0.1:PORT, OTEL_EXPORTER_OTLP_CERTIFICATE [+ _CLIENT_CERTIFICATE, _CLIENT_KEY]
        ▼
    otelcol (core) running deploy/otel-collector/collector-config.yaml + tls.yaml [+ mtls.yaml]
        │  its own exporters, plaintext on loopback
        ▼
    rotel (a real OTLP receiver) ──▶ the points and spans read here

A CA, a server certificate for 127.0.0.1/localhost, a client certificate and a second,
unrelated CA are made with the openssl CLI. One collector serves TLS, one requires client
certificates (mutual TLS); each `simulate` run tags its resource with its own `tls.test.run`,
so that what a run delivered is told apart downstream. What arrives is compared with the run's
own summary.json (the simulator's record of the scheduler, not the telemetry path); the
collector's own counters of accepted points and spans must equal what the delivering runs sent,
so the refused runs delivered nothing at all. The refused runs must end like a run without
export (exit 0, the same scheduling), in bounded time, saying so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import certifi
import pytest

import e2e_harness as h
from otlp_receiver import RotelReceiver

pytestmark = pytest.mark.e2e

OTEL_DIR = h.REPO / "deploy" / "otel-collector"
COLLECTOR = OTEL_DIR / "collector-config.yaml"
TLS_OVERLAY = OTEL_DIR / "tls.yaml"
MTLS_OVERLAY = OTEL_DIR / "mtls.yaml"
PROTOCOLS = ("grpc", "http/protobuf")
NUM_REQUESTS = 40
SIMULATE = ["--num-requests", str(NUM_REQUESTS), "--num-blocks", "160", "--max-num-seqs", "16", "--seed", "7"]
RUN = "tls.test.run"  # the resource attribute naming the run a point or span came from


# A refused run takes a few seconds longer than the run without export (the plugin's stop waits out
# VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT, 3 s, inside simulate's 5 s final flush; a stop past that makes
# simulate say "did not finish within", also checked). Its wall time is checked loosely, as the runs
# share two cores with each other (and CI with anything else); exports that held the scheduler's
# steps (the SDK retries each one for up to 10 s) would exceed it many times over.
def _refused_time_limit(baseline_seconds: float) -> float:
    return 1.5 * baseline_seconds + 15


# -- certificates ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Certificates:
    ca: Path  # signs the server and client certificates
    other_ca: Path  # unrelated: trusting it means not trusting the collector
    server: Path
    server_key: Path
    client: Path
    client_key: Path


def _openssl(*args: str | Path) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _ca(directory: Path, name: str) -> Path:
    cert = directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", directory / f"{name}-key.pem", "-out", cert, "-days", "1",
             "-subj", f"/CN=vllm-frag-otel test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert


def _leaf(directory: Path, name: str, ca: Path, extensions: str) -> tuple[Path, Path]:
    cert, key, csr, ext = (directory / f"{name}{suffix}" for suffix in (".pem", "-key.pem", ".csr", ".ext"))
    ext.write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key,
             "-out", csr, "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca.with_name(ca.stem + "-key.pem"), "-CAcreateserial",
             "-out", cert, "-days", "1", "-extfile", ext)
    return cert, key


def make_certificates(directory: Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca, other_ca = _ca(directory, "ca"), _ca(directory, "other-ca")
    server, server_key = _leaf(directory, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                               "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    client, client_key = _leaf(directory, "client", ca, "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
    return Certificates(ca, other_ca, server, server_key, client, client_key)


# -- the collectors --------------------------------------------------------------------------

class TLSCollector:
    """The real collector running deploy's configuration with the TLS overlay(s), on free
    loopback ports, forwarding everything in plaintext to `downstream`."""

    def __init__(self, name: str, overlays: list[Path], certs: Certificates, downstream: RotelReceiver,
                 log_dir: Path) -> None:
        self.name = name
        self.ports = {p: h.free_port() for p in ("grpc", "http/protobuf", "telemetry")}
        env = {
            **h.clean_env(),
            "OTLP_GRPC_ENDPOINT": f"127.0.0.1:{self.ports['grpc']}",
            "OTLP_HTTP_ENDPOINT": f"127.0.0.1:{self.ports['http/protobuf']}",
            "PROMETHEUS_OTLP_ENDPOINT": downstream.http_endpoint,
            "TRACES_OTLP_ENDPOINT": f"127.0.0.1:{downstream.grpc_port}",
            "LOGS_OTLP_ENDPOINT": downstream.http_endpoint,
            "OTELCOL_TELEMETRY_HOST": "127.0.0.1",
            "OTELCOL_TELEMETRY_PORT": str(self.ports["telemetry"]),
            "OTELCOL_TLS_CERT_FILE": str(certs.server),
            "OTELCOL_TLS_KEY_FILE": str(certs.server_key),
            "OTELCOL_TLS_CLIENT_CA_FILE": str(certs.ca),
        }
        configs = [f"--config={c}" for c in (COLLECTOR, *overlays)]
        self.proc = h.Proc(f"otelcol-{name}", [str(h.OTELCOL), *configs], log_dir / f"otelcol-{name}.log", env=env)

    def wait_ready(self) -> None:
        h.wait_until(f"collector {self.name} to be ready", lambda: "Everything is ready" in self.proc.log_text(),
                     60, proc=self.proc)
        for protocol in PROTOCOLS:
            h.wait_until(f"collector {self.name} {protocol} port", lambda: h.port_open(self.ports[protocol]), 30,
                         proc=self.proc)

    def endpoint(self, protocol: str) -> str:
        return f"https://127.0.0.1:{self.ports[protocol]}"

    def accepted(self) -> dict[tuple[str, str], float]:
        """The collector's own count of what its OTLP receiver accepted: (signal, transport) -> items."""
        url = f"http://127.0.0.1:{self.ports['telemetry']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        out: dict[tuple[str, str], float] = {}
        pattern = r"^otelcol_receiver_accepted_(metric_points|spans|log_records)(?:_total)?\{([^}]*)\} (\S+)$"
        for m in re.finditer(pattern, text, re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            key = (m.group(1), labels.get("transport", ""))
            out[key] = out.get(key, 0.0) + float(m.group(3))
        return out


# -- the runs ---------------------------------------------------------------------------------

@dataclass
class Run:
    name: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    summary: dict


@dataclass(frozen=True)
class Case:
    name: str
    collector: str | None  # "tls", "mtls", or None: no export at all
    protocol: str | None
    certificate: str | None  # Certificates field the plugin trusts
    client: tuple[str, str] | None = None  # Certificates fields of the plugin's client certificate and key
    delivers: bool = True


def _cases() -> list[Case]:
    cases = [Case("no-export", None, None, None, delivers=False)]
    for protocol in PROTOCOLS:
        p = "grpc" if protocol == "grpc" else "http"
        cases += [
            Case(f"{p}-trusted", "tls", protocol, "ca"),
            Case(f"{p}-untrusted", "tls", protocol, "other_ca", delivers=False),
            Case(f"{p}-mtls", "mtls", protocol, "ca", client=("client", "client_key")),
            Case(f"{p}-mtls-no-client-cert", "mtls", protocol, "ca", delivers=False),
        ]
    return cases


CASES = {case.name: case for case in _cases()}


def _simulate(case: Case, collectors: dict[str, TLSCollector], certs: Certificates, out: Path) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VLLM_FRAG_OTEL_"))}
    env.update({
        "OTEL_RESOURCE_ATTRIBUTES": f"{RUN}={case.name}",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "VLLM_FRAG_OTEL_EXPORTER": "otlp" if case.collector else "none",  # simulate --output: files unless told
        # as in many container images: requests' own CA bundle variables name the system bundle.
        # OTEL_EXPORTER_OTLP_CERTIFICATE must still be the CA that OTLP/HTTP trusts
        "REQUESTS_CA_BUNDLE": certifi.where(),
        "CURL_CA_BUNDLE": certifi.where(),
    })
    if case.collector:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collectors[case.collector].endpoint(case.protocol)
        env["OTEL_EXPORTER_OTLP_PROTOCOL"] = case.protocol
        env["OTEL_EXPORTER_OTLP_CERTIFICATE"] = str(getattr(certs, case.certificate))
    if case.client:
        env["OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"] = str(getattr(certs, case.client[0]))
        env["OTEL_EXPORTER_OTLP_CLIENT_KEY"] = str(getattr(certs, case.client[1]))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "vllm_frag_otel.cli", "simulate", *SIMULATE, "--output", str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=h.REPO)
    seconds = time.monotonic() - started
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return Run(case.name, proc.returncode, proc.stdout, proc.stderr, seconds, summary)


@dataclass
class Outcome:
    runs: dict[str, Run]
    points: list[dict]  # every metric point the downstream received, flattened
    spans: list[dict]
    logs: list[dict]  # block-layout maps
    accepted: dict[str, dict[tuple[str, str], float]]  # collector -> its receiver's accepted counts
    collector_logs: dict[str, str]

    def points_of(self, run: str) -> list[dict]:
        return [p for p in self.points if p["resource"].get(RUN) == run]

    def spans_of(self, run: str) -> list[dict]:
        return [s for s in self.spans if s["resource"].get(RUN) == run]

    def logs_of(self, run: str) -> list[dict]:
        return [r for r in self.logs if r["resource"].get(RUN) == run]


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> Outcome:
    if not h.OTELCOL.exists():
        h.setup_all(h.E2E_DIR / "logs" / "setup")  # builds the collector (and the rest of the stack)
    directory = tmp_path_factory.mktemp("tls")
    log_dir = h.E2E_DIR / "logs" / "tls"
    with h.TIMINGS.stage("tls: certificates and collectors"):
        certs = make_certificates(directory / "certs")
        downstream = RotelReceiver().start()
        collectors = {
            "tls": TLSCollector("tls", [TLS_OVERLAY], certs, downstream, log_dir),
            "mtls": TLSCollector("mtls", [TLS_OVERLAY, MTLS_OVERLAY], certs, downstream, log_dir),
        }
    try:
        for collector in collectors.values():
            collector.wait_ready()
        with h.TIMINGS.stage("tls: simulate runs"):
            # two at a time (two cores); each run starts its own interpreter and vLLM
            with ThreadPoolExecutor(2) as pool:
                runs = dict(zip(CASES, pool.map(
                    lambda case: _simulate(case, collectors, certs, directory / case.name), CASES.values())))
        h.TIMINGS.notes["tls: simulate runs"] = f"{len(runs)} runs, two at a time: " + ", ".join(
            f"{run.name} {run.seconds:.0f} s" for run in runs.values())
        # every run has ended, so all a collector will ever receive is in it: read its own counts,
        # then stop it (it drains its batch and exporter queues on stop) and the downstream
        accepted = {name: c.accepted() for name, c in collectors.items()}
    finally:
        for collector in collectors.values():
            collector.proc.stop()
        downstream.stop()
    return Outcome(runs, downstream.received_metrics(), downstream.received_spans(), downstream.received_logs(),
                   accepted,
                   {name: c.proc.log_text() for name, c in collectors.items()})


# -- what the runs delivered --------------------------------------------------------------------

def _latest(points: list[dict], name: str, **attributes) -> float:
    """A cumulative gauge's or counter's last value (the final export, at the run's stop)."""
    matching = [p for p in points if p["name"] == name
                and all(p["attributes"].get(k) == v for k, v in attributes.items())]
    assert matching, (name, attributes)
    return max(matching, key=lambda p: p["time_unix_nano"])["value"]


def _assert_delivered(outcome: Outcome, name: str) -> None:
    run = outcome.runs[name]
    assert run.returncode == 0, run.stderr[-3000:]
    final = {field: s["final"] for field, s in run.summary["fields"].items()}
    points = outcome.points_of(name)
    assert points, f"{name}: no metric point arrived through the collector"
    # the counters' and gauges' final values equal the simulator's own record of the run
    assert _latest(points, "vllm.kv_cache.block.limit") == final["num_blocks"] == 159
    assert _latest(points, "vllm.kv_cache.preemptions") == final["preemptions"] > 0
    assert _latest(points, "vllm.kv_cache.allocation.attempts", **{"vllm.kv_cache.allocation.outcome": "failure"}) \
        == final["allocation_failures"] > 0
    attempts = sum(_latest(points, "vllm.kv_cache.allocation.attempts", **{"vllm.kv_cache.allocation.outcome": o})
                   for o in ("success", "failure"))
    assert attempts == final["allocation_attempts"]
    evictions = sum(_latest(points, "vllm.kv_cache.block.evictions", **{"vllm.kv_cache.block.reused": reused})
                    for reused in (True, False))
    assert evictions == final["evictions"] > 0
    assert _latest(points, "vllm.kv_cache.blocks", **{"vllm.kv_cache.block.state": "cached"}) \
        == final["cached_blocks"]
    assert {p["resource"]["service.name"] for p in points} == {"vllm"}
    # one span per request, each request once
    spans = outcome.spans_of(name)
    assert {s["name"] for s in spans} == {"vllm.kv_cache.request"}
    assert len(spans) == len({s["attributes"]["vllm.request.id"] for s in spans}) == NUM_REQUESTS
    assert sum(s["attributes"]["vllm.request.preemptions"] for s in spans) == final["preemptions"]
    # block-layout maps (logs): simulate samples one every 10 steps (--block-map-every) and one at the stop
    maps = outcome.logs_of(name)
    assert {r["event_name"] for r in maps} == {"vllm.kv_cache.block_map"}
    assert len(maps) == run.summary["steps"] // 10 + 1


def _scheduling(run: Run) -> dict:
    """What the scheduler did, from summary.json: identical with and without export."""
    return {"steps": run.summary["steps"], "finished": run.summary["finished_requests"],
            "fields": run.summary["fields"], "partial": run.summary["partial"]}


def _assert_refused(outcome: Outcome, name: str) -> None:
    run, baseline = outcome.runs[name], outcome.runs["no-export"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "KV-cache fragmentation over" in run.stdout
    delivered = outcome.points_of(name) or outcome.spans_of(name) or outcome.logs_of(name)
    assert not delivered, f"{name} delivered telemetry"
    # vLLM is unaffected: the same scheduling as without export, in bounded time
    assert _scheduling(run) == _scheduling(baseline)
    assert run.seconds < _refused_time_limit(baseline.seconds), (run.seconds, baseline.seconds)
    assert "did not finish within" not in run.stderr  # simulate's bound on the final flush was not needed
    # and the operator is told, once (not a line per retry): the SDK exporter's error, with the reason ...
    told = re.findall(r"cannot deliver to the OTLP collector \((.*)\)\. The exporter retries", run.stderr)
    assert len(told) == 1, run.stderr[-3000:]
    assert re.search(r"(Transient error|Failed to export) .*(metrics|spans|traces|logs)", told[0]), told[0]
    assert not re.search(r"^Transient error", run.stderr, re.M), run.stderr[-3000:]
    case = CASES[name]
    if case.certificate == "other_ca":
        assert "CERTIFICATE_VERIFY_FAILED" in run.stderr
    elif case.protocol == "grpc":  # mutual TLS without a client certificate: the collector's alert
        assert "CERTIFICATE_REQUIRED" in run.stderr
    # ... and the plugin's count of what it could not deliver when it stopped
    lost = re.search(r"vllm-frag-otel: at engine stop, (.*) could not be delivered within "
                     r"VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT", run.stderr)
    assert lost and f"{NUM_REQUESTS} spans" in lost.group(1) and "1 final metrics points" in lost.group(1), \
        run.stderr[-3000:]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_trusted_server_certificate_delivers_metrics_and_spans(outcome, protocol):
    _assert_delivered(outcome, f"{protocol}-trusted")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_client_certificate_passes_mutual_tls(outcome, protocol):
    _assert_delivered(outcome, f"{protocol}-mtls")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_untrusted_server_certificate_delivers_nothing_and_vllm_runs_on(outcome, protocol):
    _assert_refused(outcome, f"{protocol}-untrusted")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_mutual_tls_refuses_a_client_without_a_certificate(outcome, protocol):
    _assert_refused(outcome, f"{protocol}-mtls-no-client-cert")


def test_collectors_accepted_exactly_what_the_delivering_runs_sent(outcome):
    """The collector's own receiver counters: the refused runs' data never got past TLS
    (not even dropped later in the pipeline), and each delivering run arrived whole."""
    for collector in ("tls", "mtls"):
        expected: dict[tuple[str, str], float] = {}
        for name, case in CASES.items():
            if case.collector != collector or not case.delivers:
                continue
            transport = "grpc" if case.protocol == "grpc" else "http"
            for signal, items in (("spans", outcome.spans_of(name)), ("log_records", outcome.logs_of(name)),
                                  ("metric_points", outcome.points_of(name))):
                expected[(signal, transport)] = expected.get((signal, transport), 0) + len(items)
        # per signal and transport: what the receiver accepted is what reached the downstream from
        # the delivering runs, and so nothing of the refused ones
        assert outcome.accepted[collector] == expected


def test_collector_logs_the_refused_https_handshakes(outcome):
    """The collector's side of a refused OTLP/HTTP connection is in its log, with the reason (it
    logs nothing for a refused gRPC handshake at its default level)."""
    # (not the EOF of wait_ready's port probe: a client that gave up on the certificate)
    assert re.search(r"http: TLS handshake error from 127\.0\.0\.1:\d+: (?!EOF\s)", outcome.collector_logs["tls"])
    assert re.search(r"http: TLS handshake error from 127\.0\.0\.1:\d+: tls: client didn't provide a certificate",
                     outcome.collector_logs["mtls"])

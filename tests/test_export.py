"""Telemetry leaves the process: over OTLP gRPC and HTTP to a real receiver
process (rotel, a Rust OpenTelemetry collector), and by default as OTLP/JSON
lines on disk. Each run is the real `vllm-frag-otel simulate` in a fresh
interpreter, with the plugin loaded by vLLM's entry-point mechanism."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from google.protobuf import json_format
from helpers import REPO
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from otlp_receiver import RotelReceiver, _flatten

from vllm_frag_otel.config import Settings

FIXED_NAMES = {
    "vllm.kv_cache.blocks",
    "vllm.kv_cache.block.limit",
    "vllm.kv_cache.free_runs",
    "vllm.kv_cache.free_run.largest",
    "vllm.kv_cache.fragmentation.external",
    "vllm.kv_cache.slots",
    "vllm.kv_cache.partial_blocks",
    "vllm.kv_cache.fragmentation.internal",
    "vllm.kv_cache.slot.utilization",
    "vllm.kv_cache.allocation.duration",
}
DELTA = 1  # AggregationTemporality in OTLP
SIMULATE = ["--num-requests", "40", "--num-blocks", "160", "--max-num-seqs", "16", "--seed", "7"]


def _simulate(tmp_path, env_overrides: dict[str, str], *extra_args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VLLM_FRAG_OTEL_"))}
    env.update({"OTEL_METRIC_EXPORT_INTERVAL": "300", **env_overrides})
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_frag_otel.cli", "simulate", *SIMULATE, *extra_args, "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "KV-cache fragmentation over" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    summary["stderr"] = proc.stderr
    summary["dir"] = out
    return summary


def _last(points: list[dict], name: str, **attributes) -> float:
    """A gauge's latest value, or a counter's running total (summing delta points)."""
    matching = [p for p in points if p["name"] == name
                and all(p["attributes"].get(k) == v for k, v in attributes.items())]
    assert matching, (name, attributes)
    if matching[0].get("temporality") == DELTA:
        return sum(p["value"] for p in matching)
    return max(matching, key=lambda p: p["time_unix_nano"])["value"]


def _assert_matches_final_snapshot(points: list[dict], summary: dict) -> None:
    final = {name: s["final"] for name, s in summary["fields"].items()}
    assert FIXED_NAMES <= {p["name"] for p in points}
    assert _last(points, "vllm.kv_cache.block.limit") == final["num_blocks"] == 159
    assert _last(points, "vllm.kv_cache.preemptions") == final["preemptions"] > 0
    assert _last(points, "vllm.kv_cache.blocks", **{"vllm.kv_cache.block.state": "cached"}) == final["cached_blocks"]
    assert _last(points, "vllm.kv_cache.fragmentation.external") == pytest.approx(final["external_fragmentation"])
    failures = _last(points, "vllm.kv_cache.allocation.attempts", **{"vllm.kv_cache.allocation.outcome": "failure"})
    assert failures == final["allocation_failures"] > 0
    evictions = sum(
        _last(points, "vllm.kv_cache.block.evictions",
              **{"vllm.kv_cache.eviction.reason": "capacity", "vllm.kv_cache.block.reused": reused})
        for reused in (True, False)
    )
    assert evictions == final["evictions"] > 0
    histograms = [p for p in points if p["name"] == "vllm.kv_cache.allocation.duration"]
    if histograms[0]["temporality"] == DELTA:
        count = sum(p["count"] for p in histograms)
    else:
        latest = max(p["time_unix_nano"] for p in histograms)
        count = sum(p["count"] for p in histograms if p["time_unix_nano"] == latest)
    # the default times an unbiased random sample of the calls, and says at which rate
    (rate,) = {p["attributes"]["vllm.kv_cache.allocation.sample_rate"] for p in histograms}
    assert rate == Settings().allocation_sample_rate < 1
    expected, spread = final["allocation_attempts"] * rate, (final["allocation_attempts"] * rate * (1 - rate)) ** 0.5
    assert abs(count - expected) < 5 * spread, (count, expected)
    resource = points[0]["resource"]
    assert resource["service.name"] == "vllm"
    assert resource["vllm.model.name"].endswith("tiny_model")
    assert resource["service.version"].startswith("0.3")
    assert {"service.instance.id", "host.name", "process.pid"} <= set(resource)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_metrics_reach_a_real_otlp_receiver(tmp_path, protocol):
    with RotelReceiver() as receiver:
        endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
        summary = _simulate(tmp_path, {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "VLLM_FRAG_OTEL_EXPORTER": "otlp",  # simulate --output writes files unless told to send
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            # delta: the histogram counts of all exports add up to every allocate_slots call
            "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta",
        })
        points = receiver.wait_for_metric(*FIXED_NAMES, timeout=20)
        spans = receiver.received_spans()
    assert "OTLP/JSON" not in summary["stderr"]  # an endpoint is configured: no file fallback
    assert not list((summary["dir"] / "telemetry").glob("*.jsonl"))
    _assert_matches_final_snapshot(points, summary)
    _assert_one_span_per_request(spans)


def _assert_one_span_per_request(spans: list[dict]) -> None:
    requests = int(SIMULATE[SIMULATE.index("--num-requests") + 1])
    assert len(spans) == requests
    assert {s["name"] for s in spans} == {"vllm.kv_cache.request"}
    assert len({s["attributes"]["vllm.request.id"] for s in spans}) == requests
    assert all(len(s["trace_id"]) == 32 and int(s["trace_id"], 16) for s in spans)
    assert sum(s["attributes"]["vllm.request.preemptions"] for s in spans) > 0
    assert spans[0]["resource"]["service.name"] == "vllm"


def test_embedded_default_writes_otlp_json_lines(tmp_path):
    summary = _simulate(tmp_path, {})  # cumulative, the OTLP default
    assert "writing KV-cache telemetry as OTLP/JSON lines to" in summary["stderr"]
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in summary["stderr"]  # says how to use a collector instead
    files = list((summary["dir"] / "telemetry").glob("metrics-*.jsonl"))
    assert files
    points = []
    for path in files:
        for line in path.read_text().splitlines():
            request = ExportMetricsServiceRequest()
            json_format.Parse(line, request)  # the protobuf JSON encoding, one request per line
            points += _flatten(request)
    _assert_matches_final_snapshot(points, summary)
    spans = []
    for path in (summary["dir"] / "telemetry").glob("traces-*.jsonl"):
        for line in path.read_text().splitlines():
            for resource_spans in json.loads(line)["resourceSpans"]:
                resource = {a["key"]: next(iter(a["value"].values())) for a in resource_spans["resource"]["attributes"]}
                for scope_spans in resource_spans["scopeSpans"]:
                    for span in scope_spans["spans"]:
                        attributes = {a["key"]: _json_value(a["value"]) for a in span["attributes"]}
                        spans.append({"name": span["name"], "trace_id": span["traceId"],  # hex, as OTLP/JSON wants
                                      "attributes": attributes, "resource": resource})
    _assert_one_span_per_request(spans)


def _json_value(value: dict):
    (kind, raw), = value.items()
    return int(raw) if kind == "intValue" else raw


def test_otel_sdk_disabled_exports_nothing(tmp_path):
    summary = _simulate(tmp_path, {"OTEL_SDK_DISABLED": "true"})
    assert not (summary["dir"] / "telemetry").exists()
    assert summary["fields"]["used_blocks"]["max"] > 0  # the analyzer still works


@pytest.fixture(scope="module")
def tls_receiver(tmp_path_factory):
    """A TLS-only OTLP receiver process with a self-signed certificate for 127.0.0.1."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key, out = directory / "cert.pem", directory / "key.pem", directory / "received.jsonl"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "tls_receiver.py"), str(cert), str(key), str(out)],
        stdout=subprocess.PIPE, text=True,
    )
    ready = process.stdout.readline().split()
    assert ready and ready[0] == "READY", ready
    yield {"cert": cert, "out": out, "grpc": int(ready[1])}
    process.terminate()
    process.wait(timeout=10)


def _received(out) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


@pytest.mark.parametrize("protocol", ["grpc"])
def test_tls_and_auth_headers_through_the_standard_variables(tmp_path, tls_receiver, protocol):
    endpoint = f"https://127.0.0.1:{tls_receiver[protocol]}"
    transport = "grpc" if protocol == "grpc" else "http"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
           "VLLM_FRAG_OTEL_EXPORTER": "otlp",  # simulate --output writes files unless told to send
           "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20s3cret"}
    # not trusting the self-signed certificate: nothing is delivered, and vLLM's run still completes
    before = len(_received(tls_receiver["out"]))
    # (only the periodic exports: simulate's forced per-step exports would each wait out the timeout)
    _simulate(tmp_path / "untrusted", {**env, "OTEL_EXPORTER_OTLP_TIMEOUT": "2"}, "--export-every", "0")
    assert len(_received(tls_receiver["out"])) == before
    # trusting it through OTEL_EXPORTER_OTLP_CERTIFICATE: metrics and spans arrive with the header
    _simulate(tmp_path / "trusted", {**env, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tls_receiver["cert"])})
    records = [r for r in _received(tls_receiver["out"])[before:] if r["transport"] == transport]
    assert {r["signal"] for r in records} == {"metrics", "traces"}
    assert {r["authorization"] for r in records} == {"Bearer s3cret"}
    assert sum(r["items"] for r in records if r["signal"] == "traces") == int(SIMULATE[1])


def test_the_exporters_retry_lines_fold_into_one_warning_only_inside_the_plugins_exports(caplog):
    """A record logged inside one of the plugin's exports: the first becomes the plugin's
    one warning (the SDK's text kept), later ones are dropped. The same record outside the
    plugin's exports (vLLM's own OTLP tracing, through the same loggers) stays as it is."""
    import logging

    from vllm_frag_otel.export.telemetry import _RetryLog

    log = logging.getLogger("opentelemetry.exporter.otlp.proto.http.test_retry_log")
    fold = _RetryLog()
    log.addFilter(fold)
    try:
        with caplog.at_level(logging.WARNING, logger=log.name):
            log.warning("Transient error %s encountered while exporting %s batch, retrying in %.2fs.", "refused",
                        "spans", 1.0)  # vLLM's own exporter: untouched
            with fold.ours():
                for attempt in range(3):
                    log.warning("Transient error %s encountered while exporting %s batch, retrying in %.2fs.",
                                "refused", "metrics", 1.0 + attempt)
                log.error("Failed to export %s batch due to timeout, max retries or shutdown.", "metrics")
                log.warning("Unsupported compression type: %s", "zip")  # not a retry line: untouched
    finally:
        log.removeFilter(fold)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "Transient error refused encountered while exporting spans batch, retrying in 1.00s.",
        "vllm-frag-otel: cannot deliver to the OTLP collector (Transient error refused encountered while exporting "
        "metrics batch, retrying in 1.00s.). The exporter retries in the background; further failed attempts are "
        "not logged; what an engine stop cannot deliver is reported when it stops.",
        "Unsupported compression type: zip",
    ]


def test_a_collector_back_is_said_once_and_the_next_outage_is_announced_again(caplog):
    """Outage, recovery, outage: one line each, however many retries and exports in between."""
    import logging

    from vllm_frag_otel.export.telemetry import _RetryLog

    log = logging.getLogger("opentelemetry.exporter.otlp.proto.http.test_retry_log_again")
    fold = _RetryLog()
    log.addFilter(fold)

    def failing_export(reason: str) -> None:
        with fold.ours():
            for _ in range(2):
                log.warning("Transient error %s encountered while exporting %s batch, retrying in %.2fs.", reason,
                            "metrics", 1.0)

    try:
        with caplog.at_level(logging.INFO):
            failing_export("refused")
            fold.delivered()
            fold.delivered()  # a second delivery in a row says nothing
            failing_export("reset")
    finally:
        log.removeFilter(fold)
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" (")[0] for m in messages] == [
        "vllm-frag-otel: cannot deliver to the OTLP collector",
        "vllm-frag-otel: the OTLP collector takes the telemetry again.",
        "vllm-frag-otel: cannot deliver to the OTLP collector",
    ]
    assert "Transient error reset" in messages[2]

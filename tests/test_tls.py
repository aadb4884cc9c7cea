"""OTLP/HTTP over TLS trusts the CA named by OTEL_EXPORTER_OTLP_[METRICS_]CERTIFICATE, also where
REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE name the system bundle (as in many container images): requests
lets those replace the exporter session's CA file. The exporter is the one the plugin builds, the
server a real TLS socket in this process. (The same against the real Collector, with mutual TLS and
gRPC: tests/e2e/test_e2e_tls.py.)"""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading

import certifi
import pytest
from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData

from vllm_frag_otel.config import Settings
from vllm_frag_otel.export.telemetry import build_exporter


@pytest.fixture(scope="module")
def https_receiver(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate, answering every POST with 200."""
    directory = tmp_path_factory.mktemp("https")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    paths: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            paths.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"endpoint": f"https://127.0.0.1:{server.server_address[1]}", "cert": cert, "paths": paths}
    server.shutdown()
    server.server_close()


def _export(monkeypatch, receiver, **env: str) -> MetricExportResult:
    for name in ("OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE",
                 "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
                 "OTEL_PYTHON_EXPORTER_OTLP_HTTP_METRICS_CREDENTIAL_PROVIDER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver["endpoint"])
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    monkeypatch.setenv("CURL_CA_BUNDLE", certifi.where())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    exporter = build_exporter(Settings(exporter="otlp"), "metrics")
    try:
        return exporter.export(MetricsData(resource_metrics=[]))
    finally:
        exporter.shutdown()


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE"])
def test_otlp_http_trusts_the_configured_ca_despite_requests_ca_bundle(monkeypatch, https_receiver, variable):
    before = len(https_receiver["paths"])
    assert _export(monkeypatch, https_receiver, **{variable: str(https_receiver["cert"])}) is MetricExportResult.SUCCESS
    assert https_receiver["paths"][before:] == ["/v1/metrics"]


def test_otlp_http_without_the_ca_is_refused(monkeypatch, https_receiver):
    before = len(https_receiver["paths"])
    assert _export(monkeypatch, https_receiver) is MetricExportResult.FAILURE
    assert len(https_receiver["paths"]) == before

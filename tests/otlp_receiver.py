"""Real OTLP receiver for tests: the `rotel` collector (PyPI wheel) + an in-process sink.

    client --OTLP gRPC/HTTP--> rotel-agent (127.0.0.1) --OTLP/HTTP protobuf--> sink (this process)

Usage:
    with RotelReceiver() as rx:
        exporter = OTLPMetricExporter(endpoint=rx.grpc_endpoint, insecure=True)   # proto.grpc
        exporter = OTLPMetricExporter(endpoint=rx.http_metrics_url)               # proto.http
        ...
        rx.wait_for_metric("my.gauge", timeout=5)
        points = rx.received_metrics()      # list of flat dicts, see _flatten()

Requirements: rotel and opentelemetry-proto (the `test` extra). Linux, glibc >= 2.34; the
rotel binary links the running Python's libpython, found through LD_LIBRARY_PATH below.
"""
from __future__ import annotations

import atexit
import gzip
import http.server
import os
import signal
import socket
import subprocess
import sysconfig
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)


def rotel_agent_path() -> Path:
    import rotel  # the wheel ships the Rust binary next to its __init__.py

    p = Path(rotel.__file__).parent / "rotel-agent"
    if not p.exists():
        raise FileNotFoundError(f"rotel-agent binary not found at {p}")
    return p


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- decoding
def _any_value(v) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return _attrs(v.kvlist_value.values)
    return getattr(v, kind)


def _attrs(kvs) -> dict:
    return {kv.key: _any_value(kv.value) for kv in kvs}


def _number(dp) -> float | int | None:
    kind = dp.WhichOneof("value")
    return getattr(dp, kind) if kind else None


def _flatten(req: ExportMetricsServiceRequest) -> list[dict]:
    """One dict per data point."""
    out = []
    for rm in req.resource_metrics:
        resource = _attrs(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")  # gauge | sum | histogram | exponential_histogram | summary
                data = getattr(m, kind)
                base = {
                    "name": m.name,
                    "type": kind,
                    "unit": m.unit,
                    "description": m.description,
                    "scope": sm.scope.name,
                    "resource": resource,
                }
                if kind in ("sum", "histogram"):
                    base["temporality"] = data.aggregation_temporality
                if kind == "sum":
                    base["is_monotonic"] = data.is_monotonic
                for dp in data.data_points:
                    d = dict(base, attributes=_attrs(dp.attributes),
                             time_unix_nano=dp.time_unix_nano,
                             start_time_unix_nano=dp.start_time_unix_nano)
                    if kind in ("gauge", "sum"):
                        d["value"] = _number(dp)
                    elif kind == "histogram":
                        d.update(count=dp.count, sum=dp.sum if dp.HasField("sum") else None,
                                 min=dp.min if dp.HasField("min") else None,
                                 max=dp.max if dp.HasField("max") else None,
                                 bucket_counts=list(dp.bucket_counts),
                                 explicit_bounds=list(dp.explicit_bounds))
                    out.append(d)
    return out


# --------------------------------------------------------------------------- sink
class _Sink(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _SinkHandler)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.requests: list[tuple[float, str, ExportMetricsServiceRequest]] = []
        self.other: list[tuple[str, bytes]] = []  # traces/logs, kept raw
        self.errors: list[str] = []


class _SinkHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        srv: _Sink = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        enc = (self.headers.get("Content-Encoding") or "").lower()
        ctype = (self.headers.get("Content-Type") or "application/x-protobuf").split(";")[0]
        try:
            if enc == "gzip":
                body = gzip.decompress(body)
            elif enc == "deflate":
                body = zlib.decompress(body)
            if self.path.rstrip("/").endswith("/v1/metrics"):
                req = ExportMetricsServiceRequest()
                if ctype == "application/json":
                    json_format.Parse(body, req)
                else:
                    req.ParseFromString(body)
                with srv.cond:
                    srv.requests.append((time.monotonic(), self.path, req))
                    srv.cond.notify_all()
            else:
                with srv.cond:
                    srv.other.append((self.path, body))
        except Exception as e:  # keep going, but remember
            with srv.cond:
                srv.errors.append(f"{self.path}: {e!r}")
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        payload = ExportMetricsServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


# --------------------------------------------------------------------------- receiver
class RotelReceiver:
    """Starts rotel-agent on two free loopback ports, forwarding everything to an in-process sink."""

    def __init__(self, batch_timeout: str | None = None, startup_timeout: float = 10.0,
                 log_path: str | None = None):
        # batch_timeout=None -> --disable-batching: every client export is forwarded at once, 1:1
        # (sink sees the same request boundaries). Otherwise e.g. "10ms" (rotel default is 200ms,
        # which means up to ~400 ms until data reaches the sink).
        self.batch_timeout = batch_timeout
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.sink: _Sink | None = None
        self.grpc_port = self.http_port = 0
        self.startup_seconds: float | None = None
        self._sink_closed = False
        self._own_log = False
        self._final_log: str | None = None

    # endpoints for the OTel SDK exporters
    @property
    def grpc_endpoint(self) -> str:  # for proto.grpc OTLPMetricExporter(endpoint=..., insecure=True)
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:  # base URL (what OTEL_EXPORTER_OTLP_ENDPOINT would be)
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def http_metrics_url(self) -> str:  # for proto.http OTLPMetricExporter(endpoint=...) - full URL!
        return self.http_endpoint + "/v1/metrics"

    def start(self) -> "RotelReceiver":
        self.sink = _Sink()
        threading.Thread(target=self.sink.serve_forever, name="otlp-sink", daemon=True).start()
        sink_url = f"http://127.0.0.1:{self.sink.server_address[1]}"

        agent = str(rotel_agent_path())
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROTEL_")}  # clap reads ROTEL_*
        env["NO_COLOR"] = "1"
        libdir = sysconfig.get_config_var("LIBDIR")  # binary links libpython3.X.so.1.0, no rpath
        if libdir:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))

        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="rotel-", suffix=".log")
            os.close(fd)
            self._own_log = True

        last_err = ""
        for _attempt in range(3):  # free-port race: retry with new ports
            self.grpc_port, self.http_port = _free_port(), _free_port()
            while self.http_port == self.grpc_port:
                self.http_port = _free_port()
            cmd = [
                agent, "start",
                "--otlp-grpc-endpoint", f"127.0.0.1:{self.grpc_port}",
                "--otlp-http-endpoint", f"127.0.0.1:{self.http_port}",
                "--exporter", "otlp",
                "--otlp-exporter-protocol", "http",          # -> POST {endpoint}/v1/metrics, protobuf
                "--otlp-exporter-endpoint", sink_url,
                "--otlp-exporter-compression", "none",
                "--otlp-exporter-retry-initial-backoff", "50ms",
                "--otlp-exporter-retry-max-backoff", "200ms",
                "--otlp-exporter-retry-max-elapsed-time", "5s",
                *(["--disable-batching"] if self.batch_timeout is None
                  else ["--batch-timeout", self.batch_timeout]),
            ]
            self._cmd, self._env = cmd, env
            if self._spawn():
                atexit.register(self.stop)  # don't leak rotel if a test forgets stop()
                return self
            last_err = self.log_text()[-2000:]
            self._kill()
            if "Address already in use" not in last_err:
                break
        self.sink.shutdown()
        raise RuntimeError(f"rotel-agent did not become ready:\n{last_err}")

    def _spawn(self) -> bool:
        """Start rotel with the current command; True once both ports accept connections."""
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self._env, start_new_session=True)
        while time.monotonic() < t0 + self.startup_timeout:
            if self.proc.poll() is not None:
                return False
            if _port_open(self.grpc_port) and _port_open(self.http_port):
                self.startup_seconds = time.monotonic() - t0
                return True
            time.sleep(0.02)
        return False

    def stop_agent(self) -> None:
        """The collector goes away (the sink keeps what it already received)."""
        self._kill()

    def start_agent(self) -> None:
        """The collector comes back on the same ports."""
        if not self._spawn():
            raise RuntimeError(f"rotel-agent did not come back:\n{self.log_text()[-2000:]}")

    def log_text(self) -> str:
        """rotel's stdout+stderr (startup line and errors)."""
        if self._final_log is not None:
            return self._final_log
        try:
            return Path(self.log_path).read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    # ----------------------------------------------------------------- results
    def requests(self) -> list[ExportMetricsServiceRequest]:
        """Raw decoded ExportMetricsServiceRequest messages, in arrival order."""
        with self.sink.lock:
            return [r for _, _, r in self.sink.requests]

    def received_metrics(self) -> list[dict]:
        """Flattened: one dict per data point (name, type, value/count/sum/..., attributes, resource, scope)."""
        out: list[dict] = []
        for req in self.requests():
            out.extend(_flatten(req))
        return out

    def _received(self, signal: str, message_type, nesting: tuple[str, str, str]):
        """(resource attributes, item) for every span or log record of one signal, in arrival order."""
        with self.sink.lock:
            bodies = [body for path, body in self.sink.other if path.rstrip("/").endswith(f"/v1/{signal}")]
        resources_field, scopes_field, items_field = nesting
        for body in bodies:
            request = message_type()
            request.ParseFromString(body)
            for resource_entry in getattr(request, resources_field):
                resource = _attrs(resource_entry.resource.attributes)
                for scope_entry in getattr(resource_entry, scopes_field):
                    for item in getattr(scope_entry, items_field):
                        yield resource, item

    def received_spans(self) -> list[dict]:
        """One dict per span: name, hex trace/span/parent ids, attributes, resource."""
        return [
            {
                "name": span.name,
                "trace_id": span.trace_id.hex(),
                "span_id": span.span_id.hex(),
                "parent_span_id": span.parent_span_id.hex(),
                "attributes": _attrs(span.attributes),
                "events": [e.name for e in span.events],
                "resource": resource,
            }
            for resource, span in self._received(
                "traces", ExportTraceServiceRequest, ("resource_spans", "scope_spans", "spans"))
        ]

    def received_logs(self) -> list[dict]:
        """One dict per log record: event name, time, raw bytes body, attributes, resource."""
        return [
            {
                "event_name": record.event_name,
                "time_unix_nano": record.time_unix_nano,
                "body": record.body.bytes_value,
                "attributes": _attrs(record.attributes),
                "resource": resource,
            }
            for resource, record in self._received(
                "logs", ExportLogsServiceRequest, ("resource_logs", "scope_logs", "log_records"))
        ]

    def wait_for(self, predicate: Callable[[list[dict]], bool], timeout: float = 5.0) -> list[dict]:
        """Block until predicate(received_metrics()) is true; returns the data points."""
        deadline = time.monotonic() + timeout
        with self.sink.cond:
            while True:
                pts = [d for _, _, r in self.sink.requests for d in _flatten(r)]
                if predicate(pts):
                    return pts
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"condition not met in {timeout}s; got names "
                                       f"{sorted({d['name'] for d in pts})}; sink errors {self.sink.errors}")
                self.sink.cond.wait(left)

    def wait_for_metric(self, *names: str, timeout: float = 5.0) -> list[dict]:
        return self.wait_for(lambda pts: set(names) <= {d["name"] for d in pts}, timeout)

    def clear(self) -> None:
        with self.sink.lock:
            self.sink.requests.clear()
            self.sink.other.clear()
            self.sink.errors.clear()

    # ----------------------------------------------------------------- shutdown
    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # rotel flushes pending batches on SIGTERM
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self._kill()  # SIGTERM: rotel flushes what it still holds to the sink before exiting
        if self.sink and not self._sink_closed:
            self._sink_closed = True
            self.sink.shutdown()
            self.sink.server_close()  # received data stays readable after stop()
        if self._own_log and self._final_log is None:
            self._final_log = self.log_text()
            try:
                os.unlink(self.log_path)
            except OSError:
                pass
        atexit.unregister(self.stop)

    def __enter__(self) -> "RotelReceiver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""An OTLP receiver that only speaks TLS and records each request's headers.

Run as a process: `python tls_receiver.py CERT KEY OUT.jsonl`. It serves OTLP
gRPC (metrics and traces services) on a loopback port, prints `READY <port>`,
and appends one JSON line per request received:
{"transport", "signal", "authorization", "items"}.
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

_lock = threading.Lock()


def _record(out: str, transport: str, signal: str, authorization: str | None, items: int) -> None:
    with _lock, open(out, "a") as f:
        f.write(json.dumps({"transport": transport, "signal": signal, "authorization": authorization,
                            "items": items}) + "\n")


def _count(request) -> int:
    if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
        return sum(len(sm.metrics) for rm in request.resource_metrics for sm in rm.scope_metrics)
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


def serve(cert: str, key: str, out: str) -> None:
    with open(cert, "rb") as f:
        cert_pem = f.read()
    with open(key, "rb") as f:
        key_pem = f.read()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request, context):
            auth = dict(context.invocation_metadata()).get("authorization")
            _record(out, "grpc", "metrics", auth, _count(request))
            return metrics_service_pb2.ExportMetricsServiceResponse()

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            auth = dict(context.invocation_metadata()).get("authorization")
            _record(out, "grpc", "traces", auth, _count(request))
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    grpc_port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    server.start()

    print(f"READY {grpc_port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    serve(*sys.argv[1:4])

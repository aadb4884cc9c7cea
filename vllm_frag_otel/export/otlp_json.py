"""OTLP/JSON lines in a bounded, rotating directory: the embedded default.

One export request per line, in the OTLP JSON encoding the Collector's file
exporter writes (lowerCamelCase fields, enums as integers, trace and span ids
as hex), so the files can be replayed into a Collector or read by `report`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import OTLPMetricExporterMixin
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

_ID_FIELDS = {"traceId", "spanId", "parentSpanId"}
logger = logging.getLogger("vllm.frag_otel")


def to_otlp_json(message: Message) -> str:
    """Encode an OTLP protobuf message as one line of OTLP JSON."""
    return json.dumps(_hex_ids(MessageToDict(message, use_integers_for_enums=True)), separators=(",", ":"))


def _hex_ids(value):
    if isinstance(value, dict):
        return {
            k: base64.b64decode(v).hex() if k in _ID_FIELDS and isinstance(v, str) else _hex_ids(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_hex_ids(v) for v in value]
    return value


class RotatingJsonLines:
    """Appends lines to `<prefix>-<pid>-<seq>.jsonl` files in `directory`.

    A file is closed once it reaches `max_bytes`; the directory keeps at most
    `max_files` of `<prefix>-*.jsonl`, oldest deleted first (across processes):
    the first deletion is logged once, naming the directory and the limits, as
    the files left then cover only the latest part of the run. A line that
    cannot be written is counted in `write_errors`; the first such error is
    logged once, naming the directory and the reason.
    """

    def __init__(self, directory: str, prefix: str, max_bytes: int, max_files: int):
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._lock = threading.Lock()
        self._file = None
        self._seq = 0
        self.write_errors = 0
        self.deleted_files = 0

    def write(self, line: str) -> None:
        data = (line + "\n").encode()
        with self._lock:
            if self._file is None or self._file.tell() + len(data) > self.max_bytes and self._file.tell():
                self._rotate()
            self._file.write(data)
            self._file.flush()

    def append(self, message: Message) -> bool:
        """One OTLP export request as a line; False if it could not be written."""
        try:
            self.write(to_otlp_json(message))
        except OSError as exc:
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: OSError) -> None:
        with self._lock:
            self.write_errors += 1
            first = self.write_errors == 1
            if self._file is not None:  # start a new file next time: this one may be broken
                try:
                    self._file.close()
                except OSError:
                    pass
                self._file = None
        if first:
            logger.warning("vllm-frag-otel: cannot write %s telemetry to %s (%s); it is lost until the directory"
                           " is writable again (further errors are counted, not logged).",
                           self.prefix, self.directory, exc.strerror or exc)

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        path = self.directory / f"{self.prefix}-{os.getpid()}-{int(time.time())}-{self._seq}.jsonl"
        self._file = open(path, "ab")
        existing = sorted(self.directory.glob(f"{self.prefix}-*.jsonl"), key=_mtime)
        for old in existing[: max(len(existing) - self.max_files, 0)]:
            if old != path:
                old.unlink(missing_ok=True)
                self._deleted(old)

    def _deleted(self, path: Path) -> None:
        self.deleted_files += 1
        if self.deleted_files == 1:
            logger.warning("vllm-frag-otel: deleted %s to keep %s telemetry in %s within"
                           " VLLM_FRAG_OTEL_FILE_MAX_FILES=%d files of VLLM_FRAG_OTEL_FILE_MAX_BYTES=%d bytes: from now on the files hold only the"
                           " latest part of the run (raise the limits to keep all of it; further deletions are not"
                           " logged).", path.name, self.prefix, self.directory, self.max_files, self.max_bytes)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class OTLPJsonFileMetricExporter(MetricExporter, OTLPMetricExporterMixin):
    """Writes metrics as OTLP/JSON lines; honours the OTLP temporality variables."""

    def __init__(self, directory: str, max_bytes: int, max_files: int):
        self._common_configuration()
        self.lines = RotatingJsonLines(directory, "metrics", max_bytes, max_files)

    @property
    def write_errors(self) -> int:
        """Export requests that could not be written."""
        return self.lines.write_errors

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        written = self.lines.append(encode_metrics(metrics_data))
        return MetricExportResult.SUCCESS if written else MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self.lines.close()


class OTLPJsonFileSpanExporter(SpanExporter):
    """Writes spans as OTLP/JSON lines, beside the metrics."""

    def __init__(self, directory: str, max_bytes: int, max_files: int):
        self.lines = RotatingJsonLines(directory, "traces", max_bytes, max_files)

    @property
    def write_errors(self) -> int:
        """Export requests that could not be written."""
        return self.lines.write_errors

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS if self.lines.append(encode_spans(spans)) else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.lines.close()


class OTLPJsonFileLogExporter(LogRecordExporter):
    """Writes log records (the block-layout maps) as OTLP/JSON lines, beside the metrics."""

    def __init__(self, directory: str, max_bytes: int, max_files: int):
        self.lines = RotatingJsonLines(directory, "logs", max_bytes, max_files)

    @property
    def write_errors(self) -> int:
        """Export requests that could not be written."""
        return self.lines.write_errors

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        return LogRecordExportResult.SUCCESS if self.lines.append(encode_logs(batch)) else LogRecordExportResult.FAILURE

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True

    def shutdown(self) -> None:
        self.lines.close()

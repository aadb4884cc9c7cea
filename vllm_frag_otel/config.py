"""Plugin settings from `VLLM_FRAG_OTEL_*` variables.

A bad value never stops vLLM: it is reported once, naming the variable and the
accepted values, and the default is used instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

logger = logging.getLogger("vllm.frag_otel")

EXPORTERS = ("auto", "otlp", "file", "console", "none")
PROMETHEUS = "prometheus"  # metrics served on /metrics; listed alone or after one of EXPORTERS
EXPORTER_ACCEPTED = ("one of " + ", ".join((*EXPORTERS, PROMETHEUS))
                     + ", or one of the first five and prometheus together (e.g. otlp,prometheus)")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
T = TypeVar("T")


def cache_dir() -> str:
    """The plugin's and the CLI's directory in the user's cache."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vllm-frag-otel")


def _default_file_dir() -> str:
    return os.path.join(cache_dir(), "telemetry")


@dataclass(frozen=True)
class Settings:
    enabled: bool = True
    exporter: str = "auto"
    file_dir: str = field(default_factory=_default_file_dir)
    file_max_bytes: int = 16 * 1024 * 1024
    file_max_files: int = 8
    max_hook_errors: int = 10
    spans: bool = True
    max_open_spans: int = 16384
    block_map_interval: float = 0.0  # seconds between block-layout maps; 0: none
    block_map_max_cells: int = 4096
    region_metric: bool = False  # the live heat map's vllm.kv_cache.region.blocks gauge
    regions: int = 32  # its block-id regions per pool
    allocation_sample_rate: float = 0.01  # share of allocate_slots calls timed for the duration histogram
    shutdown_timeout: float = 3.0  # seconds the flush at engine stop may hold vLLM's stop (see README "On stop")


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError


def _parse_choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError
        return value

    return parse


def _parse_exporter(raw: str) -> str:
    """VLLM_FRAG_OTEL_EXPORTER: one push exporter (EXPORTERS), `prometheus`, or both
    as a comma list; normalised ("OTLP, Prometheus" -> "otlp,prometheus")."""
    items = [item.strip().lower() for item in raw.split(",") if item.strip()]
    push = [item for item in items if item in EXPORTERS]
    if not items or len(push) + items.count(PROMETHEUS) != len(items) or len(push) > 1 or items.count(PROMETHEUS) > 1:
        raise ValueError
    return ",".join(push + [PROMETHEUS] * (PROMETHEUS in items))


def exporter_parts(value: str) -> tuple[str | None, bool]:
    """A normalised VLLM_FRAG_OTEL_EXPORTER value: (its push exporter or None, prometheus?)."""
    items = value.split(",")
    return next((item for item in items if item != PROMETHEUS), None), PROMETHEUS in items


def _parse_positive_int(raw: str) -> int:
    value = int(raw.strip())
    if value < 1:
        raise ValueError
    return value


MAX_REGIONS = 1024


def _parse_regions(raw: str) -> int:
    value = int(raw.strip())
    if not 1 <= value <= MAX_REGIONS:
        raise ValueError
    return value


def _parse_seconds(raw: str) -> float:
    value = float(raw.strip())
    if not 0 <= value < float("inf"):
        raise ValueError
    return value


def _parse_share(raw: str) -> float:
    value = float(raw.strip())
    if not 0 < value <= 1:
        raise ValueError
    return value


def _parse_dir(raw: str) -> str:
    value = raw.strip()
    if not value or "\x00" in value:
        raise ValueError
    return str(Path(value).expanduser())


# variable name -> (Settings field, parser, accepted values as told to the user)
VARIABLES: dict[str, tuple[str, Callable[[str], object], str]] = {
    "VLLM_FRAG_OTEL_ENABLED": ("enabled", _parse_bool, "one of " + ", ".join(_TRUE + _FALSE)),
    "VLLM_FRAG_OTEL_EXPORTER": ("exporter", _parse_exporter, EXPORTER_ACCEPTED),
    "VLLM_FRAG_OTEL_FILE_DIR": ("file_dir", _parse_dir, "a directory path"),
    "VLLM_FRAG_OTEL_FILE_MAX_BYTES": ("file_max_bytes", _parse_positive_int, "a whole number of bytes >= 1"),
    "VLLM_FRAG_OTEL_FILE_MAX_FILES": ("file_max_files", _parse_positive_int, "a whole number >= 1"),
    "VLLM_FRAG_OTEL_MAX_HOOK_ERRORS": ("max_hook_errors", _parse_positive_int, "a whole number >= 1"),
    "VLLM_FRAG_OTEL_SPANS": ("spans", _parse_bool, "one of " + ", ".join(_TRUE + _FALSE)),
    "VLLM_FRAG_OTEL_MAX_OPEN_SPANS": ("max_open_spans", _parse_positive_int, "a whole number >= 1"),
    "VLLM_FRAG_OTEL_BLOCK_MAP_INTERVAL": (
        "block_map_interval", _parse_seconds, "a number of seconds >= 0 (0: no block-layout maps)"
    ),
    "VLLM_FRAG_OTEL_BLOCK_MAP_MAX_CELLS": ("block_map_max_cells", _parse_positive_int, "a whole number >= 1"),
    "VLLM_FRAG_OTEL_REGION_METRIC": ("region_metric", _parse_bool, "one of " + ", ".join(_TRUE + _FALSE)),
    "VLLM_FRAG_OTEL_REGIONS": ("regions", _parse_regions, f"a whole number in 1-{MAX_REGIONS}"),
    "VLLM_FRAG_OTEL_ALLOCATION_SAMPLE_RATE": (
        "allocation_sample_rate", _parse_share, "a number in (0, 1] (1: time every allocate_slots call)"
    ),
    "VLLM_FRAG_OTEL_SHUTDOWN_TIMEOUT": (
        "shutdown_timeout", _parse_seconds, "a number of seconds >= 0 (0: no flush holds vLLM's stop)"
    ),
}

_reported: set[tuple[str, str]] = set()


def warn_bad_value(name: str, raw: str, accepted: str, default: object) -> None:
    """Say once per (variable, value) what is wrong and what is used instead."""
    if (name, raw) in _reported:
        return
    _reported.add((name, raw))
    # `default` is a value, or a phrase such as "the OpenTelemetry SDK default"
    used = default if isinstance(default, str) and " " in default else f"the default {default!r}"
    logger.warning("vllm-frag-otel: ignoring %s=%r: expected %s; using %s.", name, raw, accepted, used)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    defaults = Settings()
    values = {}
    for name, (attr, parse, accepted) in VARIABLES.items():
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[attr] = parse(raw)
        except (ValueError, OverflowError):
            warn_bad_value(name, raw, accepted, getattr(defaults, attr))
    return Settings(**{**defaults.__dict__, **values})


# -- standard OTEL_* variables the OTel SDK would reject by raising ------------------
# The SDK reads them itself; values it cannot use are reported here, naming the
# variable, and hidden from it while the providers are built, so it uses its default.


def _positive_number(raw: str) -> float:
    value = float(raw)
    if not 0 < value < float("inf"):
        raise ValueError
    return value


def _count(raw: str) -> int:
    value = int(raw.strip())
    if value < 0:
        raise ValueError
    return value


_SIGNAL_FORMS = ("", "_METRICS", "_TRACES", "_LOGS")
OTEL_VARIABLES: dict[str, tuple[Callable[[str], object], str]] = {
    **{name: (_positive_number, "a number > 0 (milliseconds)") for name in (
        "OTEL_METRIC_EXPORT_INTERVAL", "OTEL_METRIC_EXPORT_TIMEOUT", "OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_EXPORT_TIMEOUT",
    )},
    **{f"OTEL_EXPORTER_OTLP{form}_TIMEOUT": (_positive_number, "a number > 0 (seconds)") for form in _SIGNAL_FORMS},
    **{f"OTEL_EXPORTER_OTLP{form}_COMPRESSION": (_parse_choice(("gzip", "deflate", "none")), "one of gzip, deflate, none")
       for form in _SIGNAL_FORMS},
    **{f"OTEL_{processor}_{size}": (_parse_positive_int, "a whole number >= 1")
       for processor in ("BSP", "BLRP") for size in ("MAX_QUEUE_SIZE", "MAX_EXPORT_BATCH_SIZE")},
    **{name: (_count, "a whole number >= 0") for name in (
        "OTEL_ATTRIBUTE_COUNT_LIMIT", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
        "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_EVENT_COUNT_LIMIT", "OTEL_SPAN_LINK_COUNT_LIMIT",
        "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT",
    )},
    "OTEL_METRICS_EXEMPLAR_FILTER": (
        _parse_choice(("trace_based", "always_on", "always_off")), "one of trace_based, always_on, always_off"
    ),
}


OTLP_PROTOCOLS = ("grpc", "http/protobuf")
_ENDPOINT_SCHEMES = ("http", "https", "grpc")  # grpc://: vLLM's --otlp-traces-endpoint form


def _otlp_protocol_value(raw: str) -> str:
    value = raw.strip().lower()
    if value not in OTLP_PROTOCOLS:
        raise ValueError
    return value


def _otlp_endpoint(grpc: bool) -> Callable[[str], str]:
    """A URL with an http, https or grpc scheme and a host; for gRPC also host:port."""

    def parse(raw: str) -> str:
        value = raw.strip()
        bare = grpc and "://" not in value  # the gRPC exporter takes host:port as it is
        parts = urlsplit("grpc://" + value if bare else value)
        port = parts.port  # raises ValueError for a port that is not a number in 0-65535
        if parts.scheme.lower() not in _ENDPOINT_SCHEMES or not parts.hostname or " " in value or (
                bare and port is None):
            raise ValueError
        return value

    return parse


ENDPOINT_ACCEPTED = "a URL such as http://collector:4318 (http, https or grpc scheme, and a host)"
NO_ENDPOINT = "no endpoint (telemetry goes to files with VLLM_FRAG_OTEL_EXPORTER=auto)"


def unusable_otlp_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """OTEL_EXPORTER_OTLP_[<SIGNAL>_]ENDPOINT and _PROTOCOL values no exporter can
    use (an endpoint that is not a URL fails at every export); each reported once."""
    env = os.environ if environ is None else environ
    unusable = []
    for form in _SIGNAL_FORMS:
        name = f"OTEL_EXPORTER_OTLP{form}_PROTOCOL"
        raw = env.get(name, "")
        if raw.strip() and not _usable(_otlp_protocol_value, raw):
            warn_bad_value(name, raw, "one of " + ", ".join(OTLP_PROTOCOLS), "http/protobuf")
            unusable.append(name)
    for form in _SIGNAL_FORMS:
        name = f"OTEL_EXPORTER_OTLP{form}_ENDPOINT"
        raw = env.get(name, "")
        if raw.strip() and not _usable(_otlp_endpoint(_grpc(env, form, unusable)), raw):
            instead = f"OTEL_EXPORTER_OTLP_ENDPOINT if that is set, else {NO_ENDPOINT}" if form else NO_ENDPOINT
            warn_bad_value(name, raw, ENDPOINT_ACCEPTED, instead)
            unusable.append(name)
    return unusable


def _usable(parse: Callable[[str], object], raw: str) -> bool:
    try:
        parse(raw)
    except (ValueError, OverflowError):
        return False
    return True


def _grpc(env: Mapping[str, str], form: str, unusable: list[str]) -> bool:
    """The signal (`form`: "" or "_METRICS" ...) is sent over gRPC: its protocol
    variable, else the common one, says so (unusable values aside)."""
    for name in dict.fromkeys((f"OTEL_EXPORTER_OTLP{form}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")):
        raw = env.get(name, "").strip()
        if raw and name not in unusable:
            return raw.lower() == "grpc"
    return False


def unusable_otel_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """The OTEL_* variables set to values the SDK would raise on, or that no
    exporter can use; each reported once."""
    env = os.environ if environ is None else environ
    unusable = unusable_otlp_variables(env)
    # read only while VLLM_FRAG_OTEL_EXPORTER is auto, but a value it cannot take is said whatever that is
    if env.get("OTEL_METRICS_EXPORTER", "").strip() and metrics_exporters(env) is None:
        unusable.append("OTEL_METRICS_EXPORTER")
    for name, (parse, accepted) in OTEL_VARIABLES.items():
        raw = env.get(name)
        if raw is None:
            continue
        try:
            parse(raw)
        except (ValueError, OverflowError):
            warn_bad_value(name, raw, accepted, "the OpenTelemetry SDK default")
            unusable.append(name)
    # the gRPC exporters take only gzip (deflate and none make them raise; HTTP takes all three)
    for form in _SIGNAL_FORMS:
        name = f"OTEL_EXPORTER_OTLP{form}_COMPRESSION"
        raw = env.get(name)
        forms = (form,) if form else ("_METRICS", "_TRACES", "_LOGS")
        if (raw is not None and name not in unusable and raw.strip().lower() not in ("", "gzip")
                and any(_grpc(env, f, unusable) for f in forms)):
            warn_bad_value(name, raw, "gzip with the gRPC protocol", "no compression")
            unusable.append(name)
    # the SDK also requires batch size <= queue size (defaults 512 and 2048), per batch processor
    for processor in ("BSP", "BLRP"):
        batch, queue = f"OTEL_{processor}_MAX_EXPORT_BATCH_SIZE", f"OTEL_{processor}_MAX_QUEUE_SIZE"
        usable = {name: int(env[name]) for name in (batch, queue) if name in env and name not in unusable}
        for name in (batch, queue):
            if usable.get(batch, 512) <= usable.get(queue, 2048):
                break
            if name in usable:
                warn_bad_value(name, env[name], f"a batch size <= the queue size ({batch} <= {queue};"
                               " defaults 512 and 2048)", "the OpenTelemetry SDK default")
                unusable.append(name)
                del usable[name]
    return unusable


# -- Prometheus scrape: OTEL_METRICS_EXPORTER, OTEL_EXPORTER_PROMETHEUS_HOST / _PORT ---------

METRICS_EXPORTERS = ("otlp", PROMETHEUS, "console", "none")  # the OTel spec's values the plugin serves
METRICS_EXPORTER_ACCEPTED = ("a comma list of otlp, prometheus, console, none (at most one of otlp and console; "
                             "none alone), e.g. otlp,prometheus")
PROMETHEUS_HOST = "localhost"  # the OTel spec's defaults
PROMETHEUS_PORT = 9464
PROMETHEUS_PORT_ACCEPTED = "a port number in 1-65535"


def _parse_metrics_exporters(raw: str) -> tuple[str, ...]:
    items = [item.strip().lower() for item in raw.split(",") if item.strip()]
    if (not items or any(item not in METRICS_EXPORTERS for item in items) or len(set(items)) != len(items)
            or ("none" in items and len(items) > 1) or {"otlp", "console"} <= set(items)):
        raise ValueError
    return tuple(items)


def metrics_exporters(environ: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """OTEL_METRICS_EXPORTER as a tuple (e.g. ("otlp", "prometheus")); None when unset or
    unusable (reported once, naming the variable and the accepted values)."""
    env = os.environ if environ is None else environ
    raw = env.get("OTEL_METRICS_EXPORTER", "")
    if not raw.strip():
        return None
    try:
        return _parse_metrics_exporters(raw)
    except ValueError:
        warn_bad_value("OTEL_METRICS_EXPORTER", raw, METRICS_EXPORTER_ACCEPTED, "VLLM_FRAG_OTEL_EXPORTER's choice")
        return None


def _parse_port(raw: str) -> int:
    value = int(raw.strip())
    if not 1 <= value <= 65535:
        raise ValueError
    return value


def _parse_host(raw: str) -> str:
    value = raw.strip()
    if not value or any(c.isspace() or c in "/\x00" for c in value):
        raise ValueError
    return value.strip("[]")  # [::1] -> ::1, as a socket wants it


def prometheus_address(environ: Mapping[str, str] | None = None) -> tuple[str, int]:
    """(host, base port) of the Prometheus endpoint: OTEL_EXPORTER_PROMETHEUS_HOST / _PORT,
    bad values reported once and replaced by the defaults (localhost, 9464)."""
    env = os.environ if environ is None else environ
    address = []
    for name, parse, accepted, default in (
        ("OTEL_EXPORTER_PROMETHEUS_HOST", _parse_host, "a host name or IP address to listen on", PROMETHEUS_HOST),
        ("OTEL_EXPORTER_PROMETHEUS_PORT", _parse_port, PROMETHEUS_PORT_ACCEPTED, PROMETHEUS_PORT),
    ):
        raw = env.get(name, "")
        value = default
        if raw.strip():
            try:
                value = parse(raw)
            except (ValueError, OverflowError):
                warn_bad_value(name, raw, accepted, default)
        address.append(value)
    return address[0], address[1]

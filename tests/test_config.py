"""Settings parsing: every variable, good and bad values (no vLLM needed)."""

from __future__ import annotations

import contextlib
import logging
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_frag_otel import config
from vllm_frag_otel.config import VARIABLES, Settings, load_settings


@contextlib.contextmanager
def _plugin_warnings():
    """The log records the plugin emits meanwhile (hypothesis tests cannot use caplog)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.frag_otel")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_defaults():
    settings = load_settings({})
    assert settings == Settings()
    assert settings.enabled and settings.exporter == "auto"


def test_good_values():
    settings = load_settings({
        "VLLM_FRAG_OTEL_ENABLED": "off",
        "VLLM_FRAG_OTEL_EXPORTER": "OTLP",
        "VLLM_FRAG_OTEL_FILE_DIR": "~/kv",
        "VLLM_FRAG_OTEL_FILE_MAX_BYTES": "1024",
        "VLLM_FRAG_OTEL_FILE_MAX_FILES": "3",
        "VLLM_FRAG_OTEL_MAX_HOOK_ERRORS": "1",
    })
    assert not settings.enabled and settings.exporter == "otlp"
    assert settings.file_dir.endswith("/kv") and not settings.file_dir.startswith("~")
    assert (settings.file_max_bytes, settings.file_max_files, settings.max_hook_errors) == (1024, 3, 1)


@given(name=st.sampled_from(sorted(VARIABLES)), raw=st.text(max_size=30))
def test_any_value_never_raises_and_bad_ones_are_named(name, raw):
    config._reported.clear()
    with _plugin_warnings() as records:
        settings = load_settings({name: raw})
    attr, _, accepted = VARIABLES[name]
    value = getattr(settings, attr)
    if records:
        (record,) = records
        message = record.getMessage()
        assert name in message and accepted in message
        assert value == getattr(Settings(), attr)  # the default
    else:
        assert raw.strip() == "" or value != getattr(Settings(), attr) or _parses_to_default(name, raw)


def _parses_to_default(name: str, raw: str) -> bool:
    attr, parse, _ = VARIABLES[name]
    return parse(raw) == getattr(Settings(), attr)


def test_each_bad_value_is_reported_once(caplog):
    config._reported.clear()
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        load_settings({"VLLM_FRAG_OTEL_FILE_MAX_FILES": "zero"})
        load_settings({"VLLM_FRAG_OTEL_FILE_MAX_FILES": "zero"})
    assert len(caplog.records) == 1


def test_bad_otlp_protocol_is_named(caplog, monkeypatch):
    from vllm_frag_otel.export.telemetry import _otlp_protocol

    config._reported.clear()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        assert config.unusable_otel_variables() == ["OTEL_EXPORTER_OTLP_PROTOCOL"]  # at start-up
        assert _otlp_protocol() == "http/protobuf"  # the exporters fall back, without a word more
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='carrier-pigeon'" in caplog.text and "grpc, http/protobuf" in caplog.text
    assert caplog.text.count("carrier-pigeon") == 1


@pytest.mark.parametrize("raw", ["http/protobuf", "grpc", "GRPC"])
def test_otlp_protocols(monkeypatch, raw):
    from vllm_frag_otel.export.telemetry import _otlp_protocol

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", raw)
    assert _otlp_protocol() == raw.lower()


# OTEL_* variables read on the plugin's path, by the SDK or by the plugin
OTEL_FUZZED = sorted({
    *config.OTEL_VARIABLES,
    "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_METRICS_HEADERS", "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SDK_DISABLED",
    "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "OTEL_EXPORTER_OTLP_INSECURE",
})


@pytest.fixture(scope="module")
def receiver():
    from otlp_receiver import RotelReceiver

    with RotelReceiver() as rx:
        yield rx


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_otel_variables_never_stop_the_plugin(receiver, protocol, data, monkeypatch):
    from vllm_frag_otel.export import telemetry
    from vllm_frag_otel.plugin.hooks import guard

    name = data.draw(st.sampled_from(OTEL_FUZZED))
    # anything an environment can hold (no NUL, no lone surrogates)
    env_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20)
    raw = data.draw(st.one_of(env_text, st.sampled_from(["0", "-1", "1e309", "nan", "abc", "", "5"])))
    endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv(name, raw)
    config._reported.clear()
    with _plugin_warnings() as records:
        # block maps on: the logs pipeline reads its variables too
        runtime = telemetry.Runtime(Settings(exporter="otlp", block_map_interval=3600.0), {}, guard())  # no raise
    assert (runtime.logger_provider is not None) != (os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true")
    # bounded as at engine stop: an example that made the exporters speak TLS to this
    # plaintext receiver would otherwise retry its last export for seconds
    runtime.stop(deadline=time.monotonic() + 0.5)
    if name in config.OTEL_VARIABLES:
        parse, accepted = config.OTEL_VARIABLES[name]
        try:
            parse(raw)
        except (ValueError, OverflowError):
            assert any(name in r.getMessage() and accepted in r.getMessage() for r in records), (name, raw)
    assert os.environ.get(name) == raw  # hidden from the SDK only while it read its configuration


def test_grpc_scheme_endpoint_means_grpc(monkeypatch):
    """vLLM copies --otlp-traces-endpoint grpc://... into OTEL_EXPORTER_OTLP_TRACES_ENDPOINT."""
    from vllm_frag_otel.export.telemetry import _otlp_protocol

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "grpc://collector:4317")
    assert _otlp_protocol("traces") == "grpc"
    assert _otlp_protocol("metrics") == "http/protobuf"
    from vllm_frag_otel.config import Settings
    from vllm_frag_otel.export.telemetry import build_exporter

    exporter = build_exporter(Settings(), "traces")
    assert type(exporter).__module__.startswith("opentelemetry.exporter.otlp.proto.grpc")
    assert exporter._insecure  # plaintext, like vLLM's own span exporter for grpc://
    exporter.shutdown()


def test_the_default_instance_id_is_the_host_and_rank_and_survives_a_restart(monkeypatch):
    """Not a random id per process: a restarted engine continues its series; engines of one
    host differ by their data-parallel rank."""
    import socket

    from vllm_frag_otel.export.telemetry import build_resource

    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    first = build_resource({"vllm.data_parallel.rank": 1}).attributes["service.instance.id"]
    assert first == build_resource({"vllm.data_parallel.rank": 1}).attributes["service.instance.id"]
    assert first == f"{socket.gethostname()}-dp1"
    assert build_resource({}).attributes["service.instance.id"] == f"{socket.gethostname()}-dp0"


def test_operator_resource_attributes_win(monkeypatch):
    from vllm_frag_otel.export.telemetry import build_resource

    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=replica-7,vllm.model.name=m")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "llm-gateway")
    resource = build_resource({"vllm.model.name": "from-engine", "vllm.data_parallel.rank": 1})
    assert resource.attributes["service.instance.id"] == "replica-7"
    assert resource.attributes["vllm.model.name"] == "m"
    assert resource.attributes["service.name"] == "llm-gateway"
    assert resource.attributes["vllm.data_parallel.rank"] == 1


@pytest.mark.parametrize("name", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                                  "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"])
def test_an_endpoint_that_is_not_a_url_is_reported_once_at_start_up(name, monkeypatch, tmp_path, caplog):
    """Not at every export: the plugin leaves it out (files instead, with the exporter on auto)."""
    from vllm_frag_otel.export import telemetry
    from vllm_frag_otel.plugin.hooks import guard

    monkeypatch.setenv(name, "not-a-url")
    config._reported.clear()
    with caplog.at_level(logging.WARNING):
        runtime = telemetry.Runtime(Settings(file_dir=str(tmp_path), block_map_interval=3600.0), {}, guard())
        for _ in range(3):
            runtime.force_flush()
        runtime.shutdown()
    mentions = [r.getMessage() for r in caplog.records if "not-a-url" in r.getMessage()]
    assert len(mentions) == 1 and f"ignoring {name}='not-a-url': expected a URL" in mentions[0], mentions
    assert os.environ[name] == "not-a-url"  # hidden from the SDK only while it read its configuration
    assert list(tmp_path.glob("metrics-*.jsonl"))


@pytest.mark.parametrize("env, unusable", [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, []),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "grpc://collector:4317"}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}, ["OTEL_EXPORTER_OTLP_ENDPOINT"]),  # not a URL for HTTP
    ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://collector:99999"}, ["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"]),
    ({"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "https://"}, ["OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "carrier-pigeon"}, ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]),
])
def test_otlp_endpoints_and_protocols_are_checked(env, unusable):
    config._reported.clear()
    with _plugin_warnings() as records:
        assert config.unusable_otel_variables(env) == unusable
    assert [name for name in unusable if any(f"ignoring {name}=" in r.getMessage() for r in records)] == unusable


# -- the Prometheus scrape option ------------------------------------------------------------

@pytest.mark.parametrize("raw, value", [
    ("prometheus", "prometheus"), ("OTLP, Prometheus", "otlp,prometheus"), ("prometheus,file", "file,prometheus"),
    ("none,prometheus", "none,prometheus"), ("auto,prometheus", "auto,prometheus"), (" Console ", "console"),
])
def test_exporter_lists(raw, value):
    config._reported.clear()
    assert load_settings({"VLLM_FRAG_OTEL_EXPORTER": raw}).exporter == value


@pytest.mark.parametrize("raw", ["otlp,file", "prometheus,prometheus", "grafana", ",", "prometheus;otlp"])
def test_a_bad_exporter_list_is_named_with_the_accepted_values(raw, caplog):
    config._reported.clear()
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        assert load_settings({"VLLM_FRAG_OTEL_EXPORTER": raw}).exporter == "auto"
    (record,) = caplog.records
    assert f"ignoring VLLM_FRAG_OTEL_EXPORTER={raw!r}: expected {config.EXPORTER_ACCEPTED}; using the default 'auto'" \
        in record.getMessage()
    assert "otlp,prometheus" in record.getMessage()


@pytest.mark.parametrize("exporter, standard, endpoint, expected", [
    # (VLLM_FRAG_OTEL_EXPORTER, OTEL_METRICS_EXPORTER, an OTLP endpoint?) -> (metrics pushed to, spans to, served?)
    ("prometheus", None, False, ("none", "file", True)),
    ("prometheus", None, True, ("none", "otlp", True)),
    ("otlp,prometheus", None, False, ("otlp", "otlp", True)),
    ("file,prometheus", None, True, ("file", "file", True)),
    ("none,prometheus", None, True, ("none", "none", True)),
    ("auto", "prometheus", False, ("none", "file", True)),
    ("auto", "otlp,prometheus", True, ("otlp", "otlp", True)),
    ("auto", "console", False, ("console", "file", False)),
    ("auto", "none", True, ("none", "otlp", False)),
    ("auto", None, True, ("otlp", "otlp", False)),
    ("file", "prometheus", False, ("file", "file", False)),  # the plugin's own variable, when set, wins
])
def test_which_exporters_serve_and_push(monkeypatch, exporter, standard, endpoint, expected):
    from vllm_frag_otel.export.telemetry import exporter_choice, serves_prometheus

    for name in ("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    if standard is not None:
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", standard)
    if endpoint:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    settings = Settings(exporter=exporter)
    assert (exporter_choice(settings, "metrics"), exporter_choice(settings, "traces"),
            serves_prometheus(settings)) == expected


@pytest.mark.parametrize("raw", ["otlp,console", "none,prometheus", "prometheus,prometheus", "zipkin", "logging"])
def test_a_bad_otel_metrics_exporter_is_named_once(raw, caplog):
    config._reported.clear()
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        for _ in range(3):
            assert config.metrics_exporters({"OTEL_METRICS_EXPORTER": raw}) is None
    (record,) = caplog.records
    assert f"ignoring OTEL_METRICS_EXPORTER={raw!r}: expected {config.METRICS_EXPORTER_ACCEPTED}" in record.getMessage()
    assert "VLLM_FRAG_OTEL_EXPORTER's choice" in record.getMessage()


def test_a_bad_otel_metrics_exporter_is_said_at_start_up_whatever_the_plugins_exporter(caplog):
    """VLLM_FRAG_OTEL_EXPORTER=file means OTEL_METRICS_EXPORTER is not read: a value it could
    never take is said all the same, as VLLM_FRAG_OTEL_EXPORTER's own would be."""
    config._reported.clear()
    env = {"OTEL_METRICS_EXPORTER": "foo", "VLLM_FRAG_OTEL_EXPORTER": "file"}
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        assert config.unusable_otel_variables(env) == ["OTEL_METRICS_EXPORTER"]
        assert config.unusable_otel_variables({**env, "OTEL_METRICS_EXPORTER": "otlp,prometheus"}) == []
    (record,) = caplog.records
    assert f"ignoring OTEL_METRICS_EXPORTER='foo': expected {config.METRICS_EXPORTER_ACCEPTED}" in record.getMessage()


@pytest.mark.parametrize("env, address, bad", [
    ({}, ("localhost", 9464), []),
    ({"OTEL_EXPORTER_PROMETHEUS_HOST": "0.0.0.0", "OTEL_EXPORTER_PROMETHEUS_PORT": " 8000 "}, ("0.0.0.0", 8000), []),
    ({"OTEL_EXPORTER_PROMETHEUS_HOST": "[::]"}, ("::", 9464), []),
    ({"OTEL_EXPORTER_PROMETHEUS_PORT": "0"}, ("localhost", 9464), ["OTEL_EXPORTER_PROMETHEUS_PORT"]),
    ({"OTEL_EXPORTER_PROMETHEUS_PORT": "65536"}, ("localhost", 9464), ["OTEL_EXPORTER_PROMETHEUS_PORT"]),
    ({"OTEL_EXPORTER_PROMETHEUS_PORT": "9464.5"}, ("localhost", 9464), ["OTEL_EXPORTER_PROMETHEUS_PORT"]),
    ({"OTEL_EXPORTER_PROMETHEUS_HOST": "http://x/"}, ("localhost", 9464), ["OTEL_EXPORTER_PROMETHEUS_HOST"]),
])
def test_prometheus_host_and_port(env, address, bad, caplog):
    config._reported.clear()
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        assert config.prometheus_address(env) == address
    assert [name for name in env if any(f"ignoring {name}=" in r.getMessage() for r in caplog.records)] == bad


def test_the_readme_configuration_table_lists_every_variable():
    """The README's Configuration table: one row per VLLM_FRAG_OTEL_* variable, each default as
    Settings has it; the Prometheus variables are documented in the same section."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(VLLM_FRAG_OTEL_[A-Z_]+)` \| ([^|]+) \|", section, re.M))
    assert set(rows) == set(VARIABLES)
    defaults = Settings()
    for name, (attr, _, _) in VARIABLES.items():
        default = getattr(defaults, attr)
        if name != "VLLM_FRAG_OTEL_FILE_DIR" and not isinstance(default, bool):
            assert f"`{default:g}`" in rows[name] if isinstance(default, float) else f"`{default}`" in rows[name], name
    for name in ("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_PROMETHEUS_HOST", "OTEL_EXPORTER_PROMETHEUS_PORT",
                 "vllm-frag-otel[prometheus]", "### Prometheus scrape (no Collector)"):
        assert name in section, name


@pytest.mark.parametrize("env, unusable", [
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_COMPRESSION": "none"}, ["OTEL_EXPORTER_OTLP_COMPRESSION"]),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_COMPRESSION": "GZIP"}, []),
    ({"OTEL_EXPORTER_OTLP_COMPRESSION": "deflate"}, []),  # OTLP/HTTP takes deflate and none
    ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION": "none"}, []),
    ({"OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION": "Deflate"},
     ["OTEL_EXPORTER_OTLP_LOGS_COMPRESSION"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_COMPRESSION": "none"},
     ["OTEL_EXPORTER_OTLP_COMPRESSION"]),  # the common one reaches the gRPC span exporter
])
def test_compression_the_grpc_exporters_would_raise_on_is_named(env, unusable):
    """The gRPC exporters raise at construction on anything but gzip (found by the fuzzed test)."""
    config._reported.clear()
    with _plugin_warnings() as records:
        assert config.unusable_otel_variables(env) == unusable
    for name in unusable:
        assert any(f"ignoring {name}=" in r.getMessage() and "gzip with the gRPC protocol" in r.getMessage()
                   for r in records)


def test_region_metric_variables():
    """Off by default with 32 regions; 1-1024 regions accepted."""
    assert (Settings().region_metric, Settings().regions) == (False, 32)
    settings = load_settings({"VLLM_FRAG_OTEL_REGION_METRIC": "on", "VLLM_FRAG_OTEL_REGIONS": " 1024 "})
    assert (settings.region_metric, settings.regions) == (True, 1024)
    assert load_settings({"VLLM_FRAG_OTEL_REGIONS": "1"}).regions == 1
    config._reported.clear()
    assert load_settings({"VLLM_FRAG_OTEL_REGIONS": "1025"}).regions == 32
    assert load_settings({"VLLM_FRAG_OTEL_REGIONS": "-3"}).regions == 32

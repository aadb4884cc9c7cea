"""Settings parsing: every variable, good and bad values (no vLLM needed)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_frag_otel import config
from vllm_frag_otel.config import VARIABLES, Settings, load_settings


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
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("vllm.frag_otel").addHandler(handler)
    try:
        settings = load_settings({name: raw})
    finally:
        logging.getLogger("vllm.frag_otel").removeHandler(handler)
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
    from vllm_frag_otel.telemetry import _otlp_protocol

    config._reported.clear()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        assert _otlp_protocol() == "http/protobuf"
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='carrier-pigeon'" in caplog.text and "grpc, http/protobuf" in caplog.text


@pytest.mark.parametrize("raw", ["http/protobuf", "grpc", "GRPC"])
def test_otlp_protocols(monkeypatch, raw):
    from vllm_frag_otel.telemetry import _otlp_protocol

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", raw)
    assert _otlp_protocol() == raw.lower()

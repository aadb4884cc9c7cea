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

logger = logging.getLogger("vllm.frag_otel")

EXPORTERS = ("auto", "otlp", "file", "console", "none")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
T = TypeVar("T")


def _default_file_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vllm-frag-otel", "telemetry")


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


def _parse_positive_int(raw: str) -> int:
    value = int(raw.strip())
    if value < 1:
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
    "VLLM_FRAG_OTEL_EXPORTER": ("exporter", _parse_choice(EXPORTERS), "one of " + ", ".join(EXPORTERS)),
    "VLLM_FRAG_OTEL_FILE_DIR": ("file_dir", _parse_dir, "a directory path"),
    "VLLM_FRAG_OTEL_FILE_MAX_BYTES": ("file_max_bytes", _parse_positive_int, "a whole number of bytes >= 1"),
    "VLLM_FRAG_OTEL_FILE_MAX_FILES": ("file_max_files", _parse_positive_int, "a whole number >= 1"),
    "VLLM_FRAG_OTEL_MAX_HOOK_ERRORS": ("max_hook_errors", _parse_positive_int, "a whole number >= 1"),
    "VLLM_FRAG_OTEL_SPANS": ("spans", _parse_bool, "one of " + ", ".join(_TRUE + _FALSE)),
    "VLLM_FRAG_OTEL_MAX_OPEN_SPANS": ("max_open_spans", _parse_positive_int, "a whole number >= 1"),
}

_reported: set[tuple[str, str]] = set()


def warn_bad_value(name: str, raw: str, accepted: str, default: object) -> None:
    """Say once per (variable, value) what is wrong and what is used instead."""
    if (name, raw) in _reported:
        return
    _reported.add((name, raw))
    logger.warning(
        "vllm-frag-otel: ignoring %s=%r: expected %s; using the default %r.", name, raw, accepted, default
    )


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

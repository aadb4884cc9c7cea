"""Test-side helpers that are not part of the plugin."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def closed_port() -> int:
    """A loopback port nothing listens on (a refused collector)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (fresh plugin state), capturing output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def scheduler_trace(scheduler_output) -> tuple:
    """Everything a scheduler step decided, in a comparable form."""
    new = tuple(
        (r.req_id, tuple(tuple(ids) for ids in r.block_ids), r.num_computed_tokens)
        for r in scheduler_output.scheduled_new_reqs
    )
    cached = scheduler_output.scheduled_cached_reqs
    running = (
        tuple(cached.req_ids),
        tuple(tuple(tuple(ids) for ids in b) if b is not None else None for b in cached.new_block_ids),
        tuple(cached.num_computed_tokens),
    )
    return (
        new,
        running,
        tuple(sorted(scheduler_output.num_scheduled_tokens.items())),
        tuple(sorted(scheduler_output.preempted_req_ids or ())),
        tuple(sorted(scheduler_output.finished_req_ids)),
    )


def simulate_into(out: Path, args: list[str], export_every: int) -> Path:
    """`vllm-frag-otel simulate ARGS --output OUT` in a clean environment (no OTEL_* or plugin
    settings of the caller's), exporting every `export_every` steps and not on a timer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VLLM_FRAG_OTEL_"))}
    env.update({"OTEL_METRIC_EXPORT_INTERVAL": "600000"})
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_frag_otel.cli", "simulate", *args, "--export-every", str(export_every),
         "--output", str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def trace_spans(run: Path) -> Iterator[dict]:
    """Every span, as OTLP/JSON, of a run's telemetry/traces-*.jsonl files."""
    for path in (run / "telemetry").glob("traces-*.jsonl"):
        for line in path.read_text().splitlines():
            for rs in json.loads(line)["resourceSpans"]:
                for ss in rs["scopeSpans"]:
                    yield from ss["spans"]

"""The command line never hangs, never loses data silently, and what it shows is right."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import REPO

from vllm_frag_otel import cli, otlp_json
from vllm_frag_otel.summary import render

TINY = ["--num-requests", "6", "--num-blocks", "64", "--max-num-seqs", "4", "--workload", "alpaca"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VLLM_FRAG_OTEL_"))}
    env.update(extra)
    return env


def _simulate(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_frag_otel.cli", "simulate", *args], env=_env(**env),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


# -- 1. a collector that is down does not hold the run; --output always gets the files ------

def test_an_unreachable_collector_neither_stalls_the_run_nor_takes_the_files(tmp_path):
    started = time.monotonic()
    proc = _simulate(*TINY, "--output", str(tmp_path), OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {p.name.split("-")[0] for p in (tmp_path / "telemetry").glob("*.jsonl")}
    assert {"metrics", "traces"} <= files
    assert json.loads((tmp_path / "summary.json").read_text())["partial"] is False
    assert time.monotonic() - started < 100


@pytest.fixture
def black_hole():
    """A collector that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for connection in held:
        connection.close()


def test_a_collector_that_never_answers_does_not_stall_the_run(black_hole):
    started = time.monotonic()
    proc = _simulate(*TINY, OTEL_EXPORTER_OTLP_ENDPOINT=black_hole)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 requests in" in proc.stdout
    assert time.monotonic() - started < 75  # vLLM loads in 10-20 s; the exports wait 0.5 s once, 5 s at the end


# -- 2. an unwritable telemetry directory is an error, not silence ---------------------------

def test_an_unwritable_telemetry_directory_is_a_one_line_error():
    proc = _simulate(*TINY, timeout=60, VLLM_FRAG_OTEL_FILE_DIR="/proc/nope")
    assert proc.returncode == 2
    assert "/proc/nope" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_file_exporter_warns_once_and_counts_what_it_could_not_write(caplog):
    exporter = otlp_json.OTLPJsonFileSpanExporter("/proc/nope/telemetry", 1 << 20, 2)
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        for _ in range(3):
            exporter.export([])
    assert exporter.write_errors == 3
    warnings = [r.getMessage() for r in caplog.records if "/proc/nope" in r.getMessage()]
    assert len(warnings) == 1 and "No such file" in warnings[0]


# -- 3, 13, 16. what a run with OTEL_SDK_DISABLED prints --------------------------------------

@pytest.fixture(scope="module")
def disabled_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("disabled")
    proc = _simulate(*TINY, "--output", str(out), OTEL_SDK_DISABLED="true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_disabled_telemetry_is_said_so_not_pointed_at(disabled_run):
    out, stdout = disabled_run
    last = stdout.strip().splitlines()[-1]
    assert "disabled by OTEL_SDK_DISABLED" in last and str(out / "telemetry") not in last
    assert not (out / "telemetry").exists() or not any((out / "telemetry").iterdir())


def test_used_cached_and_free_blocks_add_up_to_the_pool(disabled_run):
    _, stdout = disabled_run
    rows = {line[:30].strip(): line[30:].split() for line in stdout.splitlines() if line.startswith("  ")}
    free = next(cells for label, cells in rows.items() if label.startswith("free blocks"))
    total = float(rows["used blocks"][0]) + float(rows["cached blocks (evictable)"][0]) + float(free[0])
    assert total == pytest.approx(63, abs=0.2)  # 64 blocks, less vLLM's null block


def test_zero_counts_read_as_words():
    zero = {"mean": 0.0, "p50": 0.0, "max": 0.0, "final": 0.0}
    stats = {name: dict(zero) for name in cli.field_statistics.__globals__["FIELDS"]}
    stats["preemptions"]["final"] = 3.0
    text = render(stats, 10, 16)
    assert "n/a" not in text.split("evictions", 1)[1].splitlines()[0]
    assert "there were 3 preemptions" in text and "requests were preempted" not in text


# -- 4. Ctrl-C keeps what ran ---------------------------------------------------------------

def test_ctrl_c_writes_a_partial_summary_and_exits_130(tmp_path):
    args = [sys.executable, "-m", "vllm_frag_otel.cli", "simulate", "--workload", "sharegpt", "--num-requests",
            "4000", "--num-blocks", "512", "--export-every", "1", "--block-map-every", "0", "--output", str(tmp_path)]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "telemetry").glob("metrics-*.jsonl")):  # stepping, exporting every step
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started stepping"
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["partial"] is True and 0 < summary["steps"] and summary["finished_requests"] < 4000
    assert "interrupted" in stdout


# -- 7. output paths that cannot be used ------------------------------------------------------

@pytest.mark.parametrize("command", [["simulate", *TINY, "--output", "{file}"],
                                     ["report", "{file}", "--output", "{file}"],
                                     ["report", "{file}", "--output", "/proc/nope"]])
def test_an_unusable_output_is_a_one_line_error(command, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    argv = [part.replace("{file}", str(a_file)) for part in command]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    path = argv[-1]
    assert len(err.splitlines()) == 1 and path in err and ("not a directory" in err or "No such file" in err)


# -- 8. version, defaults in the help, sweep lists without --sweep ---------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and "vllm-frag-otel 0." in capsys.readouterr().out


def test_the_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["simulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default 2048)", "(default 16)", "(default 128)", "(default sharegpt)"):
        assert default in text


@pytest.mark.parametrize("flag", [["--sweep-num-blocks", "64,128"], ["--sweep-grid"]])
def test_a_sweep_list_without_sweep_is_an_error(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["simulate", *flag])
    assert exit_.value.code == 2 and flag[0] in capsys.readouterr().err

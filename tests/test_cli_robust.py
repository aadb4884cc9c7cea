"""The command line never hangs, never loses data silently, and what it shows is right."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import REPO, closed_port

from vllm_frag_otel import cli
from vllm_frag_otel.export import otlp_json
from vllm_frag_otel.analysis.summary import render

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
    # the files are --output's choice, not a missing endpoint: the log says which
    assert "VLLM_FRAG_OTEL_EXPORTER=file; writing KV-cache telemetry" in proc.stderr, proc.stderr[-3000:]
    assert "no OTLP endpoint configured" not in proc.stderr
    files = {p.name.split("-")[0] for p in (tmp_path / "telemetry").glob("*.jsonl")}
    assert {"metrics", "traces"} <= files
    assert json.loads((tmp_path / "summary.json").read_text())["partial"] is False
    assert time.monotonic() - started < 100


def test_a_refused_collector_is_one_warning_not_a_line_per_retry():
    """The OTLP exporters log each failed attempt of each export; with the collector down
    that would be a line per retry for as long as it stays down. One warning names the
    failure, the stop says what was lost, and no raw retry line is left."""
    proc = _simulate(*TINY, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len([line for line in lines if "cannot deliver to the OTLP collector" in line]) == 1, proc.stderr[-3000:]
    raw = ("Transient error", "Failed to export", "Shutdown in progress", "Exporter already shutdown")
    assert not [line for line in lines if line.startswith(raw)], proc.stderr[-3000:]
    assert "could not be delivered" in proc.stderr, proc.stderr[-3000:]


def test_vllms_missing_kernels_warning_stays_off_the_terminal():
    """vLLM's CPU wheel warns at import that vllm._C is missing; the simulator never runs a kernel."""
    proc = _simulate(*TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 requests in" in proc.stdout
    assert "vllm._C" not in proc.stderr, proc.stderr[-3000:]


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


def test_used_cached_and_empty_blocks_add_up_to_the_pool(disabled_run):
    _, stdout = disabled_run
    rows = {line[:30].strip(): line[30:].split() for line in stdout.splitlines() if line.startswith("  ")}
    total = float(rows["used blocks"][0]) + float(rows["cached blocks (evictable)"][0]) + float(rows["empty blocks"][0])
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
    env = {**_env(), "PYTHONFAULTHANDLER": "1"}  # on SIGABRT, every thread's stack goes to stderr
    # as in a terminal: a runner started in the background (`cmd &` in a script) ignores SIGINT,
    # and a child inherits that; Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "telemetry").glob("metrics-*.jsonl")):  # stepping, exporting every step
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started stepping"
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # say where it hung
            proc.send_signal(signal.SIGABRT)
            stderr = proc.communicate(timeout=30)[1]
            pytest.fail(f"no exit within 60 s of Ctrl-C; where every thread was:\n{stderr[-8000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["partial"] is True and 0 < summary["steps"] and summary["finished_requests"] < 4000
    assert "interrupted" in stdout
    # and its report says it covers an interrupted run
    assert cli.main(["report", str(tmp_path), "--output", str(tmp_path / "report"), "--no-plots"]) == 0
    text = (tmp_path / "report" / "summary.txt").read_text()
    assert (f"caveat: the simulator run in {tmp_path} was interrupted after {summary['steps']} steps, with"
            f" {summary['finished_requests']} requests finished") in text, text[:3000]


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


# -- 5. rotation that deletes files says so, once ---------------------------------------------

def test_rotation_warns_once_when_it_starts_deleting_files(tmp_path, caplog):
    lines = otlp_json.RotatingJsonLines(str(tmp_path), "metrics", max_bytes=30, max_files=2)
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        for _ in range(6):
            lines.write("x" * 25)  # one line per file
    lines.close()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert str(tmp_path) in warning
    assert "VLLM_FRAG_OTEL_FILE_MAX_FILES=2" in warning and "VLLM_FRAG_OTEL_FILE_MAX_BYTES=30" in warning
    assert len(list(tmp_path.glob("metrics-*.jsonl"))) == 2 and lines.deleted_files == 4


def test_rotation_within_the_limits_says_nothing(tmp_path, caplog):
    lines = otlp_json.RotatingJsonLines(str(tmp_path), "metrics", max_bytes=30, max_files=3)
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        for _ in range(3):
            lines.write("x" * 25)
    lines.close()
    assert not caplog.records and len(list(tmp_path.glob("metrics-*.jsonl"))) == 3


# -- 6. OTLP values no exporter can use: one line each, at start-up ---------------------------

def test_unusable_otlp_values_are_one_line_each_at_start_up(tmp_path):
    bad = {"OTEL_EXPORTER_OTLP_ENDPOINT": "not-a-url", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}
    proc = _simulate(*TINY, "--export-every", "1", "--output", str(tmp_path), **bad)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, raw in bad.items():
        (line,) = [line for line in proc.stderr.splitlines() if f"{name}={raw!r}" in line]  # once, for 30+ exports
        assert line.startswith("warning: ") and f"ignoring {name}={raw!r}: expected" in line
    assert "Traceback" not in proc.stderr and "Failed to export" not in proc.stderr
    assert {p.name.split("-")[0] for p in (tmp_path / "telemetry").glob("*.jsonl")} >= {"metrics", "traces"}


# -- 9, 11. a trace longer than the model; simulated time -------------------------------------

@pytest.fixture(scope="module")
def long_trace_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("long-trace")
    trace = base / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(line) for line in [
        {"prompt_len": 99999, "output_len": 4},  # its prompt cut to 511 tokens, its output to 1
        {"prompt_len": 100, "output_len": 5000},  # its output cut to 412
        {"prompt_len": 40, "output_len": 30, "arrival_time": 0.5},
        {"prompt_len": 60, "output_len": 20, "arrival_time": 1.0},
    ]) + "\n")
    out = base / "out"
    proc = _simulate("--workload-file", str(trace), "--max-model-len", "512", "--num-blocks", "128", "--max-num-seqs",
                     "4", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return trace, out, proc.stdout


def test_cut_requests_are_counted_and_said(long_trace_run):
    trace, out, stdout = long_trace_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["max_model_len"] == 512
    assert summary["cut_requests"] == {"max_model_len": 512, "requests": 2, "prompts": 1,
                                       "prompt_tokens": 99999 - 511, "outputs": 2,
                                       "output_tokens": (4 - 1) + (5000 - 412)}
    (line,) = [line for line in stdout.splitlines() if "were cut" in line]
    assert f"2 requests of {trace}" in line and "model length of 512 tokens" in line
    assert f"1 prompt to 511 tokens ({99999 - 511} tokens cut in all)" in line
    assert f"2 outputs to what the model length left ({3 + 4588} tokens cut in all)" in line


def test_a_model_length_the_pool_cannot_hold_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["simulate", "--num-blocks", "10", "--max-model-len", "4096"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--max-model-len 4096" in err and "at most 144 tokens" in err


def test_the_run_says_simulated_and_wall_clock_time_apart(long_trace_run):
    _, out, stdout = long_trace_run
    summary = json.loads((out / "summary.json").read_text())
    steps, simulated, wall = summary["steps"], summary["simulated_seconds"], summary["wall_seconds"]
    assert simulated == pytest.approx(steps * 0.02) and simulated > 1.0  # the last request arrives at 1 s
    (line,) = [line for line in stdout.splitlines() if "scheduler steps:" in line]
    assert f"4 requests in {steps} scheduler steps: {simulated:.1f} s of simulated time (0.02 s per step)," \
           f" {wall:.1f} s of wall-clock time" in line


def test_the_report_of_a_simulation_is_in_simulated_seconds(long_trace_run, tmp_path, capsys):
    _, out, _ = long_trace_run
    summary = json.loads((out / "summary.json").read_text())
    (clock_file,) = (out / "telemetry").glob("clock-*.csv")
    assert summary["clock_file"] == str(clock_file)
    rows = clock_file.read_text().splitlines()[2:]
    assert len(rows) == summary["steps"]
    assert float(rows[-1].split(",")[1]) == pytest.approx(summary["simulated_seconds"])
    assert cli.main(["report", str(out), "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"simulated time from {clock_file}" in printed
    assert "time: simulated seconds (scheduler steps x 0.02 s" in printed
    from vllm_frag_otel.analysis import otlp_read
    from vllm_frag_otel.analysis import report
    from vllm_frag_otel.sim import simclock

    telemetry = otlp_read.read([out])
    clocks = report.match_clocks(telemetry, simclock.find([out], []), 0)
    (pool,) = telemetry.pools()
    r = report.pool_report(telemetry, pool, 0, several=False, clock=clocks.of(pool.instance))
    seconds = r.quantities["used_blocks"].seconds
    # exports every 10 steps: at 0.2, 0.4 ... simulated seconds, the last at the end of the run
    assert seconds[0] == pytest.approx(0.2, abs=0.021)
    assert seconds[-1] == pytest.approx(summary["simulated_seconds"], abs=0.021)
    assert all(c.panels[0].xlabel == "simulated seconds (steps x 0.02 s)" for c in report.charts(r)
               if c.name in ("block_states", "fragmentation", "block_layout"))
    with open(tmp_path / "series.csv", newline="") as fh:  # its seconds are simulated too
        last = max(float(row["seconds"]) for row in csv.DictReader(fh))
    assert last == pytest.approx(summary["simulated_seconds"], abs=0.021)


def test_a_clock_file_of_a_run_stopped_before_its_first_step_says_so(tmp_path):
    """A simulate interrupted before its first step leaves the clock's two header lines: the
    report's note says what happened, not that the file is malformed."""
    from vllm_frag_otel.jsonlines import InputProblem
    from vllm_frag_otel.sim import simclock

    path = tmp_path / "clock-1-1.csv"
    path.write_text(f"{simclock.COMMENT} host=h pid=1 step_seconds=0.02\n{simclock.HEADER}\n")
    problems: list[InputProblem] = []
    assert simclock.find([tmp_path], problems) == []
    (problem,) = problems
    assert "stopped before its first step" in str(problem) and "not a simulator clock file" not in str(problem)


# -- a long set-up shows progress --------------------------------------------------------------

def test_building_the_requests_shows_progress_before_the_first_step(plugin):
    """Building vLLM's Requests hashes every prompt (tens of seconds for 300k requests): the
    `building` bar counts them, in steps, all of them before the first scheduler step."""
    from vllm_frag_otel.sim import simulator as sim
    from vllm_frag_otel.sim import workloads

    specs = workloads.generate("alpaca", 2100, seed=1)
    shape = sim.EngineShape(num_blocks=64, max_num_seqs=4)
    built: list[int] = []

    class Bar:
        def update(self, n: int) -> None:
            built.append(n)

    def stop_at_first_step(steps: int) -> None:
        assert sum(built) == len(specs)
        raise KeyboardInterrupt

    sim.run_workload(shape, specs, on_step=stop_at_first_step, keep_partial=True, building=Bar())
    assert built[:2] == [1024, 1024] and sum(built) == len(specs)


# -- Ctrl-C inside the run: the steps so far, from run_workload itself -------------------------

def test_run_workload_returns_what_ran_before_an_interrupt(plugin):
    from vllm_frag_otel.sim import simulator as sim
    from vllm_frag_otel.sim import workloads

    specs = workloads.generate("alpaca", 20, seed=1)
    shape = sim.EngineShape(num_blocks=64, max_num_seqs=4)

    def interrupt_at(steps: int) -> None:
        if steps == 7:
            raise KeyboardInterrupt

    result = sim.run_workload(shape, specs, on_step=interrupt_at, keep_partial=True)
    assert result.interrupted and result.steps == len(result.snapshots) == len(result.scheduled_tokens) == 7
    assert result.latency_steps.size < len(specs)
    with pytest.raises(KeyboardInterrupt):
        sim.run_workload(shape, specs, on_step=interrupt_at)  # a sweep must not take a partial run for a whole one


# -- one form of error, the usage of the command it is about, and exit statuses ---------------

@pytest.mark.parametrize(("argv", "usage", "message"), [
    (["simulate", "--num-blocks", "1"], "simulate", "--num-blocks must be >= 2 (block 0 is vLLM's null block)"),
    (["simulate", "--step-seconds", "0"], "simulate", "--step-seconds must be > 0"),
    (["simulate", "--num-blocks", "many"], "simulate", "argument --num-blocks: invalid int value: 'many'"),
    (["report", "--smooth", "-1"], "report", "--smooth must be >= 0 (exports in the rolling mean; 0: none)"),
])
def test_a_usage_error_shows_its_commands_usage_and_the_one_error_prefix(argv, usage, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert lines[0].startswith(f"usage: vllm-frag-otel {usage} ")
    assert lines[-1] == f"vllm-frag-otel: error: {message}"


def test_the_help_names_the_exit_statuses(capsys):
    for command in (["--help"], ["simulate", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(command)
        text = " ".join(capsys.readouterr().out.split())
        assert "exit status: 0 done" in text and "; 1 the command could not run here" in text
        assert "; 2 a wrong option or input" in text and "; 130 interrupted" in text


def test_an_input_that_is_not_there_is_a_usage_error_not_a_failure(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert cli.main(["report", str(missing), "--output", str(tmp_path / "out"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: no such file or directory" in err
    assert [line for line in err.splitlines() if "error" in line][0].startswith(
        f"vllm-frag-otel: error: no vllm.kv_cache metrics in {missing}")


def test_a_write_that_fails_midway_is_a_runtime_failure(tmp_path, capsys, monkeypatch):
    def disk_full(paths, out, **kwargs):
        raise OSError(28, "No space left on device", str(out / "series.csv"))

    monkeypatch.setattr(cli.reporting, "build", disk_full)
    assert cli.main(["report", str(tmp_path), "--output", str(tmp_path / "out"), "--no-plots"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"vllm-frag-otel: error: {tmp_path / 'out' / 'series.csv'}: No space left on device"


def test_a_missing_package_is_a_runtime_failure_in_the_one_error_form(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_absent", lambda *modules: list(modules))
    assert cli.main(["report"]) == 1
    assert capsys.readouterr().err.startswith("vllm-frag-otel: error: report needs the report extra for its charts")


def test_vllm_not_loading_the_plugin_is_a_runtime_failure():
    proc = _simulate(*TINY, VLLM_FRAG_OTEL_ENABLED="false")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "vllm-frag-otel: error: vLLM did not load the frag_otel plugin" in proc.stderr


# -- workload files: a directory, a bad record ----------------------------------------------

def test_a_workload_file_that_is_a_directory_says_so(tmp_path, capsys):
    (tmp_path / "workload.jsonl").write_text(json.dumps({"prompt_len": 4, "output_len": 2}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["simulate", "--workload-file", str(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2
    assert error == (f"vllm-frag-otel: error: --workload-file {tmp_path}: is a directory, expected a JSON-lines file"
                     f" with one request per line; this one holds a report's {tmp_path / 'workload.jsonl'}")


def test_a_workload_record_with_a_negative_arrival_time_is_refused(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"arrival_time": 0.5, "prompt_len": 10, "output_len": 3}) + "\n"
                     + json.dumps({"arrival_time": -1, "prompt_len": 10, "output_len": 3}) + "\n")
    # refused before vLLM is loaded: no telemetry, nothing run
    assert cli.main(["simulate", "--workload-file", str(trace)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"vllm-frag-otel: error: {trace}:2: arrival_time must be a number of seconds >= 0, got -1",
        f"vllm-frag-otel: error: {trace}: no request replayed (fix the lines named above)",
    ]
    assert captured.out == ""


def test_bad_settings_are_warning_lines_of_one_form_before_vllm_loads(monkeypatch, capsys):
    """The plugin's own variable and the standard one it reads: both said, in the same form, and
    the standard one left out of the run, as the plugin leaves it out."""
    from vllm_frag_otel import config

    config._reported.clear()
    monkeypatch.setenv("VLLM_FRAG_OTEL_EXPORTER", "bogus")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "foo")
    cli._report_unusable_settings()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("=")[0] for line in lines] == ["warning: vllm-frag-otel: ignoring VLLM_FRAG_OTEL_EXPORTER",
                                                      "warning: vllm-frag-otel: ignoring OTEL_METRICS_EXPORTER"]
    assert "expected one of auto, otlp, file" in lines[0] and "expected a comma list of otlp, prometheus" in lines[1]
    assert "OTEL_METRICS_EXPORTER" not in os.environ


# -- log lines and the progress bars ----------------------------------------------------------

def _in_a_terminal(argv: list[str], env: dict[str, str], columns: int, timeout: float = 120) -> str:
    """What `argv` writes to its terminal (stderr; stdout is dropped), `columns` wide."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=subprocess.DEVNULL, stderr=slave, env=env, cwd=REPO)
    os.close(slave)
    written = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # the other end closed
                    break
                if not chunk:
                    break
                written += chunk
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    return written.decode(errors="replace")


def _screen(written: str, columns: int) -> list[str]:
    """The rows a terminal shows after `written`: characters, carriage return, line feed and
    cursor up (all tqdm draws with), wrapping as a terminal does (a character written in the
    last column leaves the cursor there until the next one)."""
    rows: list[list[str]] = [[]]
    row = col = 0
    wrap = False
    i = 0
    while i < len(written):
        if written.startswith("\x1b[A", i):
            row, wrap, i = max(0, row - 1), False, i + 3
            continue
        char, i = written[i], i + 1
        if char == "\r":
            col, wrap = 0, False
        elif char == "\n":
            row, wrap = row + 1, False
        else:
            if wrap:
                row, col, wrap = row + 1, 0, False
            while len(rows) <= row:
                rows.append([])
            line = rows[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = char
            if col == columns - 1:
                wrap = True
            else:
                col += 1
        while len(rows) <= row:
            rows.append([])
    return ["".join(r).rstrip() for r in rows]


def test_vllms_log_lines_print_above_the_progress_bars_not_over_them(tmp_path):
    """The plugin logs where its files go as the scheduler starts, under the bars already drawn."""
    columns = 120
    written = _in_a_terminal([sys.executable, "-m", "vllm_frag_otel.cli", "simulate", *TINY],
                             _env(XDG_CACHE_HOME=str(tmp_path)), columns)
    screen = _screen(written, columns)
    assert any(row.startswith("requests finished: 100%") for row in screen), screen
    assert any(row.startswith("vllm-frag-otel: no OTLP endpoint configured; writing KV-cache telemetry")
               for row in screen), "\n".join(screen)
    assert not [row for row in screen if "req/s" in row and "vllm-frag-otel" in row], "\n".join(screen)
    assert "Triton not available" not in written and "vllm._C" not in written


# -- a simulate without --output, and what a bare report reads ---------------------------------

def test_a_run_without_output_gets_a_directory_of_its_own_and_a_bare_report_reads_the_newest(tmp_path, monkeypatch,
                                                                                               capsys):
    root = tmp_path / "vllm-frag-otel" / "simulate"
    earlier = [root / f"2026010{day}T120000Z-{day}" for day in range(1, 6)]
    for run in earlier:
        (run / "telemetry").mkdir(parents=True)
    proc = _simulate(*TINY, XDG_CACHE_HOME=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(root.iterdir())
    assert len(runs) == cli.KEPT_BARE_RUNS == 5 and runs[:4] == earlier[1:]  # the oldest went, said so
    new = runs[-1]
    assert f"removed 1 older run from {root} (without --output, the newest 5 are kept" in proc.stderr
    assert f"summary: {new / 'summary.json'}; telemetry: {new / 'telemetry'}" in proc.stdout
    assert json.loads((new / "summary.json").read_text())["finished_requests"] == 6
    server_files = tmp_path / "vllm-frag-otel" / "telemetry"
    assert not server_files.exists()  # the plugin's default directory stays a server's

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("VLLM_FRAG_OTEL_FILE_DIR", raising=False)

    def bare_report() -> tuple[str, list[str]]:
        assert cli.main(["report", "--output", str(tmp_path / "report"), "--no-plots"]) == 0
        captured = capsys.readouterr()
        return captured.err, [line.split("read ", 1)[1] for line in captured.out.splitlines()
                              if line.startswith("  read ")]

    said, read = bare_report()
    assert said.startswith(f"report: reading {new}, the newest simulate run without --output (of 5 kept in {root})")
    assert read and all(path.startswith(f"{new / 'telemetry'}/") for path in read)
    # a server writing there since: its files are the newest
    shutil.copytree(new / "telemetry", server_files, copy_function=shutil.copyfile)  # written now
    said, read = bare_report()
    assert said.startswith(f"report: reading {server_files}, the plugin's file directory")
    assert read and all(path.startswith(f"{server_files}/") for path in read)


# -- a report on a run stopped early ---------------------------------------------------------

CTRL_C_AT_STEP = """
import os, signal, sys
from vllm_frag_otel import cli
from vllm_frag_otel.sim import simulator as sim

run_workload = sim.run_workload
stop_at = int(os.environ["STOP_AT_STEP"])


def ctrl_c_at_a_step(*args, on_step, **kwargs):
    def step(steps):
        if steps == stop_at:
            os.kill(os.getpid(), signal.SIGINT)  # as from the terminal, during that step
        on_step(steps)

    return run_workload(*args, on_step=step, **kwargs)


sim.run_workload = ctrl_c_at_a_step
sys.exit(cli.main(sys.argv[1:]))
"""


def _stopped_run(out: Path, trace: Path, step: int) -> subprocess.CompletedProcess:
    # as in a terminal: a runner started in the background (`cmd &` in a script) ignores SIGINT,
    # and a Python started with SIGINT ignored never turns it into KeyboardInterrupt
    return subprocess.run([sys.executable, "-c", CTRL_C_AT_STEP, "simulate", "--workload-file", str(trace),
                           "--num-blocks", "128", "--export-every", "1", "--output", str(out)],
                          env=_env(STOP_AT_STEP=str(step)), capture_output=True, text=True, timeout=120, cwd=REPO,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.fixture(scope="module")
def two_requests(tmp_path_factory) -> Path:
    """One request done after its 2 output tokens, one that runs for 400 steps."""
    trace = tmp_path_factory.mktemp("trace") / "two.jsonl"
    trace.write_text(json.dumps({"prompt_len": 20, "output_len": 2}) + "\n"
                     + json.dumps({"prompt_len": 20, "output_len": 400}) + "\n")
    return trace


def test_a_run_stopped_before_any_request_finished_has_nothing_to_report(two_requests, tmp_path, capsys):
    out = tmp_path / "run"
    proc = _stopped_run(out, two_requests, step=1)
    assert proc.returncode == 130, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["partial"], summary["steps"], summary["finished_requests"]) == (True, 1, 0)
    assert summary["run"]["mean_latency_s"] is None  # a mean over no request
    assert "0 of 2 requests finished (interrupted) in 1 scheduler step: " in proc.stdout
    assert "no request finished, so no latency" in proc.stdout and "mean request latency" not in proc.stdout
    for inputs in ([out], [out / "telemetry"]):
        assert cli.main(["report", *map(str, inputs), "--output", str(tmp_path / "report"), "--no-plots"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"vllm-frag-otel: error: nothing to report: the simulator run in {out} was interrupted after 1 scheduler"
            f" step (see {out / 'summary.json'}), before any request finished: its telemetry shows the first"
            " admissions only, not the workload. Run it again without stopping it (or with fewer --num-requests)")
        assert not (tmp_path / "report").exists()


def test_a_run_stopped_after_a_request_finished_is_reported_with_its_caveat(two_requests, tmp_path, capsys):
    out = tmp_path / "run"
    proc = _stopped_run(out, two_requests, step=20)
    assert proc.returncode == 130, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["partial"], summary["steps"], summary["finished_requests"]) == (True, 20, 1)
    assert summary["run"]["mean_latency_s"] > 0
    assert cli.main(["report", str(out), "--output", str(tmp_path / "report"), "--no-plots"]) == 0
    assert (f"caveat: the simulator run in {out} was interrupted after 20 steps, with 1 requests finished"
            in capsys.readouterr().out)


def test_a_refused_workload_file_leaves_the_earlier_runs_and_no_new_one(tmp_path):
    root = tmp_path / "vllm-frag-otel" / "simulate"
    earlier = [root / f"2026010{day}T120000Z-{day}" for day in range(1, 6)]
    for run in earlier:
        run.mkdir(parents=True)
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"prompt_len": 0, "output_len": 3}) + "\n")
    proc = _simulate("--workload-file", str(trace), timeout=60, XDG_CACHE_HOME=str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{trace}:1: prompt_len must be an integer >= 1, got 0" in proc.stderr
    assert sorted(root.iterdir()) == earlier


def test_a_sweep_value_no_setting_can_take_shows_the_simulate_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["simulate", "--sweep", "--num-blocks", "64", "--sweep-block-sizes", "8,4096"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and lines[0].startswith("usage: vllm-frag-otel simulate ")
    assert lines[-1] == "vllm-frag-otel: error: blocks of 4096 tokens do not fit in 1008 token slots of KV memory"

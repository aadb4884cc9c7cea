"""`simulate --layout` and the per-group numbers of `simulate` and `report`, on
hybrid KV-cache layouts (several groups: full attention beside sliding-window
attention or Mamba states).

Two real `vllm-frag-otel simulate` runs (a fresh interpreter, the plugin loaded
by vLLM's entry point), gpt-oss and qwen3-next, small enough to take seconds.
Their summary.json is checked against the same workload run again here, its
snapshots' groups averaged by hand; the report's groups against a recount of
the raw OTLP/JSON lines, read with plain json.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from vllm_frag_otel import cli
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.analysis import sweep
from vllm_frag_otel.sim import workloads
from vllm_frag_otel.core.state import FragmentationSnapshot

REQUESTS, BLOCKS, SEQS, SEED = 24, 40, 8, 3
SIMULATE = ["--workload", "alpaca", "--num-requests", str(REQUESTS), "--num-blocks", str(BLOCKS), "--max-num-seqs",
            str(SEQS), "--seed", str(SEED), "--export-every", "5", "--block-map-every", "0"]
KINDS = {"gpt-oss": ["full_attention", "sliding_window"], "qwen3-next": ["full_attention", "mamba"]}


class Run:
    def __init__(self, layout: str, out: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VLLM_FRAG_OTEL_"))}
        env["OTEL_METRIC_EXPORT_INTERVAL"] = "600000"  # only the step-driven exports
        proc = subprocess.run(
            [sys.executable, "-m", "vllm_frag_otel.cli", "simulate", *SIMULATE, "--layout", layout, "--output",
             str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        self.layout, self.out, self.stdout = layout, out, proc.stdout
        self.summary = json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module", params=["gpt-oss", "qwen3-next"])
def run(request, tmp_path_factory) -> Run:
    return Run(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def built(run, tmp_path_factory):
    """`report` on the run's telemetry, through the command line, and what it printed."""
    out = tmp_path_factory.mktemp(f"report-{run.layout}")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["report", str(run.out / "telemetry"), "--output", str(out)]) == 0
    return out, stdout.getvalue()


def _row(text: str, group: int, kind: str) -> list[str]:
    """The cells of a group's row in a groups table."""
    (line,) = [line for line in text.splitlines() if line.startswith(f"  {group} {kind} ")]
    return line.split()[2:]


# -- simulate ------------------------------------------------------------------------------


def test_summary_json_groups_are_the_snapshots_averaged(run, plugin):
    """The same workload again, in this process: each group's numbers averaged by
    hand over its snapshots are what summary.json and the printed table say."""
    summary = run.summary
    assert {"workload", "config", "max_model_len", "steps", "run", "fields"} <= set(summary)
    # the snapshot's fields, with the pool's blocks as its three states: empty for vLLM's free (empty + cached)
    assert set(summary["fields"]) == set(FragmentationSnapshot.numeric_fields()) - {"free_blocks"} | {"empty_blocks"}
    used, cached, empty = (summary["fields"][f"{state}_blocks"]["final"] for state in ("used", "cached", "empty"))
    assert used + cached + empty == BLOCKS - 1  # less vLLM's null block
    assert summary["config"]["layout"] == run.layout and summary["layout"]["name"] == run.layout
    max_len = summary["max_model_len"]
    shape = sim.EngineShape(num_blocks=BLOCKS, block_size=16, max_num_seqs=SEQS, max_model_len=max_len,
                            layout=run.layout)
    specs = workloads.generate("alpaca", REQUESTS, seed=SEED, max_len=max_len, prefix_groups=4, prefix_len=64)
    snapshots = sim.run_workload(shape, specs, step_seconds=0.02, seed=SEED).snapshots
    assert len(snapshots) == summary["steps"]
    assert [g["kind"] for g in summary["groups"]] == KINDS[run.layout]
    for index, group in enumerate(summary["groups"]):
        mine = [s.groups[index] for s in snapshots]
        blocks = np.array([g.used_blocks for g in mine], dtype=float)
        assert group["group"] == index and group["block_size"] == mine[0].block_size
        assert group["token_slots"] is (group["kind"] != "mamba")
        assert group["used_blocks"]["mean"] == pytest.approx(blocks.mean())
        assert group["used_blocks"]["max"] == blocks.max() > 0
        cells = _row(run.stdout, index, group["kind"])
        assert cells[1:3] == [f"{blocks.mean():.1f}", f"{blocks.max():.0f}"]
        if not group["token_slots"]:
            assert not {"unused_slots", "internal_fragmentation"} & set(group)
            assert cells[0] == "state" and cells[3:] == ["-", "-", "-"]
            continue
        allocated = np.array([g.used_blocks * g.block_size for g in mine], dtype=float)
        used = np.array([g.used_slots for g in mine], dtype=float)
        unused = allocated - used
        internal = np.divide(unused, allocated, out=np.zeros_like(unused), where=allocated > 0)
        assert group["unused_slots"]["mean"] == pytest.approx(unused.mean())
        assert group["unused_slots"]["max"] == unused.max() > 0
        assert group["internal_fragmentation"]["mean"] == pytest.approx(internal.mean()) and internal.mean() > 0
        assert cells == [str(mine[0].block_size), f"{blocks.mean():.1f}", f"{blocks.max():.0f}",
                         f"{100 * internal.mean():.1f}%", f"{unused.mean():.1f}", f"{unused.max():.0f}"]
    # the groups share the pool: their blocks add up to its used blocks
    pool = np.array([s.used_blocks for s in snapshots], dtype=float)
    assert summary["fields"]["used_blocks"]["mean"] == pytest.approx(pool.mean())
    assert sum(g["used_blocks"]["mean"] for g in summary["groups"]) == pytest.approx(pool.mean())
    if run.layout == "gpt-oss":  # the window retires a long request's early blocks
        full, window = summary["groups"]
        assert window["used_blocks"]["mean"] < full["used_blocks"]["mean"]
    else:
        assert "group 1 (mamba): its blocks are state pages, not token slots" in run.stdout
        assert summary["layout"]["prefix_caching"] and summary["fields"]["prefix_hit_tokens"]["final"] > 0
    assert f"layout {run.layout}: KV-cache groups" in run.stdout
    assert "prefix caching is off" not in run.stdout


@pytest.mark.parametrize("layout", list(sim.LAYOUTS))
def test_the_longest_request_of_every_layout_fits_the_pool(layout, plugin):
    """simulate's max_model_len for a layout: one request that long runs to completion
    (a request needing more blocks than the pool has would wait for ever)."""
    setting = sweep.Setting(16, 30, True, 4, layout)
    longest = setting.max_model_len
    assert 0 < longest <= 29 * 16
    scheduler = sim.build_scheduler(setting.shape())
    (request,) = sim.make_requests([(list(range(100, 100 + longest - 8)), 8)], scheduler.hash_block_size)
    steps = sim.run_to_completion(scheduler, [request], max_steps=200)
    assert steps < 200


def test_a_layout_without_prefix_caching_says_so(tmp_path, capsys, monkeypatch, plugin):
    """jamba's Mamba states cannot be prefix-cached: the run has none, and says so."""
    # what simulate sets in the environment is put back afterwards
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
    monkeypatch.setenv("VLLM_FRAG_OTEL_FILE_DIR", str(tmp_path / "telemetry"))
    flags = ["simulate", "--workload", "alpaca", "--num-requests", "12", "--num-blocks", "40", "--max-num-seqs", "4",
             "--seed", "3", "--export-every", "0", "--block-map-every", "0", "--layout", "jamba"]
    assert cli.main([*flags, "--output", str(tmp_path / "on")]) == 0
    printed = capsys.readouterr().out
    assert "prefix caching is off: layout jamba has Mamba states outside \"align\" mode" in printed
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert summary["layout"]["prefix_caching"] is False
    assert summary["fields"]["prefix_queried_tokens"]["final"] == 0  # vLLM never looked anything up
    assert [g["kind"] for g in summary["groups"]] == ["full_attention", "mamba"]
    # turned off by hand: nothing to explain
    assert cli.main([*flags, "--no-prefix-caching"]) == 0
    assert "prefix caching is off" not in capsys.readouterr().out


def test_the_sweep_command_keeps_the_layout(tmp_path, capsys, plugin):
    out = tmp_path / "sweep"
    assert cli.main(["simulate", "--sweep", "--layout", "jamba", "--workload", "alpaca", "--num-requests", "8",
                     "--num-blocks", "40", "--max-num-seqs", "4", "--seed", "3", "--sweep-max-num-seqs", "2",
                     "--sweep-prefix-caching", "on,off", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "What-if sweep: alpaca, layout jamba, 8 requests, 2 settings" in printed
    text = (out / "sweep.txt").read_text()
    assert "prefix caching is off: layout jamba has Mamba states outside \"align\" mode" in text
    with open(out / "sweep.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["layout"], r["prefix_caching"], r["max_num_seqs"]) for r in rows] == [("jamba", "False", "4"),
                                                                                      ("jamba", "False", "2")]
    assert all(float(r["prefix_hit_rate"]) == 0.0 for r in rows)


@pytest.mark.parametrize("layout, message", [
    ("gpt-oss2", "unknown KV-cache group kind 'gpt-oss2'"),
    ("full,sliding_window", "sliding_window in layout 'full,sliding_window' needs a window in tokens"),
    ("full,mamba:64", "mamba in layout 'full,mamba:64' takes no window"),
])
def test_an_invalid_layout_is_a_one_line_error(layout, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VLLM_FRAG_OTEL_"))}
    proc = subprocess.run([sys.executable, "-m", "vllm_frag_otel.cli", "simulate", "--layout", layout],
                          env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.stderr.startswith("usage: vllm-frag-otel simulate ")
    assert error.startswith("vllm-frag-otel: error: argument --layout: ")
    assert message in error
    assert "presets: " + ", ".join(sim.LAYOUTS) in error and "group kinds: full, mla, sliding_window" in error


def test_too_few_blocks_for_a_layout_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["simulate", "--layout", "gpt-oss", "--num-blocks", "3"])
    assert exit_.value.code == 2
    assert "--num-blocks 3 is too few for --layout gpt-oss: one request needs 3 usable blocks or more" \
        in capsys.readouterr().err


def test_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        cli.main(["simulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, groups in sim.LAYOUTS.items():
        assert f"{name}: {groups}" in text


# -- report --------------------------------------------------------------------------------------


def _value(v: dict) -> str:
    (raw,) = v.values()
    return str(raw)


def raw_groups(run: Run) -> dict[tuple[str, str], dict[str, dict[int, float]]]:
    """(group, kind) -> {"blocks" | "used" | "unused" -> {time: value}}, from the raw metric lines."""
    groups: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for path in sorted((run.out / "telemetry").glob("metrics-*.jsonl")):
        for line in path.read_text().splitlines():
            for rm in json.loads(line)["resourceMetrics"]:
                for sm in rm["scopeMetrics"]:
                    for m in sm["metrics"]:
                        if m["name"] not in ("vllm.kv_cache.group.blocks", "vllm.kv_cache.slots"):
                            continue
                        for dp in m["gauge"]["dataPoints"]:
                            a = {kv["key"]: _value(kv["value"]) for kv in dp["attributes"]}
                            series = groups.setdefault((a["vllm.kv_cache.group"], a["vllm.kv_cache.group.kind"]), {})
                            name = a.get("vllm.kv_cache.slot.state", "blocks")
                            series.setdefault(name, {})[int(dp["timeUnixNano"])] = float(dp.get("asInt", 0))
    return groups


def test_report_shows_each_group_as_recounted_from_the_otlp_lines(run, built):
    out, printed = built
    raw = raw_groups(run)
    assert sorted(raw) == [(str(i), kind) for i, kind in enumerate(KINDS[run.layout])]
    text = (out / "summary.txt").read_text()
    assert text.strip() in printed
    assert "2 KV-cache groups" in text and "KV-cache groups (every request has a block table in each" in text
    with open(out / "groups.csv", newline="") as fh:
        rows = {(r["group"], r["kind"]): r for r in csv.DictReader(fh)}
    assert set(rows) == set(raw)
    for (group, kind), series in raw.items():
        times = sorted(series["blocks"])
        blocks = np.array([series["blocks"][t] for t in times])
        row = rows[(group, kind)]
        assert int(row["exports"]) == len(times) > 10
        assert float(row["blocks_mean"]) == pytest.approx(blocks.mean())
        assert float(row["blocks_max"]) == blocks.max() > 0
        cells = _row(text, int(group), kind)
        assert cells[1:3] == [f"{blocks.mean():.1f}", f"{blocks.max():.0f}"]
        if kind == "mamba":  # no token slots: no slot series, and the report says what its blocks are
            assert set(series) == {"blocks"} and row["token_slots"] == "false"
            assert row["block_size"] == row["internal_fragmentation_mean"] == ""
            assert cells == ["state", f"{blocks.mean():.1f}", f"{blocks.max():.0f}", "-", "-", "-"]
            assert f"group {group} (mamba): its blocks are state pages, not token slots" in text
            continue
        used = np.array([series["used"][t] for t in times])
        unused = np.array([series["unused"][t] for t in times])
        allocated = used + unused
        held = blocks > 0
        (block_size,) = set((allocated[held] / blocks[held]).tolist())
        internal = np.divide(unused, allocated, out=np.zeros_like(unused), where=allocated > 0)
        assert row["token_slots"] == "true" and int(row["block_size"]) == block_size == 16
        assert float(row["internal_fragmentation_mean"]) == pytest.approx(internal.mean()) and internal.mean() > 0
        assert float(row["unused_slots_mean"]) == pytest.approx(unused.mean())
        assert float(row["unused_slots_max"]) == unused.max()
        assert cells == ["16", f"{blocks.mean():.1f}", f"{blocks.max():.0f}", f"{100 * internal.mean():.1f}%",
                         f"{unused.mean():.1f}", f"{unused.max():.0f}"]
    if run.layout == "gpt-oss":
        assert "state pages" not in text
    page = (out / "report.html").read_text()
    assert "KV-cache groups (every request has a block table in each" in page
    assert (out / "kv_cache_groups.png").read_bytes().startswith(b"\x89PNG")


def test_the_readme_example_is_what_make_simulate_prints(tmp_path):
    """The README shows `make simulate`'s output as this code prints it (the same
    command and embedded workload, one run), not a leftover of an earlier round."""
    makefile = (REPO / "Makefile").read_text()
    command = makefile.split("\nsimulate: setup\n\t.venv/bin/", 1)[1].split("\n", 1)[0].split()
    assert command[:2] == ["vllm-frag-otel", "simulate"], command
    cli_path = Path(sys.executable).with_name("vllm-frag-otel")
    output = [str(tmp_path / "sim-out") if arg == "sim-out" else arg for arg in command[1:]]
    proc = subprocess.run([str(cli_path), *output], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    readme = (REPO / "README.md").read_text()
    example = readme.split("`make simulate` runs vLLM's real scheduler", 1)[1].split("```\n")[1]
    assert example.startswith("KV-cache fragmentation over") and "prefix cache" in example, example
    assert example in proc.stdout, proc.stdout[:4000]

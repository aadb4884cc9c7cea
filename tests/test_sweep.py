"""What-if sweeps on vLLM's real scheduler: each row measures its own run, and
the recommendation is what the measured table says."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO

from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.analysis import sweep
from vllm_frag_otel.sim import workloads
from vllm_frag_otel.analysis.sweep import Setting

BASE = Setting(block_size=16, num_blocks=30, prefix_caching=True, max_num_seqs=8)


@pytest.fixture(scope="module")
def swept(plugin, tmp_path_factory):
    runs = sweep.settings(BASE, block_sizes=[8, 16, 32], num_blocks=[20, 60], prefix_caching=[True, False])
    specs = workloads.generate("alpaca", 30, seed=3, max_len=min(s.max_model_len for s in runs))
    outcomes = sweep.run(runs, specs, step_seconds=0.02, seed=3)
    recommendation = sweep.recommend(outcomes)
    text = sweep.render(outcomes, recommendation, "alpaca")
    out = tmp_path_factory.mktemp("sweep")
    sweep.write(outcomes, text, out)
    return specs, outcomes, recommendation, text, out


def test_settings_vary_one_axis_at_a_time_and_keep_memory_across_block_sizes():
    runs = sweep.settings(BASE, block_sizes=[8, 16, 32], num_blocks=[20, 60], prefix_caching=[True, False],
                          max_num_seqs=[4])
    assert runs[0] == BASE
    assert len(runs) == len(set(runs)) == 1 + 2 + 2 + 1 + 1
    by_size = {s.block_size: s for s in runs if s.block_size != 16}
    for setting in by_size.values():  # the same memory, in whole blocks of another size
        assert BASE.kv_slots - setting.block_size < setting.kv_slots <= BASE.kv_slots
    assert by_size[8].num_blocks == 59 and by_size[32].num_blocks == 15
    assert {s.num_blocks for s in runs if s.block_size == 16 and s.prefix_caching and s.max_num_seqs == 8} \
        == {20, 30, 60}
    grid = sweep.settings(BASE, block_sizes=[8, 16], num_blocks=[20, 30], prefix_caching=[True, False], grid=True)
    assert len(grid) == 8 and grid[0] == BASE


def _rows(out) -> list[dict]:
    with open(out / "sweep.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_recommendation_agrees_with_the_measured_table(swept):
    _, outcomes, recommendation, text, out = swept
    rows = _rows(out)
    assert len(rows) == len(outcomes) == 6
    baseline = rows[0]
    affordable = [r for r in rows if int(r["kv_slots"]) <= int(baseline["kv_slots"])]
    best = min(affordable, key=lambda r: (float(r["mean_latency_s"]), int(r["preemptions"]),
                                          int(r["failed_allocations"])))
    material = float(best["mean_latency_s"]) <= float(baseline["mean_latency_s"]) * (1 - sweep.MATERIAL)
    advice = recommendation.lines[0]
    if material:
        assert advice.startswith("Change to")
        assert f"mean request latency {float(best['mean_latency_s']):.3f} s vs" in advice
        assert f"preemptions {best['preemptions']} vs {baseline['preemptions']}" in advice
        if best["block_size"] != baseline["block_size"]:
            assert f"--block-size {best['block_size']} instead of {baseline['block_size']}" in advice
        if best["prefix_caching"] != baseline["prefix_caching"]:
            assert "prefix caching off" in advice
    else:
        assert advice.startswith("Keep the current settings")
    assert dataclasses.asdict(recommendation.best.setting) == {
        "block_size": int((best if material else baseline)["block_size"]),
        "num_blocks": int((best if material else baseline)["num_blocks"]),
        "prefix_caching": (best if material else baseline)["prefix_caching"] == "True",
        "max_num_seqs": int((best if material else baseline)["max_num_seqs"]),
        "layout": (best if material else baseline)["layout"],
        "model_len_limit": int((best if material else baseline)["model_len_limit"]),
    }
    (more,) = [r for r in rows if int(r["kv_slots"]) > int(baseline["kv_slots"])]
    (memory_line,) = [line for line in recommendation.lines if "the KV memory" in line]
    assert "With 2x the KV memory (60 blocks instead of 30)" in memory_line
    assert f"mean request latency {float(more['mean_latency_s']):.3f} s" in memory_line
    assert all(line in text for line in recommendation.lines)
    assert json.loads((out / "sweep.json").read_text())["rows"][0]["num_blocks"] == 30
    png = (out / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_the_table_measures_what_the_settings_change(swept):
    _, outcomes, _, _, _ = swept
    row = {(o.setting.block_size, o.setting.num_blocks, o.setting.prefix_caching): o for o in outcomes}
    assert row[(16, 30, False)].prefix_hit_rate == 0.0 < row[(16, 30, True)].prefix_hit_rate
    assert row[(16, 20, True)].preemptions > row[(16, 60, True)].preemptions  # less memory, more preemptions
    # a request's tail block wastes more slots the bigger the blocks
    assert row[(8, 59, True)].internal_fragmentation < row[(16, 30, True)].internal_fragmentation \
        < row[(32, 15, True)].internal_fragmentation


def test_a_row_counts_what_the_scheduler_did(swept):
    """The baseline row again, counted from the scheduler's own outputs."""
    specs, outcomes, _, _, _ = swept
    scheduler = sim.build_scheduler(sim.EngineShape(num_blocks=BASE.num_blocks, block_size=BASE.block_size,
                                                    max_num_seqs=BASE.max_num_seqs, max_model_len=BASE.max_model_len))
    preempted, tokens = [], []
    requests = sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], BASE.block_size)
    steps = sim.run_to_completion(scheduler, requests, seed=3, on_step=lambda out, _: (
        preempted.append(len(out.preempted_req_ids or ())), tokens.append(out.total_num_scheduled_tokens)))
    baseline = outcomes[0]
    assert baseline.steps == steps
    assert baseline.preemptions == sum(preempted) > 0
    busy = np.array(tokens)[np.array(tokens) > 0]
    assert baseline.tokens_per_step == pytest.approx(busy.mean())


def test_arrivals_are_replayed_step_by_step(plugin):
    """Requests far apart run alone: each is first scheduled at its arrival step,
    and its latency is exactly its output length in steps (one prefill step that
    samples the first token, then one token per step)."""
    specs = workloads.generate("alpaca", 5, seed=4, prefix_groups=0, max_len=800)
    specs = [dataclasses.replace(s, arrival_s=10.0 * i) for i, s in enumerate(specs)]
    shape = sim.EngineShape(num_blocks=60, max_num_seqs=4, max_model_len=800)
    result = sim.run_workload(shape, specs, step_seconds=0.02, seed=0)
    assert result.latency_steps.tolist() == [s.output_len for s in specs]
    # and one more step, in which vLLM tells the workers the last request finished
    assert result.steps == 4 * 500 + specs[-1].output_len + 1
    first_scheduled = {}
    scheduler = sim.build_scheduler(shape)
    requests = sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], shape.block_size)
    step = iter(range(10**6))

    def on_step(out, _):
        index = next(step)
        for new in out.scheduled_new_reqs:
            first_scheduled.setdefault(new.req_id, index)

    sim.run_to_completion(scheduler, requests, seed=0, on_step=on_step,
                          arrival_steps=workloads.arrival_steps(specs, 0.02).tolist())
    assert [first_scheduled[f"req-{i}"] for i in range(5)] == [0, 500, 1000, 1500, 2000]


def test_sweep_command_replays_a_trace_file(tmp_path):
    trace = tmp_path / "mix.jsonl"
    rng = random.Random(5)
    lines = [json.dumps({"arrival_time": 0.01 * i, "prompt_len": rng.randint(20, 200),
                         "output_len": rng.randint(5, 60), "prefix_group": i % 3}) for i in range(24)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VLLM_FRAG_OTEL_"))}
    out = tmp_path / "sweep"

    def sweep() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "vllm_frag_otel.cli", "simulate", "--sweep", "--workload-file", str(trace),
             "--arrival-rate", "40", "--num-blocks", "40", "--max-num-seqs", "8", "--sweep-block-sizes", "8,16",
             "--sweep-prefix-caching", "off", "--output", str(out)],
            env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
        )

    # a bad line: the file is refused, the line named, nothing written
    trace.write_text("\n".join([*lines[:10], '{"prompt_len": 5}', *lines[10:]]) + "\n")
    proc = sweep()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"vllm-frag-otel: error: {trace}:11: output_len must be an integer >= 1, got None\n" in proc.stderr
    assert not out.exists()
    trace.write_text("\n".join(lines) + "\n")
    proc = sweep()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"What-if sweep: {trace}, 24 requests, 3 settings" in proc.stdout
    assert "Recommendation" in proc.stdout
    rows = _rows(out)
    assert [(r["block_size"], r["prefix_caching"]) for r in rows] == [("16", "True"), ("8", "True"),
                                                                       ("16", "False")]
    assert {p.name for p in out.iterdir()} == {"sweep.txt", "sweep.csv", "sweep.json", "sweep.png"}


def test_a_sweep_keeps_the_layout_in_every_row(plugin):
    """Every point of a gpt-oss sweep runs the gpt-oss layout: its row is what a
    direct run of that layout measures, and not what one full-attention group does."""
    base = Setting(block_size=16, num_blocks=40, prefix_caching=True, max_num_seqs=8, layout="gpt-oss")
    runs = sweep.settings(base, block_sizes=[8, 16], max_num_seqs=[4])
    assert len(runs) == 3 and {s.layout for s in runs} == {s.shape().layout for s in runs} == {"gpt-oss"}
    specs = workloads.generate("alpaca", 12, seed=3, max_len=min(s.max_model_len for s in runs))
    outcomes = sweep.run(runs, specs, step_seconds=0.02, seed=3)
    for setting, outcome in zip(runs, outcomes):
        direct = sim.run_workload(sim.EngineShape(num_blocks=setting.num_blocks, block_size=setting.block_size,
                                                  max_num_seqs=setting.max_num_seqs,
                                                  max_model_len=setting.max_model_len, layout="gpt-oss"),
                                  specs, step_seconds=0.02, seed=3)
        assert [g.kind for g in direct.snapshots[0].groups] == ["full_attention", "sliding_window"]
        assert outcome == sweep.measure(setting, direct)
    full = sweep.run([dataclasses.replace(s, layout="full") for s in runs], specs, step_seconds=0.02, seed=3)
    assert [o.internal_fragmentation for o in full] != [o.internal_fragmentation for o in outcomes]


def test_a_layout_that_cannot_prefix_cache_sweeps_without_it():
    base = Setting(block_size=16, num_blocks=40, prefix_caching=True, max_num_seqs=8, layout="jamba")
    runs = sweep.settings(base, prefix_caching=[True, False], max_num_seqs=[4])
    assert [(s.prefix_caching, s.max_num_seqs) for s in runs] == [(False, 8), (False, 4)]
    assert sweep.default_axes(base)["prefix_caching"] == []
    assert sweep.default_axes(dataclasses.replace(base, layout="qwen3-next"))["prefix_caching"] == [True, False]


def test_no_change_is_recommended_for_a_small_gain(swept):
    _, outcomes, _, _, _ = swept
    baseline = outcomes[0]
    close = [dataclasses.replace(o, mean_latency_s=baseline.mean_latency_s * 0.99) if o is not baseline else o
             for o in outcomes if o.setting.kv_slots <= baseline.setting.kv_slots]
    recommendation = sweep.recommend(close)
    assert recommendation.best is baseline
    assert recommendation.lines[0].startswith("Keep the current settings")
    assert recommendation.lines[1].startswith("Closest, ")


def test_the_chart_marks_the_baseline(swept):
    """The first row, the current settings, is told apart in every panel: its bar hatched, its
    label bold, and the legend says what the hatching means; no other bar is hatched."""
    from vllm_frag_otel.analysis.plots import figure

    _, outcomes, _, _, _ = swept
    drawn = figure(sweep.chart(outcomes))
    drawn.canvas.draw()
    panels = [ax for ax in drawn.axes if ax.get_visible()]
    assert len(panels) == 6
    for ax in panels:
        bars = ax.patches
        assert len(bars) == len(outcomes)
        assert [bool(bar.get_hatch()) for bar in bars] == [True] + [False] * (len(outcomes) - 1)
        labels = ax.get_xticklabels()
        assert [label.get_fontweight() for label in labels] == ["bold"] + ["normal"] * (len(outcomes) - 1)
        baseline = outcomes[0].setting
        assert labels[0].get_text().startswith(f"bs{baseline.block_size} {baseline.num_blocks}b")
        legend = ax.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == ["baseline (the current settings)"]
        assert legend.get_window_extent().y0 >= ax.get_window_extent().y1 - 1  # above the bars, not on them

"""The benchmark harness keeps working (a --quick smoke run; performance itself
is measured by `python benchmarks/run.py`, never by timed tests), and serving.py's
statistics say what the rounds support (fast: no server)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO


def _load_serving():
    """benchmarks/serving.py as a module (stdlib only: nothing else is imported or set)."""
    spec = importlib.util.spec_from_file_location("benchmarks_serving", REPO / "benchmarks" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


serving = _load_serving()


def _rounds(pairs, baseline, plugin):
    """ABBA rounds as serving.py records them; baseline(k) / plugin(k) give pair k's
    (output tok/s, mean TTFT ms, mean ITL ms)."""
    out = []
    for index, (pair, variant) in enumerate(serving.abba(pairs), 1):
        tput, ttft, itl = (baseline if variant == "baseline" else plugin)(pair)
        out.append({"round": index, "pair": pair, "variant": variant, "output_throughput_tok_s": tput,
                    "mean_ttft_ms": ttft, "mean_itl_ms": itl})
    return out


def _drift(k):
    """The machine's drift from pair to pair (+-20%), far larger than the plugin's cost:
    only a ratio within a pair cancels it."""
    return 1 + 0.2 * ((k * 7) % 5 - 2) / 2


def _two_pct_slower(pairs=12):
    """The plugin exactly 2% slower (throughput baseline/plugin 1.02), TTFT x1.05, ITL x1.03,
    with +-0.01% noise, on a drifting machine."""
    def noise(k, salt):
        return 1 + 1e-4 * (((k * 31 + salt) % 7) - 3) / 3

    return _rounds(
        pairs,
        lambda k: (1000 * _drift(k) * noise(k, 1), 20 * noise(k, 2), 5 * noise(k, 3)),
        lambda k: (1000 * _drift(k) / 1.02 * noise(k, 4), 20 * 1.05 * noise(k, 5), 5 * 1.03 * noise(k, 6)),
    )


def test_serving_summary_plugin_two_percent_slower_is_not_met():
    s = serving.summarise(_two_pct_slower())
    assert s["target"] == "NOT MET", s
    lo, hi = s["throughput_ratio_ci95"]
    assert lo <= 1.02 <= hi and hi - lo < 0.001, s["throughput_ratio_ci95"]
    assert s["serving_overhead_ratio"] == pytest.approx(1.02, abs=2e-4)
    # loss = (1 - plugin/baseline) x 100 = (1 - 1/1.02) x 100 = 1.96%; its whole interval above 1%
    assert s["throughput_loss_pct"] == pytest.approx(100 * (1 - 1 / 1.02), abs=0.02)
    assert 1.0 < s["loss_ci95_pct"][0] <= s["throughput_loss_pct"] <= s["loss_ci95_pct"][1]
    assert s["loss_ci95_halfwidth_pct"] < 0.05 and s["interval_within_goal"]
    # latencies: plugin / baseline (> 1: the plugin is slower)
    assert s["ttft_ratio"] == pytest.approx(1.05, abs=5e-4) and s["itl_ratio"] == pytest.approx(1.03, abs=5e-4)
    assert s["ttft_ratio_ci95"][0] <= 1.05 <= s["ttft_ratio_ci95"][1]
    assert s["itl_ratio_ci95"][0] <= 1.03 <= s["itl_ratio_ci95"][1]
    assert len(s["pairs"]) == 12 and s["bootstrap"]["resamples"] == 10_000
    assert [p["order"] for p in s["pairs"][:2]] == [["baseline", "plugin"], ["plugin", "baseline"]]


def test_serving_summary_identical_rounds_meet_the_target():
    s = serving.summarise(_rounds(8, lambda k: (1000 * _drift(k), 20, 5), lambda k: (1000 * _drift(k), 20, 5)))
    assert s["target"] == "met", s
    assert s["serving_overhead_ratio"] == 1.0 and s["throughput_ratio_ci95"] == [1.0, 1.0]
    assert s["throughput_loss_pct"] == 0.0 and s["loss_ci95_pct"] == [0.0, 0.0]
    assert s["loss_ci95_halfwidth_pct"] == 0.0 and s["interval_within_goal"]


def test_serving_summary_noisy_rounds_are_not_resolved():
    # plugin/baseline throughput from 0.7 to 1.3 (losses -30% .. +30%, median 0%)
    factors = [0.7, 1.3, 0.8, 1.2, 0.9, 1.1, 0.95, 1.05, 1.0, 1.0]
    s = serving.summarise(_rounds(len(factors), lambda k: (1000 * _drift(k), 20, 5),
                                  lambda k: (1000 * _drift(k) * factors[k - 1], 20 / factors[k - 1], 5)))
    assert s["target"].startswith("not resolved (interval ±"), s["target"]
    assert s["target"] == f"not resolved (interval ±{s['loss_ci95_halfwidth_pct']:.2f}%)"
    lo, hi = s["loss_ci95_pct"]
    assert lo < 1.0 < hi and s["loss_ci95_halfwidth_pct"] > 1.0 and not s["interval_within_goal"]
    assert s["throughput_ratio_ci95"][0] < 1.0 < s["throughput_ratio_ci95"][1]


def test_serving_summary_is_deterministic_and_needs_six_pairs():
    rounds = _two_pct_slower(6)
    assert serving.summarise(rounds) == serving.summarise(json.loads(json.dumps(rounds)))
    # the bootstrap is seeded: even 50 resamples of spread-out pairs give the same interval twice
    factors = [1 + 0.1 * ((k * 0.6180339887) % 1 - 0.5) for k in range(1, 13)]
    spread = _rounds(12, lambda k: (1000, 20, 5), lambda k: (1000 * factors[k - 1], 20, 5))
    few = [serving.summarise(spread, resamples=50) for _ in range(3)]
    assert few[0] == few[1] == few[2] and few[0]["bootstrap"]["resamples"] == 50
    # fewer than 6 pairs: no verdict, however close they are (with 5, [min, max] holds the median
    # with probability 94% only; the bootstrap interval of 2 pairs is their range)
    for pairs, verdict in ((1, "not resolved"), (2, "not resolved"), (5, "not resolved"), (6, "met")):
        s = serving.summarise(_rounds(pairs, lambda k: (1000, 20, 5), lambda k: (1000, 20, 5)))
        assert s["target"].startswith(verdict) and s["interval_within_goal"] == (verdict == "met"), (pairs, s)
    assert serving.summarise(_two_pct_slower(5))["target"] == \
        "not resolved (5 pairs: a 95% interval of a median needs at least 6)"
    assert serving.summarise(_two_pct_slower(6))["target"] == "NOT MET"
    with pytest.raises(ValueError, match="needs one round of each"):
        serving.summarise(_two_pct_slower(3)[:-1])


def test_serving_round_order_and_pinning_plan():
    assert serving.abba(3) == [(1, "baseline"), (1, "plugin"), (2, "plugin"), (2, "baseline"),
                               (3, "baseline"), (3, "plugin")]
    assert serving.pin_plan({0, 1}) == {"server_cpus": [0], "client_cpus": [1]}
    assert serving.pin_plan([3, 0, 2, 1]) == {"server_cpus": [0, 1, 2], "client_cpus": [3]}
    assert serving.pin_plan({0}) is None
    assert serving.parse_cpu_list(" 0-2,5\n") == {0, 1, 2, 5}


def _serving_json(rounds, **extra):
    """What serving.py --json writes, around summarise(rounds)."""
    return {**serving.summarise(rounds), "rounds": rounds, "pinned": {"enabled": False, "reason": "--no-pin"},
            "config": {"rounds": len(rounds) // 2}, "versions": {"vllm": "0.32.0"}, **extra}


def test_run_py_reads_serving_targets():
    """run.py's target line from serving.py's JSON: the verdict and the loss interval."""
    cases = {
        "not_met": _serving_json(_two_pct_slower()),
        "met": _serving_json(_rounds(6, lambda k: (1000, 20, 5), lambda k: (1000, 20, 5))),
        "noisy": _serving_json(_rounds(6, lambda k: (1000, 20, 5),
                                       lambda k: (1000 * (0.7, 1.3, 0.9, 1.1, 0.8, 1.2)[k - 1], 20, 5))),
    }
    code = (
        "import json, sys\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "import run\n"
        "cases = json.loads(sys.stdin.read())\n"
        "print(json.dumps({name: run.evaluate_targets({'serving': s, 'serving_overhead_ratio':"
        " s['serving_overhead_ratio']})['serving'] for name, s in cases.items()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FRAG_OTEL_")}
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(cases), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got["not_met"]["status"] == "NOT MET" and got["not_met"]["measured"].startswith("+1.9")
    assert "% [+1.9" in got["not_met"]["measured"]  # the loss interval
    assert got["met"]["status"] == "met"
    assert got["noisy"]["status"] == "not measured" and "not resolved (interval ±" in got["noisy"]["measured"]
    assert all("median throughput loss <= 1%" in t["target"] for t in got.values())


@pytest.mark.cpu_heavy
def test_quick_benchmark_runs_and_reports_every_headline(tmp_path):
    out = tmp_path / "bench.json"
    serving_json = tmp_path / "serving.json"  # the shape serving.py --json writes (its run takes minutes)
    fake = _serving_json(_two_pct_slower(), config={"rounds": 5})
    serving_json.write_text(json.dumps(fake))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FRAG_OTEL_")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--rounds", "1", "--profile", "--json", str(out),
         "--serving", str(serving_json)],
        env=env, capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("step_overhead_ratio", "step_overhead_ratio_with_spans", "vllm_kv_metrics_overhead_ratio",
                "step_overhead_ratio_by_scenario", "cpu_overhead_ratio", "collection_ms", "bytes_per_block"):
        assert key in result, key
    assert set(result["step_overhead_ratio_by_scenario"]) == {"pressured", "roomy", "seqs256", "seqs1024"}
    assert result["step_overhead_ratio"] > 0.5 and result["cpu_overhead_ratio"] > 0.5
    assert 8 <= result["bytes_per_block"] <= 16
    assert "=== plugin self time per hook" in proc.stdout and "=== hook ablation" in proc.stdout  # --profile
    assert result["collection_ms"] and all(v > 0 for v in result["collection_ms"].values())
    assert result["serving_overhead_ratio"] == fake["serving_overhead_ratio"]
    assert result["serving"]["config"] == {"rounds": 5} and result["serving"]["target"] == "NOT MET"
    for key in ("loss_ci95_pct", "throughput_ratio_ci95", "ttft_ratio_ci95", "itl_ratio_ci95", "pinned"):
        assert result["serving"][key] == fake[key], key
    assert result["targets"]["serving"]["status"] == "NOT MET"


def test_readme_instruction_tables_are_the_recorded_run():
    """The README's instruction ratios and per-part split are those of
    benchmarks/instructions.json (one run of `benchmarks/instructions.py`), not
    figures typed in by hand or left over from an earlier run."""
    import re

    recorded = json.loads((REPO / "benchmarks" / "instructions.json").read_text())["instructions"]
    readme = (REPO / "README.md").read_text()
    rows = {
        "plugin, metrics only": "plugin",
        "plugin with spans (default)": "plugin_spans",
        "vLLM `kv_cache_metrics`, sample rate 1.0": "vllm_kv_metrics",
    }
    for label, variant in rows.items():
        shown = re.search(rf"^\| {re.escape(label)} \| ×([\d.]+) \| ×([\d.]+) \| ×([\d.]+) \|$", readme, re.M)
        assert shown, f"no instruction row for {label!r} in the README"
        expected = [f"{recorded[s][variant]['ratio']:.3f}" for s in ("pressured", "seqs256", "seqs1024")]
        assert list(shown.groups()) == expected, label
    parts = recorded["seqs256"]["plugin_breakdown"]
    shown_parts = [int(n.replace(",", "")) for n in re.findall(r"^\| [^|]+ \| (-?[\d,]+) \| -?[\d.]+% \|$", readme, re.M)]
    assert shown_parts == [p["instructions"] for p in parts.values()]

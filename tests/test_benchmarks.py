"""The benchmark harness keeps working (a --quick smoke run; performance itself
is measured by `python benchmarks/run.py`, never by timed tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.cpu_heavy
def test_quick_benchmark_runs_and_reports_every_headline(tmp_path):
    out = tmp_path / "bench.json"
    serving = tmp_path / "serving.json"  # the shape serving.py --json writes (its run takes minutes)
    serving.write_text(json.dumps({
        "serving_overhead_ratio": 1.0123, "throughput_loss_pct": 1.215, "ttft_ratio": 1.02, "itl_ratio": 1.01,
        "target": {"throughput_loss_max_pct": 1.0, "median_loss_pct": 1.215, "resolved": True, "status": "NOT MET"},
        "config": {"pairs": 5}, "versions": {"vllm": "0.32.0"},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FRAG_OTEL_")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--rounds", "1", "--profile", "--json", str(out),
         "--serving", str(serving)],
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
    assert result["serving_overhead_ratio"] == 1.0123 and result["serving"]["config"] == {"pairs": 5}
    assert result["targets"]["serving"]["status"] == "NOT MET"

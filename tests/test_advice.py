"""The report's advice held to measurement (issue: advice that contradicted the sweep).

Unit part: which sweep rows measure a lever (that change alone), and the verdict's
direction at its thresholds. End to end: a run under pressure, its report's own sweep
command run as printed, and the report again with the sweep beside it: each piece of
advice carries the effect the sweep measured, recomputed here from sweep.csv.
"""

from __future__ import annotations

import csv
import io
import contextlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, simulate_into

from vllm_frag_otel import cli
from vllm_frag_otel.analysis import advice
from vllm_frag_otel.analysis.advice import Sweep
from vllm_frag_otel.analysis.sweep import Outcome, Setting


def _row(mean_latency_s: float = 10.0, preemptions: int = 50, prefix_hit_rate: float = 0.2, **setting) -> Outcome:
    """A sweep row: 100 usable blocks of 16, 8 seqs, prefix caching on, unless `setting` says otherwise."""
    base = dict(block_size=16, num_blocks=101, prefix_caching=True, max_num_seqs=8)
    return Outcome(Setting(**{**base, **setting}), steps=1000, internal_fragmentation=0.1, unused_slots=10.0,
                   slot_utilization=0.5, preemptions=preemptions, failed_allocations=500, allocation_attempts=5000,
                   prefix_hit_rate=prefix_hit_rate, tokens_per_step=9.0, mean_latency_s=mean_latency_s)


def test_a_lever_is_measured_only_by_rows_that_change_it_alone():
    base = _row()
    more = _row(num_blocks=201, mean_latency_s=6.0)
    more_and_fewer = _row(num_blocks=201, max_num_seqs=4, mean_latency_s=5.0)  # two changes
    fewer = _row(max_num_seqs=4, mean_latency_s=13.0, preemptions=10)
    smaller = _row(block_size=8, num_blocks=201, mean_latency_s=9.9)  # same memory, smaller blocks
    bigger = _row(block_size=32, num_blocks=51, mean_latency_s=9.0)
    sweep = Sweep(Path("s/sweep.json"), (base, more, more_and_fewer, fewer, smaller, bigger))
    assert advice.MORE_MEMORY.measured(sweep) == [more]
    assert advice.FEWER_SEQUENCES.measured(sweep) == [fewer]
    assert advice.SMALLER_BLOCKS.measured(sweep) == [smaller]
    assert "10.000 -> 6.000 s (-40.0%)" in advice.verdict(advice.MORE_MEMORY, [sweep])
    assert advice.verdict(advice.MORE_MEMORY, [sweep]).endswith(": it helps")
    # fewer sequences preempted less and took longer: the verdict follows latency
    assert "preemptions 50 -> 10" in advice.verdict(advice.FEWER_SEQUENCES, [sweep])
    assert advice.verdict(advice.FEWER_SEQUENCES, [sweep]).endswith("it made requests slower: not advised for this"
                                                                     " workload")
    assert advice.verdict(advice.SMALLER_BLOCKS, [sweep]).endswith("latency moved by less than 2.0%")
    assert advice.verdict(advice.SMALLER_BLOCKS, [Sweep(Path("x"), (base, more))]) is None  # not measured


@pytest.mark.parametrize(("latency", "expected"), [(9.79, "it helps"), (9.81, "less than"), (10.19, "less than"),
                                                   (10.21, "slower")])
def test_the_latency_verdict_turns_at_the_sweeps_own_threshold(latency, expected):
    sweep = Sweep(Path("s"), (_row(), _row(max_num_seqs=4, mean_latency_s=latency)))
    assert expected in advice.verdict(advice.FEWER_SEQUENCES, [sweep])


@pytest.mark.parametrize(("hits", "expected"), [(0.211, "it helps"), (0.205, "less than a percentage point"),
                                                (0.189, "prefix hits fell")])
def test_the_prefix_verdict_reads_the_hit_rate_not_latency(hits, expected):
    sweep = Sweep(Path("s"), (_row(), _row(num_blocks=201, mean_latency_s=5.0, prefix_hit_rate=hits)))
    assert expected in advice.verdict(advice.MORE_MEMORY, [sweep], on_prefix_hits=True)


def test_a_sweep_file_that_is_not_one_is_named_not_read(tmp_path):
    (tmp_path / "sweep.json").write_text('{"rows": [{"block_size": 16}]}')
    sweeps, problems = advice.find_sweeps([tmp_path])
    assert sweeps == [] and len(problems) == 1 and str(tmp_path / "sweep.json") in problems[0]


# -- end to end -----------------------------------------------------------------------------

PRESSURE = ["--workload", "uniform", "--num-requests", "60", "--num-blocks", "120", "--max-num-seqs", "12",
            "--seed", "5", "--block-map-every", "0", "--arrival-rate", "30"]


def _report(*inputs: Path, out: Path) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["report", *map(str, inputs), "--output", str(out), "--no-plots"]) == 0
    return printed.getvalue()


def _advice(printed: str) -> list[str]:
    section = printed.split("4. How to reduce it?\n")[1].split("\n\n")[0]
    return [re.sub(r"^  \d+\. ", "", line) for line in section.splitlines()]


@pytest.fixture(scope="module")
def advised(tmp_path_factory):
    root = tmp_path_factory.mktemp("advice")
    run = simulate_into(root / "run", PRESSURE, export_every=10)
    before = _advice(_report(run, out=root / "report"))
    command = re.search(r"`(vllm-frag-otel simulate --sweep [^`]+)`", before[-1]).group(1)
    args = shlex.split(command)[2:]  # as printed: the report's workload file and the run's settings
    args[args.index("--output") + 1] = str(root / "what-if")
    proc = subprocess.run([sys.executable, "-m", "vllm_frag_otel.cli", "simulate", *args], capture_output=True,
                          text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = _advice(_report(run, root / "what-if", out=root / "report-with-sweep"))
    with open(root / "what-if" / "sweep.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return before, after, rows, root / "what-if" / "sweep.json"


def test_without_a_sweep_every_suggested_change_is_marked_untested(advised):
    before, _, _, _ = advised
    pool, fewer = before[0], before[1]
    assert pool.startswith("The pool runs out (") and pool.endswith(f"{advice.UNTESTED}.")
    assert fewer.startswith("Admitting fewer requests at once") and fewer.endswith(f"{advice.UNTESTED}.")
    assert "--num-blocks 120 --block-size 16 --max-num-seqs 12 --step-seconds 0.02" in before[-1]


def test_with_the_sweep_each_change_carries_its_measured_effect(advised):
    _, after, rows, sweep_path = advised
    base = rows[0]
    assert (base["num_blocks"], base["block_size"], base["max_num_seqs"]) == ("120", "16", "12")  # the run's own

    def alone(**changed) -> list[dict]:
        keys = ("kv_slots", "block_size", "prefix_caching", "max_num_seqs")
        return [r for r in rows[1:] if all((r[k] == base[k]) != (k in changed) for k in keys)
                and all(cmp(float(r[k]), float(base[k])) for k, cmp in changed.items())]

    greater, less = (lambda a, b: a > b), (lambda a, b: a < b)
    for line, measured in ((after[0], alone(kv_slots=greater)), (after[1], alone(max_num_seqs=less))):
        best = min(measured, key=lambda r: float(r["mean_latency_s"]))
        old, new = float(base["mean_latency_s"]), float(best["mean_latency_s"])
        assert f"measured in {sweep_path}" in line
        assert f"mean request latency {old:.3f} -> {new:.3f} s ({(new - old) / old:+.1%})" in line
        assert f"preemptions {base['preemptions']} -> {best['preemptions']}" in line
        verdict = ("it helps" if new <= 0.98 * old else "it made requests slower" if new >= 1.02 * old
                   else "latency moved by less than")
        assert verdict in line
    # doubling this pool's memory halves its queueing; a lower --max-num-seqs does not help here
    assert after[0].endswith("it helps.") and "it helps" not in after[1]


def test_a_sweep_reads_back_as_it_was_written(tmp_path):
    from vllm_frag_otel.analysis import sweep

    outcomes = [_row(), _row(num_blocks=201, mean_latency_s=6.5, layout="full,sliding_window:128"),
                _row(block_size=8, num_blocks=201, prefix_caching=False, max_num_seqs=3, prefix_hit_rate=0.0)]
    sweep.write(outcomes, "text", tmp_path, pictures=False)
    assert sweep.read(tmp_path / "sweep.json") == outcomes


@pytest.mark.parametrize(("flags", "expected"), [
    (["--no-prefix-caching"], "Prefix caching was off (no token was looked up in the prefix cache)"),
    (["--prefix-groups", "0"], "The prefix cache found nothing to reuse: no request shared a full block's worth"),
])
def test_no_prefix_hits_is_told_apart_from_prefix_caching_off(tmp_path, flags, expected):
    """No hit because nothing was looked up (caching off) or because nothing was shared: two
    different answers, each marked untested, and the printed sweep starts from the run's own
    prefix-caching setting."""
    run = simulate_into(tmp_path / "run", ["--workload", "uniform", "--num-requests", "20", "--num-blocks", "300",
                                           "--block-map-every", "0", *flags], export_every=10)
    advised = _advice(_report(run, out=tmp_path / "report"))
    (line,) = [a for a in advised if a.startswith(expected)]
    assert "untested" in line
    assert ("--no-prefix-caching --output what-if`" in advised[-1]) == (flags == ["--no-prefix-caching"])

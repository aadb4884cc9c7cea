"""Workload trace files and arrival times: pure data, no vLLM."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vllm_frag_otel.sim import workloads
from vllm_frag_otel.jsonlines import InputProblem


def _write(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def test_trace_lines_become_requests_in_arrival_order(tmp_path):
    trace = tmp_path / "trace.jsonl"
    _write(trace, [
        json.dumps({"arrival_time": 100.5, "prompt_len": 40, "output_len": 7, "prefix_group": "bot"}),
        json.dumps({"arrival_time": 100.0, "prompt_len": 300, "output_len": 2}),
        json.dumps({"arrival_time": 101.0, "prompt_len": 90, "output_len": 5, "prefix_group": "bot"}),
        json.dumps({"arrival_time": 102.0, "prompt_len": 20, "output_len": 1, "prefix_group": "bot", "prefix_len": 8}),
    ])
    problems: list[InputProblem] = []
    specs = workloads.load_trace(trace, problems, prefix_len=32)
    assert problems == []
    assert [s.arrival_s for s in specs] == [0.0, 0.5, 1.0, 2.0]  # relative to the first arrival
    assert [len(s.prompt_tokens) for s in specs] == [300, 40, 90, 20]
    assert [s.output_len for s in specs] == [2, 7, 5, 1]
    shared, other, short = specs[1].prompt_tokens, specs[2].prompt_tokens, specs[3].prompt_tokens
    assert shared[:32] == other[:32] and shared[32] != other[32]  # a group shares --prefix-len tokens
    assert short[:8] == shared[:8] and short[8] != shared[8]  # a line's own prefix_len
    assert specs[0].prompt_tokens[:32] != shared[:32]


def test_trace_lengths_are_capped_to_the_model_length(tmp_path):
    trace = tmp_path / "trace.jsonl"
    _write(trace, [json.dumps({"prompt_len": 5000, "output_len": 5000})])
    (spec,) = workloads.load_trace(trace, [], max_len=1024)
    assert len(spec.prompt_tokens) == 1023 and spec.output_len == 1


def test_bad_trace_lines_are_named_by_file_and_line_and_skipped(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        json.dumps({"prompt_len": 10, "output_len": 3}) + "\n"
        + "{not json\n"
        + json.dumps({"prompt_len": 0, "output_len": 3}) + "\n"
        + json.dumps({"prompt": 10, "output_len": 3}) + "\n"
        + json.dumps({"prompt_len": 10, "output_len": 3, "arrival_time": "soon"}) + "\n"
        + "\n"
        + json.dumps({"prompt_len": 12, "output_len": 4}) + "\n"
        + '{"prompt_len": 12, "outp'  # a write cut short
    )
    problems: list[InputProblem] = []
    specs = workloads.load_trace(trace, problems)
    assert [len(s.prompt_tokens) for s in specs] == [10, 12]
    messages = [str(p) for p in problems]
    assert [p.line for p in problems] == [2, 3, 4, 5, 8]
    assert all(m.startswith(f"{trace}:") for m in messages)
    assert "not valid JSON" in messages[0]
    assert "prompt_len must be an integer >= 1, got 0" in messages[1]
    assert "unknown field(s) prompt" in messages[2]
    assert "arrival_time must be a number" in messages[3]
    assert "truncated line" in messages[4]


def test_poisson_arrivals_have_the_requested_rate_and_map_onto_steps():
    specs = workloads.generate("alpaca", 4000, seed=1, prefix_groups=0)
    timed = workloads.with_poisson_arrivals(specs, rate=50.0, seed=2)
    times = np.array([s.arrival_s for s in timed])
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    assert np.mean(np.diff(times)) == pytest.approx(1 / 50.0, rel=0.05)
    assert [s.prompt_tokens for s in timed] == [s.prompt_tokens for s in specs]  # same requests, same order
    steps = workloads.arrival_steps(timed, step_seconds=0.02)
    assert np.array_equal(steps, np.floor(times / 0.02).astype(np.int64))
    assert workloads.arrival_steps(specs, 0.02).tolist() == [0] * len(specs)  # no arrival times: all at once



def test_a_replayed_line_is_marked_and_the_mark_is_checked(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        json.dumps({"prompt_len": 10, "output_len": 3, "replayed": True}) + "\n"
        + json.dumps({"prompt_len": 11, "output_len": 3}) + "\n"
        + json.dumps({"prompt_len": 12, "output_len": 3, "replayed": "yes"}) + "\n"
    )
    problems: list[InputProblem] = []
    specs = workloads.load_trace(trace, problems)
    assert [(len(s.prompt_tokens), s.replayed) for s in specs] == [(10, True), (11, False)]
    assert [p.line for p in problems] == [3] and "replayed must be true or false, got 'yes'" in str(problems[0])


@pytest.mark.parametrize("arrival", [-1, -0.001, float("inf"), float("nan")])
def test_an_arrival_time_before_zero_or_never_is_named_by_line_and_field(tmp_path, arrival):
    trace = tmp_path / "trace.jsonl"
    _write(trace, [json.dumps({"prompt_len": 10, "output_len": 3}),
                   json.dumps({"arrival_time": arrival, "prompt_len": 10, "output_len": 3})])
    problems: list[InputProblem] = []
    assert len(workloads.load_trace(trace, problems)) == 1
    assert [str(p) for p in problems] == [f"{trace}:2: arrival_time must be a number of seconds >= 0, got {arrival!r}"]

"""Request mixes: synthetic ones, or a user's own trace file; pure data, no vLLM."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vllm_frag_otel.jsonlines import InputProblem, json_records

# name -> (mean prompt tokens, mean output tokens, lognormal sigma); means from
# the PagedAttention paper's dataset statistics.
WORKLOADS = {
    "sharegpt": (161.31, 337.99, 1.0),
    "alpaca": (19.31, 58.45, 0.6),
}
UNIFORM_RANGE = (16, 512)
# Fields of one line of a workload trace file (see load_trace).
TRACE_FIELDS = ("arrival_time", "prompt_len", "output_len", "prefix_group", "prefix_len", "replayed")


@dataclass(frozen=True)
class RequestSpec:
    prompt_tokens: list[int]
    output_len: int
    arrival_s: float = 0.0  # seconds after the first request
    # tokens a trace line asked for beyond the model length, cut off its prompt and its output
    prompt_cut: int = 0
    output_cut: int = 0
    replayed: bool = False  # a line of recorded traffic (`report`'s workload.jsonl), not a synthetic request


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, size: int) -> np.ndarray:
    return rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, size)


def generate(
    workload: str,
    num_requests: int,
    seed: int = 0,
    max_len: int = 4096,
    prefix_groups: int = 4,
    prefix_len: int = 64,
    vocab_size: int = 32000,
) -> list[RequestSpec]:
    """Requests with lengths drawn like `workload`'s; every other request starts
    with one of `prefix_groups` shared system prompts of `prefix_len` tokens."""
    rng = np.random.default_rng(seed)
    if workload == "uniform":
        prompt = rng.integers(*UNIFORM_RANGE, size=num_requests, endpoint=True)
        output = rng.integers(*UNIFORM_RANGE, size=num_requests, endpoint=True)
    elif workload in WORKLOADS:
        mean_in, mean_out, sigma = WORKLOADS[workload]
        prompt = _lognormal(rng, mean_in, sigma, num_requests)
        output = _lognormal(rng, mean_out, sigma, num_requests)
    else:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(workload_names())}")
    prefixes = [rng.integers(3, vocab_size, size=prefix_len).tolist() for _ in range(prefix_groups)]
    specs = []
    for i in range(num_requests):
        shared = prefixes[i % prefix_groups] if prefix_groups and i % 2 == 0 else []
        body_len = int(np.clip(round(prompt[i]), 1, max_len // 2))
        out_len = int(np.clip(round(output[i]), 1, max_len - len(shared) - body_len))
        body = rng.integers(3, vocab_size, size=body_len).tolist()
        specs.append(RequestSpec(shared + body, out_len))
    return specs


def workload_names() -> list[str]:
    return [*WORKLOADS, "uniform"]


def load_trace(
    path: Path,
    problems: list[InputProblem],
    seed: int = 0,
    max_len: int = 4096,
    prefix_len: int = 64,
    vocab_size: int = 32000,
) -> list[RequestSpec]:
    """A production mix to replay: one JSON object per line,

        {"arrival_time": 0.37, "prompt_len": 812, "output_len": 96, "prefix_group": "support-bot"}

    `arrival_time` (seconds >= 0, any origin; default 0: all at once), `prompt_len`
    and `output_len` (tokens, >= 1). Requests of one `prefix_group` share their
    first `prefix_len` prompt tokens (the per-line field, else the argument), like
    a system prompt. Token ids are random (seeded): only lengths and sharing matter
    to the KV cache. Prompt plus output is capped at `max_len`, as vLLM would refuse
    longer requests: the prompt to `max_len` - 1 tokens, then the output to what
    is left; what was cut is in `prompt_cut` and `output_cut` (see `cuts`).
    `replayed: true` marks a line `report` wrote from recorded traffic.
    Bad lines are reported in `problems`, by line and field, and left out: a
    caller replays the file only when there are none.
    """
    rng = np.random.default_rng(seed)
    prefixes: dict[str, list[int]] = {}
    rows: list[tuple[float, int, int, list[int], int, int, bool]] = []
    for number, record in json_records(path, problems, skipping=False):
        row = _trace_row(record)
        if isinstance(row, str):
            problems.append(InputProblem(path, number, row))
            continue
        arrival, asked_prompt, asked_output, group, group_prefix_len = row
        prompt_len = min(asked_prompt, max_len - 1)
        output_len = min(asked_output, max_len - prompt_len)
        shared: list[int] = []
        if group is not None:
            if group not in prefixes:
                prefixes[group] = rng.integers(3, vocab_size, size=max_len).tolist()
            shared = prefixes[group][: min(group_prefix_len or prefix_len, prompt_len)]
        body = rng.integers(3, vocab_size, size=prompt_len - len(shared)).tolist()
        rows.append((arrival, output_len, number, shared + body, asked_prompt - prompt_len, asked_output - output_len,
                     record.get("replayed") is True))
    if not rows:
        return []
    start = min(r[0] for r in rows)
    rows.sort(key=lambda r: (r[0], r[2]))  # by arrival, file order within a tie
    return [RequestSpec(tokens, output_len, arrival - start, prompt_cut, output_cut, replayed)
            for arrival, output_len, _, tokens, prompt_cut, output_cut, replayed in rows]


@dataclass(frozen=True)
class Cuts:
    """How many requests were cut to the model length, and by how much."""

    max_model_len: int
    requests: int  # cut at all
    prompts: int  # whose prompt was cut
    prompt_tokens: int  # cut off prompts, in all
    outputs: int
    output_tokens: int


def cuts(specs: Sequence[RequestSpec], max_model_len: int) -> Cuts:
    return Cuts(
        max_model_len,
        requests=sum(1 for s in specs if s.prompt_cut or s.output_cut),
        prompts=sum(1 for s in specs if s.prompt_cut),
        prompt_tokens=sum(s.prompt_cut for s in specs),
        outputs=sum(1 for s in specs if s.output_cut),
        output_tokens=sum(s.output_cut for s in specs),
    )


def _trace_row(record: object) -> tuple[float, int, int, str | None, int | None] | str:
    """The parsed fields of one trace line, or what is wrong with it."""
    if not isinstance(record, dict):
        return "expected a JSON object"
    unknown = set(record) - set(TRACE_FIELDS)
    if unknown:
        return f"unknown field(s) {', '.join(sorted(unknown))}; accepted: {', '.join(TRACE_FIELDS)}"
    values = []
    for name, required, minimum in (("prompt_len", True, 1), ("output_len", True, 1), ("prefix_len", False, 1)):
        value = record.get(name)
        if value is None and not required:
            values.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return f"{name} must be an integer >= {minimum}, got {value!r}"
        values.append(value)
    if not isinstance(record.get("replayed", False), bool):
        return f"replayed must be true or false, got {record['replayed']!r}"
    arrival = record.get("arrival_time", 0.0)
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not 0 <= arrival < float("inf"):
        return f"arrival_time must be a number of seconds >= 0, got {arrival!r}"
    group = record.get("prefix_group")
    prompt_len, output_len, prefix_len = values
    return float(arrival), prompt_len, output_len, None if group is None else str(group), prefix_len


def with_poisson_arrivals(specs: Sequence[RequestSpec], rate: float, seed: int = 0) -> list[RequestSpec]:
    """The same requests, in order, arriving as a Poisson process of `rate` per second
    (the first at 0)."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(specs))
    times = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    return [dataclasses.replace(spec, arrival_s=float(t)) for spec, t in zip(specs, times)]


def arrival_steps(specs: Sequence[RequestSpec], step_seconds: float) -> np.ndarray:
    """The scheduler step at which each request arrives, one step lasting `step_seconds`."""
    return np.floor(np.array([s.arrival_s for s in specs], dtype=np.float64) / step_seconds).astype(np.int64)

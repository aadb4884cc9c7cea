"""Synthetic request mixes: pure data, no vLLM."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# name -> (mean prompt tokens, mean output tokens, lognormal sigma); means from
# the PagedAttention paper's dataset statistics.
WORKLOADS = {
    "sharegpt": (161.31, 337.99, 1.0),
    "alpaca": (19.31, 58.45, 0.6),
}
UNIFORM_RANGE = (16, 512)


@dataclass(frozen=True)
class RequestSpec:
    prompt_tokens: list[int]
    output_len: int


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

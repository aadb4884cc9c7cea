"""Drive vLLM's real v1 scheduler and KV cache manager on the CPU.

No GPU and no weights: a local model config, and a fake model runner that
samples one random token for every request whose prefill is complete. The
scheduler, KV cache manager and block pool are vLLM's own, unmodified.
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vllm_frag_otel.sim import workloads
from vllm_frag_otel.core.state import FragmentationSnapshot

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_MODEL_DIR = str(Path(__file__).parent / "tiny_model")


# KV-cache layouts of model families, as comma-separated groups (see `parse_layout`).
LAYOUTS = {
    "full": "full",  # Llama 3, Qwen 3, Mistral: one full-attention group
    "mla": "mla",  # DeepSeek V3/R1, Kimi K2
    "gemma3": "full,sliding_window:1024",
    "gpt-oss": "full,sliding_window:128",
    "llama4": "full,chunked_local:8192",
    "qwen3-next": "full,mamba_align",  # Mamba states with prefix caching
    "jamba": "full,mamba",  # also Nemotron-H, Granite 4: one state block per request, no prefix caching
}
GROUP_KINDS = (
    "full", "mla", "sliding_window", "sliding_window_mla", "chunked_local", "rswa", "circular_buffer",
    "mamba", "mamba_align",
)
# kinds whose number after ":" is required: the window, chunk, R-SWA window or ring capacity in tokens
# (vLLM 0.33 cannot build a SinkFullAttentionManager: its __init__ rejects needs_kv_cache_zeroing)
_SIZED_KINDS = ("sliding_window", "sliding_window_mla", "chunked_local", "rswa", "circular_buffer")


@dataclass(frozen=True)
class GroupSpec:
    """One KV-cache group of a simulated model: its kind and, for windowed kinds,
    the window (chunk, ring capacity) in tokens."""

    kind: str
    window: int = 0


def parse_layout(layout: str) -> tuple[GroupSpec, ...]:
    """A preset name (`LAYOUTS`) or groups such as "full,sliding_window:128,mamba".

    Raises ValueError naming what is wrong.
    """
    description = LAYOUTS.get(layout, layout)
    groups = []
    for part in description.split(","):
        kind, _, window = part.strip().partition(":")
        if kind not in GROUP_KINDS:
            raise ValueError(f"unknown KV-cache group kind {kind!r} in layout {layout!r} "
                             f"(presets: {', '.join(LAYOUTS)}; group kinds: {', '.join(GROUP_KINDS)})")
        needs_window = kind in _SIZED_KINDS
        if needs_window != bool(window) or (window and (not window.isdigit() or int(window) < 1)):
            raise ValueError(f"{kind} in layout {layout!r} " + (
                "needs a window in tokens, e.g. sliding_window:128" if needs_window else "takes no window"))
        groups.append(GroupSpec(kind, int(window or 0)))
    return tuple(groups)


@dataclass(frozen=True)
class EngineShape:
    num_blocks: int = 2048
    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_prefix_caching: bool = True
    kv_events: bool = False
    kv_metrics_sample: float | None = None
    layout: str = "full"

    @property
    def groups(self) -> tuple[GroupSpec, ...]:
        return parse_layout(self.layout)

    @property
    def mamba_cache_mode(self) -> str:
        kinds = {g.kind for g in self.groups}
        return "align" if "mamba_align" in kinds else "none"

    @property
    def prefix_caching(self) -> bool:
        """Mamba states without "align" mode cannot be prefix-cached (vLLM refuses it)."""
        return self.enable_prefix_caching and not any(g.kind == "mamba" for g in self.groups)


def _group_spec(group: GroupSpec, shape: EngineShape):
    import torch
    from vllm.v1 import kv_cache_interface as kv

    attention = {"block_size": shape.block_size, "num_kv_heads": 1, "head_size": 1, "dtype": torch.float32}
    if group.kind == "full":
        return kv.FullAttentionSpec(**attention)
    if group.kind == "mla":
        return kv.MLAAttentionSpec(**attention)
    if group.kind == "sliding_window":
        return kv.SlidingWindowSpec(**attention, sliding_window=group.window)
    if group.kind == "sliding_window_mla":
        return kv.SlidingWindowMLASpec(**attention, sliding_window=group.window)
    if group.kind == "chunked_local":
        return kv.ChunkedLocalAttentionSpec(**attention, attention_chunk_size=group.window)
    if group.kind == "rswa":
        return kv.RSWASpec(**attention, rswa_window=group.window)
    if group.kind == "circular_buffer":
        return kv.CircularBufferSpec(**{**attention, "block_size": group.window})
    mode = "align" if group.kind == "mamba_align" else "none"
    # "none": one state block per request, as large as the model's context
    block_size = shape.block_size if mode == "align" else shape.max_model_len
    return kv.MambaSpec(block_size=block_size, shapes=((1,),), dtypes=(torch.float32,), mamba_cache_mode=mode)


def build_scheduler(shape: EngineShape):
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVEventsConfig,
        ModelConfig,
        ObservabilityConfig,
        SchedulerConfig,
        VllmConfig,
    )
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    model_config = _model_config(ModelConfig, shape.max_model_len)
    scheduler_config = SchedulerConfig(
        max_model_len=shape.max_model_len,
        is_encoder_decoder=False,
        max_num_seqs=shape.max_num_seqs,
        max_num_batched_tokens=shape.max_num_batched_tokens,
        enable_chunked_prefill=True,
        async_scheduling=False,
    )
    cache_config = CacheConfig(
        block_size=shape.block_size, cache_dtype="auto", enable_prefix_caching=shape.prefix_caching,
        mamba_cache_mode=shape.mamba_cache_mode,
    )
    vllm_config = VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        device_config=DeviceConfig(device="cpu"),
        kv_events_config=(
            KVEventsConfig(enable_kv_cache_events=True, publisher="null") if shape.kv_events else None
        ),
        observability_config=ObservabilityConfig(
            kv_cache_metrics=shape.kv_metrics_sample is not None,
            kv_cache_metrics_sample=shape.kv_metrics_sample or 0.01,
        ),
    )
    kv_cache_config = KVCacheConfig(
        num_blocks=shape.num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec([f"layer.{i}"], _group_spec(group, shape)) for i, group in enumerate(shape.groups)
        ],
    )
    cache_config.num_gpu_blocks = shape.num_blocks
    scheduler_block_size, hash_block_size = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
    return Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=scheduler_block_size,
        hash_block_size=hash_block_size,
        log_stats=True,
    )


_model_configs: dict[int, object] = {}


def _model_config(model_config_cls, max_model_len: int):
    """ModelConfig inspects the model in a subprocess: build one per length and reuse it."""
    if max_model_len not in _model_configs:
        _model_configs[max_model_len] = model_config_cls(
            model=TINY_MODEL_DIR, skip_tokenizer_init=True, dtype="float32", max_model_len=max_model_len, seed=0
        )
    return _model_configs[max_model_len]


_block_hasher_ready = False


def make_requests(prompts: Iterable[tuple[list[int], int]], block_size: int, id_prefix: str = "req",
                  progress=None):
    """vLLM Requests from (prompt token ids, output length) pairs. Each one hashes
    its prompt's blocks (tens of seconds for 300k requests): `progress` (anything
    with `update(n)`) counts the requests built."""
    global _block_hasher_ready
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    if not _block_hasher_ready:
        init_none_hash(sha256)
        _block_hasher_ready = True
    hasher = get_request_block_hasher(block_size, sha256)
    requests = []
    for i, (tokens, output_len) in enumerate(prompts):
        requests.append(Request(
            request_id=f"{id_prefix}-{i}",
            prompt_token_ids=list(tokens),
            sampling_params=SamplingParams(ignore_eos=True, max_tokens=output_len),
            pooling_params=None,
            block_hasher=hasher,
        ))
        if progress is not None and i % 1024 == 1023:
            progress.update(1024)
    if progress is not None:
        progress.update(len(requests) % 1024)
    return requests


@functools.cache
def _runner_output_has_index() -> bool:
    """vLLM 0.34 dropped ModelRunnerOutput.req_id_to_index (the order of req_ids says it)."""
    import dataclasses

    from vllm.v1.outputs import ModelRunnerOutput

    return any(f.name == "req_id_to_index" for f in dataclasses.fields(ModelRunnerOutput))


def fake_model_output(scheduler_output, scheduler, rng: random.Random):
    """One sampled token per request whose prefill completed this step."""
    from vllm.v1.outputs import ModelRunnerOutput

    req_ids = list(scheduler_output.num_scheduled_tokens)
    sampled = []
    for req_id in req_ids:
        request = scheduler.requests[req_id]
        done = request.num_computed_tokens >= request.num_tokens
        sampled.append([rng.randrange(3, 32000)] if done else [])
    fields = {"req_ids": req_ids, "sampled_token_ids": sampled}
    if _runner_output_has_index():
        fields["req_id_to_index"] = {r: i for i, r in enumerate(req_ids)}
    return ModelRunnerOutput(**fields)


def step(scheduler, rng: random.Random):
    """One engine step: schedule, fake the model, update. Returns both outputs."""
    scheduler_output = scheduler.schedule()
    engine_outputs = scheduler.update_from_output(
        scheduler_output, fake_model_output(scheduler_output, scheduler, rng)
    )
    return scheduler_output, engine_outputs


def run_to_completion(
    scheduler,
    requests,
    seed: int = 0,
    on_step: Callable[[object, object], None] | None = None,
    max_steps: int = 1_000_000,
    arrival_steps: Sequence[int] | None = None,
) -> int:
    """Step until every request has arrived and finished; returns the number of steps.

    Without `arrival_steps` all requests are added before the first step;
    otherwise request i is added just before step `arrival_steps[i]` (0-based),
    and steps with nothing to schedule still count: they are time passing.
    """
    rng = random.Random(seed)
    order = range(len(requests))
    pending = deque(order if arrival_steps is None else sorted(order, key=arrival_steps.__getitem__))
    steps = 0
    while pending or scheduler.has_requests():
        while pending and (arrival_steps is None or arrival_steps[pending[0]] <= steps):
            request = requests[pending.popleft()]
            request.arrival_time = time.time()  # it arrives now, as a server's front end stamps it
            scheduler.add_request(request)
        scheduler_output, engine_outputs = step(scheduler, rng)
        steps += 1
        if on_step is not None:
            on_step(scheduler_output, engine_outputs)
        if steps >= max_steps:
            raise RuntimeError(f"scheduler did not drain within {max_steps} steps")
    return steps


@dataclass
class RunResult:
    """What one run of a workload measured, step by step and request by request."""

    steps: int
    snapshots: list[FragmentationSnapshot]  # after each step
    scheduled_tokens: np.ndarray  # tokens scheduled in each step
    latency_steps: np.ndarray  # per finished request: steps from its arrival to its last token
    step_seconds: float
    interrupted: bool = False  # stopped by Ctrl-C before every request finished

    @property
    def simulated_seconds(self) -> float:
        """The serving time the run stands for: steps x step seconds."""
        return self.steps * self.step_seconds


def run_workload(
    shape: EngineShape,
    specs: Sequence[workloads.RequestSpec],
    step_seconds: float = 0.02,
    seed: int = 0,
    progress=None,
    on_step: Callable[[int], None] | None = None,
    keep_partial: bool = False,
    building=None,
) -> RunResult:
    """Run `specs` (arriving at their `arrival_s`, one scheduler step lasting
    `step_seconds`) on a fresh scheduler of `shape`, with the plugin's analyzer.

    `progress` (a tqdm bar, or anything with `update(n)`) counts finished
    requests, `building` the vLLM requests built before the first step;
    `on_step(steps so far)` runs after every step (telemetry exports).
    `keep_partial`: a Ctrl-C (KeyboardInterrupt) after the first step returns
    what the steps so far measured, marked `interrupted`, instead of raising.
    Raises ValueError when the plugin is not loaded.
    """
    from vllm_frag_otel import analyzer_for

    scheduler = build_scheduler(shape)
    analyzer = analyzer_for(scheduler)
    requests = make_requests([(s.prompt_tokens, s.output_len) for s in specs], scheduler.hash_block_size,
                             progress=building)
    arrivals = workloads.arrival_steps(specs, step_seconds).tolist()
    arrival_of = {r.request_id: a for r, a in zip(requests, arrivals)}
    snapshots: list[FragmentationSnapshot] = []
    scheduled: list[int] = []
    latencies: list[int] = []

    def record(scheduler_output, engine_outputs) -> None:
        snapshots.append(analyzer.snapshot())
        scheduled.append(scheduler_output.total_num_scheduled_tokens)
        finished = [o.request_id for outputs in engine_outputs.values() for o in outputs.outputs
                    if o.finish_reason is not None]
        latencies.extend(len(snapshots) - arrival_of[r] for r in finished)
        if progress is not None:
            progress.update(len(finished))
        if on_step is not None:
            on_step(len(snapshots))

    try:
        run_to_completion(
            scheduler, requests, seed=seed, on_step=record,
            max_steps=max(arrivals, default=0) + 1_000_000, arrival_steps=arrivals,
        )
        interrupted = False
    except KeyboardInterrupt:
        if not keep_partial or not snapshots:
            raise
        interrupted = True
    steps = min(len(snapshots), len(scheduled))  # a step the interrupt cut short is left out
    return RunResult(steps, snapshots[:steps], np.array(scheduled[:steps], dtype=np.int64),
                     np.array(latencies, dtype=np.int64), step_seconds, interrupted)

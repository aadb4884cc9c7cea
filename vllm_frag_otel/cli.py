"""`vllm-frag-otel`: run vLLM's real scheduler on a synthetic workload, with the plugin."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from vllm_frag_otel.workloads import workload_names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-frag-otel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser(
        "simulate",
        help="drive vLLM's real v1 scheduler and KV cache manager on the CPU and summarise fragmentation",
    )
    sim.add_argument("--workload", choices=workload_names(), default="sharegpt")
    sim.add_argument("--num-requests", type=int, default=500)
    sim.add_argument("--num-blocks", type=int, default=2048, help="KV-cache blocks in the pool")
    sim.add_argument("--block-size", type=int, default=16, help="tokens per block")
    sim.add_argument("--max-num-seqs", type=int, default=128)
    sim.add_argument("--max-num-batched-tokens", type=int, default=2048)
    sim.add_argument("--prefix-groups", type=int, default=4, help="shared system prompts (0: none)")
    sim.add_argument("--prefix-len", type=int, default=64, help="tokens per shared system prompt")
    sim.add_argument("--no-prefix-caching", action="store_true")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--output", type=Path, help="write telemetry files and summary.json here")
    return parser


def _positive(parser, args, *names) -> None:
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")


def simulate(args) -> int:
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        os.environ["VLLM_FRAG_OTEL_FILE_DIR"] = str(args.output / "telemetry")
    os.environ.setdefault("OTEL_METRIC_EXPORT_INTERVAL", "1000")
    print("loading vLLM (10-20 s) ...", file=sys.stderr, flush=True)
    from tqdm import tqdm
    from vllm.plugins import load_general_plugins

    from vllm_frag_otel import analyzer_for, sim, workloads
    from vllm_frag_otel.summary import field_statistics, render
    from vllm_frag_otel.telemetry import runtime

    load_general_plugins()
    # vLLM refuses a model longer than its pool at start-up; so does the simulator.
    max_model_len = min(4096, (args.num_blocks - 1) * args.block_size)
    shape = sim.EngineShape(
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
    )
    scheduler = sim.build_scheduler(shape)
    try:
        analyzer = analyzer_for(scheduler)
    except ValueError as exc:
        print(f"error: {exc}. Is VLLM_PLUGINS set without frag_otel, or VLLM_FRAG_OTEL_ENABLED=false?",
              file=sys.stderr)
        return 2
    specs = workloads.generate(
        args.workload, args.num_requests, seed=args.seed, max_len=max_model_len,
        prefix_groups=args.prefix_groups, prefix_len=args.prefix_len,
    )
    requests = sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], args.block_size)
    snapshots = []
    started = time.perf_counter()
    with tqdm(total=len(requests), desc="requests finished", unit="req", file=sys.stderr,
              disable=None) as progress:

        def on_step(scheduler_output, _engine_outputs) -> None:
            snapshots.append(analyzer.snapshot())
            progress.update(len(scheduler_output.finished_req_ids))

        steps = sim.run_to_completion(scheduler, requests, seed=args.seed, on_step=on_step)
    elapsed = time.perf_counter() - started
    telemetry = runtime()
    if telemetry is not None:
        telemetry.force_flush()
    stats = field_statistics(snapshots)
    print(render(stats, steps, args.block_size))
    print(f"\n  {len(requests)} requests in {elapsed:.1f} s of simulated scheduling")
    if args.output:
        summary = {
            "workload": args.workload,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "max_model_len": max_model_len,
            "steps": steps,
            "fields": stats,
        }
        (args.output / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"  summary: {args.output / 'summary.json'}; telemetry: {args.output / 'telemetry'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "simulate":
        _positive(parser, args, "num_requests", "block_size", "max_num_seqs", "max_num_batched_tokens")
        if args.num_blocks < 2:
            parser.error("--num-blocks must be >= 2 (block 0 is vLLM's null block)")
        return simulate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())

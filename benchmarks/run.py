#!/usr/bin/env python
"""Performance benchmark of vllm-frag-otel on vLLM's real v1 scheduler (CPU only).

    python benchmarks/run.py [--quick] [--json OUT] [--parts step,collection,memory]
                             [--rounds N] [--collect-every N] [--profile]

Measures, side by side in one process:

1. step time: scheduler.schedule() + scheduler.update_from_output() (the fake
   model output in between is not timed) on a fixed seeded ShareGPT-like
   workload, run to completion, for
     baseline         vLLM alone (plugin uninstrumented)
     plugin           every plugin hook on, plus a full metrics collection
                      every --collect-every steps and once at the end of the
                      run, all counted in the plugin's time. One collection is
                      what the plugin's exporter runs: MeterProvider.force_flush()
                      on a PeriodicExportingMetricReader(PointsExporter(a
                      MetricExporter that discards)): a snapshot of the pool,
                      the numpy fold of the buffered histogram values and every
                      gauge, counter and histogram point, built at export
     plugin_spans     as plugin, with per-request spans going to an in-memory
                      span exporter (only if this plugin version has spans)
     vllm_kv_metrics  vLLM's own KVCacheMetricsCollector, sample rate 1.0
     vllm_kv_events   vLLM's own KV events (publisher "null")
   The vLLM alternatives run without the plugin. Every round runs each variant
   once on the SAME workload and seed (order rotated from round to round), on a
   pool small enough to preempt and evict and one large enough not to; each
   variant's ratio is the median over rounds of (variant time / baseline time
   of the same round).
2. collection cost on a synthetic but realistic block map (KVCacheState built
   directly, no vLLM): KVCacheState.snapshot() and a full KVCacheMetrics
   collection (as above) at 10k, 100k and 1M blocks (512 requests, one decode
   token between two collections, no histogram values buffered); the cost per
   buffered histogram value of a collection (folded with numpy) and of
   buffering it on the hot path; and the cost of one
   hook-style event call (lock + on_blocks_allocated / on_blocks_released of
   4 blocks) at each size.
3. memory: bytes per block of KVCacheState (its per-block numpy arrays),
   bytes per in-flight request.

Readable table on stdout, progress on stderr, all numbers with --json OUT.
--profile adds, on the first (pressured) pool, the plugin's self time per
hook (us per call, % of baseline step time), a hook-group ablation and cProfile
listings (not in --json).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

from common import (
    BLOCK_SIZE, FLAT_TOLERANCE, TARGET_BYTES_PER_BLOCK, TARGET_COLLECTION_MS, TARGET_STEP_OVERHEAD,
    TARGET_STEP_OVERHEAD_WITH_SPANS, T0, log,
)
from collection import bench_collection, bench_events, bench_histograms, bench_memory
from hook_profile import profile
from step import FULL, QUICK, StepBench


def _fmt_ratio(q: dict) -> str:
    return f"{q['median']:.4f}  [{q['p25']:.4f} .. {q['p75']:.4f}]"


def render(result: dict) -> str:
    lines = []
    add = lines.append
    cfg = result["config"]
    add(f"vllm-frag-otel benchmark ({result['mode']}) — vLLM {result['environment']['vllm']}, "
        f"{result['environment']['cpus']} CPUs, python {result['environment']['python']}")
    if "scenarios" in result:
        add("")
        add(f"1. scheduler step time (schedule + update_from_output), seed 0, {cfg['rounds']} interleaved rounds;"
            " ratio = median [p25 .. p75] over rounds of variant/baseline; cpu = the process's CPU time"
            " (every thread, the fake model's too), variant/baseline")
        for name, sc in result["scenarios"].items():
            workload = "sharegpt" if sc["output_len"] == "sharegpt" else f"{sc['output_len']}-token decodes"
            add(f"   {name}: {sc['requests']} requests ({workload}), max_num_seqs {sc['max_num_seqs']}, "
                f"{sc['num_blocks']} blocks, {sc['steps']} steps, {sc['preemptions']} preemptions, "
                f"{sc['evictions']} evictions, baseline {sc['baseline_step_us']:.1f} us/step")
            add(f"     {'variant':17s} {'ratio  [p25 .. p75]':>30s} {'+us/step':>9s} {'cpu':>6s}  notes")
            for v, e in sc["variants"].items():
                note = ""
                if "hooks_only_ratio" in e:
                    share = e["collection_share_of_step_time"] * 100
                    note = (f"hooks only {e['hooks_only_ratio']:.4f}; {e['collections_per_run']} collections/run, "
                            f"{e['collection_ms_mean']:.2f} ms each (+{share:.2f}% of baseline time)")
                    if "spans" in e:
                        note += f"; {e['spans']} spans"
                add(f"     {v:17s} {_fmt_ratio(e['ratio']):>30s} {e['extra_us_per_step']:9.2f} "
                    f"{e['cpu_ratio']:6.3f}  {note}")
    if "collection" in result:
        add("")
        add("2. one collection on a synthetic block map (512 requests; median of repetitions)")
        add(f"   {'blocks':>9s} {'used':>8s} {'cached':>8s} {'free runs':>9s} {'snapshot ms':>12s} "
            f"{'collection ms':>14s} {'cold 1st snapshot ms':>21s} {'+region metric ms':>18s}")
        for c in result["collection"].values():
            add(f"   {c['num_blocks']:9d} {c['used']:8d} {c['cached']:8d} {c['free_runs']:9d} "
                f"{c['snapshot_ms']:12.3f} {c['collection_ms']:14.3f} {c['first_snapshot_ms']:21.1f} "
                f"{c['regions_ms']:18.3f}")
        add(f"   (+region metric: what the opt-in vllm.kv_cache.region.blocks adds to a collection, "
            f"{next(iter(result['collection'].values()))['regions']} regions)")
        add("   one block-layout map (opt-in, on the plugin's thread): state codes (the pool lock is held for"
            " part of it), then binning to 4096 cells and zlib")
        add(f"   {'blocks':>9s} {'codes ms':>9s} {'bin+zlib ms':>12s} {'bytes':>8s}")
        for c in result["collection"].values():
            add(f"   {c['num_blocks']:9d} {c['block_map_codes_ms']:9.3f} {c['block_map_encode_ms']:12.3f}"
                f" {c['block_map_bytes']:8d}")
        h = result["histogram"]
        add(f"   per buffered histogram value: {h['us_per_value']:.4f} us of collection "
            f"(fold_histograms alone {h['fold_us_per_value']:.4f} us; collection with {h['values']} values "
            f"{h['collection_full_ms']:.2f} ms vs {h['collection_empty_ms']:.2f} ms empty, 10k blocks); "
            f"{h['buffer_us_per_value']:.3f} us to buffer it on the hot path")
        add("   hook-style event call (lock + state method, 4 random blocks), us per call")
        add(f"   {'blocks':>9s} {'on_blocks_allocated':>20s} {'on_blocks_released':>19s}")
        for size, e in result["event_us_by_pool_size"].items():
            add(f"   {int(size):9d} {e['on_blocks_allocated']:20.3f} {e['on_blocks_released']:19.3f}")
    if "memory" in result:
        m = result["memory"]
        add("")
        add("3. memory")
        add(f"   per block:   {m['bytes_per_block']:.2f} bytes (tracemalloc, 1M-block KVCacheState: "
            f"{m['bytes_per_block_marginal']:.2f} per block + {m['fixed_bytes'] / 1e3:.1f} kB fixed); "
            f"per-block arrays {m['bytes_per_block_arrays']:.0f} bytes:")
        add("     " + ", ".join(f"{k} {m['per_block_array_types'].get(k, '')} {v}"
                                for k, v in m["per_block_arrays"].items()))
        if m.get("memoryviews"):
            add("     + views sharing their memory (not counted again): "
                + ", ".join(f"{k}->{v}" for k, v in m["memoryviews"].items()))
        add(f"   per request: {m['bytes_per_request']:.0f} bytes ({m['requests']} in-flight requests, "
            f"{m['blocks_per_request']:.1f} blocks each on average)")
    add("")
    add("targets")
    for t in result["targets"].values():
        add(f"   [{t['status']:>12s}] {t['target']}: {t['measured']}")
    add("")
    add(f"wall time {result['wall_s']:.1f} s")
    return "\n".join(lines)


def evaluate_targets(result: dict) -> dict:
    targets = {}

    def put(key, target, met, measured):
        status = "not measured" if met is None else ("met" if met else "NOT MET")
        targets[key] = {"target": target, "status": status, "measured": measured}

    if "scenarios" in result:
        per = {n: sc["variants"] for n, sc in result["scenarios"].items()}
        put("step_overhead", f"metrics only: step-time overhead <= {(TARGET_STEP_OVERHEAD - 1) * 100:.0f}%",
            all(v["plugin"]["ratio"]["median"] <= TARGET_STEP_OVERHEAD for v in per.values()),
            ", ".join(f"{n} {v['plugin']['ratio']['median']:.4f}" for n, v in per.items()))
        if all("plugin_spans" in v for v in per.values()):
            put("step_overhead_with_spans",
                f"default (spans on): step-time overhead <= {(TARGET_STEP_OVERHEAD_WITH_SPANS - 1) * 100:.0f}%",
                all(v["plugin_spans"]["ratio"]["median"] <= TARGET_STEP_OVERHEAD_WITH_SPANS for v in per.values()),
                ", ".join(f"{n} {v['plugin_spans']['ratio']['median']:.4f}" for n, v in per.items()))
            put("below_vllm_kv_metrics", "default (spans on) at or below vLLM's kv_cache_metrics (sample 1.0)",
                all(v["plugin_spans"]["ratio"]["median"] <= v["vllm_kv_metrics"]["ratio"]["median"]
                    for v in per.values()),
                ", ".join(f"{n} {v['plugin_spans']['ratio']['median']:.4f} vs "
                          f"{v['vllm_kv_metrics']['ratio']['median']:.4f}" for n, v in per.items()))
    if "collection" in result:
        for blocks, target in TARGET_COLLECTION_MS.items():
            ms = result["collection_ms"].get(str(blocks))
            put(f"collection_{blocks // 1_000_000}m", f"one collection <= {target} ms at {blocks // 1_000_000}M blocks",
                None if ms is None else ms <= target, "not measured (--quick)" if ms is None else f"{ms:.3f} ms")
        ev = result["event_us_by_pool_size"]
        spreads = {}
        for key in ("on_blocks_allocated", "on_blocks_released"):
            values = [e[key] for e in ev.values()]
            spreads[key] = max(values) / min(values)
        put("event_flat", f"per-event cost flat in pool size (largest/smallest <= {FLAT_TOLERANCE})",
            all(s <= FLAT_TOLERANCE for s in spreads.values()),
            ", ".join(f"{k} x{s:.2f} over {', '.join(ev)} blocks" for k, s in spreads.items()))
    if "memory" in result:
        b = result["memory"]["bytes_per_block"]
        m = result["memory"]
        put("bytes_per_block", f"<= {TARGET_BYTES_PER_BLOCK} bytes per block", b <= TARGET_BYTES_PER_BLOCK,
            f"{b:.2f} bytes at 1M blocks ({m['bytes_per_block_marginal']:.2f} per block + "
            f"{m['fixed_bytes'] / 1e3:.1f} kB fixed)")
    if "serving" in result:
        serving = result["serving"]
        # the verdict: met, NOT MET or not resolved (...), from the 95% interval of the median loss
        limit, status = serving["target_loss_max_pct"], serving["target"]
        resolved = status in ("met", "NOT MET")
        interval = " [{:+.2f} .. {:+.2f}]".format(*serving["loss_ci95_pct"])
        put("serving", f"real serving: median throughput loss <= {limit:g}% (serving.py)",
            status == "met" if resolved else None,
            f"{serving['throughput_loss_pct']:+.2f}%{interval} (serving_overhead_ratio "
            f"{result['serving_overhead_ratio']:.4f}; {status})")
    return targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run (under a minute)")
    parser.add_argument("--json", metavar="OUT", help="write all numbers as JSON to OUT")
    parser.add_argument("--parts", default="step,collection,memory", help="comma list of step, collection, memory")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 15, quick 3)")
    parser.add_argument("--collect-every", type=int, help="steps between two metrics collections (default 1000)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the plugin's costs")
    parser.add_argument("--serving", metavar="FILE",
                        help="a JSON written by serving.py --json: its ratios join this run's JSON and targets")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"step", "collection", "memory"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    rounds = args.rounds or cfg.rounds
    collect_every = args.collect_every or cfg.collect_every

    import vllm

    result: dict = {
        "mode": "quick" if args.quick else "full",
        "environment": {
            "vllm": vllm.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "config": {
            "rounds": rounds,
            "num_requests": cfg.num_requests,
            "seed": 0,
            "scenarios": {name: dataclasses.asdict(sc) for name, sc in cfg.scenarios.items()},
            "collect_every": collect_every,
            "block_size": BLOCK_SIZE,
        },
    }
    bench = None
    if "step" in parts or args.profile:
        log("loading vLLM and the plugin")
        bench = StepBench(collect_every)
    if "step" in parts:
        log(f"step time: {rounds} rounds x {len(cfg.scenarios)} pools x {len(bench.variants)} variants")
        scenarios = bench.experiment(cfg, rounds)
        result["scenarios"] = scenarios
        worst = {
            v: max(sc["variants"][v]["ratio"]["median"] for sc in scenarios.values())
            for v in bench.variants[1:]
        }
        result["step_overhead_ratio"] = worst["plugin"]
        result["vllm_kv_metrics_overhead_ratio"] = worst["vllm_kv_metrics"]
        result["vllm_kv_events_overhead_ratio"] = worst["vllm_kv_events"]
        if "plugin_spans" in worst:
            result["step_overhead_ratio_with_spans"] = worst["plugin_spans"]
        result["step_overhead_ratio_by_pool"] = {
            n: sc["variants"]["plugin"]["ratio"]["median"] for n, sc in scenarios.items()
        }
        result["step_overhead_ratio_by_scenario"] = {
            n: {v: sc["variants"][v]["ratio"]["median"] for v in bench.variants[1:]} for n, sc in scenarios.items()
        }
        result["cpu_overhead_ratio"] = max(sc["variants"]["plugin"]["cpu_ratio"] for sc in scenarios.values())
        if "plugin_spans" in worst:
            result["cpu_overhead_ratio_with_spans"] = max(
                sc["variants"]["plugin_spans"]["cpu_ratio"] for sc in scenarios.values())
    if "collection" in parts:
        collection = {}
        events = {}
        for size in cfg.pool_sizes:
            log(f"collection at {size} blocks ({cfg.collection_reps[size]} repetitions)")
            collection[str(size)] = bench_collection(size, cfg.collection_reps[size])
            log(f"event cost at {size} blocks")
            events[str(size)] = bench_events(size, cfg.event_groups, cfg.event_reps)
            gc.collect()
        result["collection"] = collection
        result["collection_ms"] = {k: v["collection_ms"] for k, v in collection.items()}
        result["snapshot_ms"] = {k: v["snapshot_ms"] for k, v in collection.items()}
        result["event_us_by_pool_size"] = events
        log("cost per buffered histogram value")
        result["histogram"] = bench_histograms()
        result["histogram_record_us_per_value"] = result["histogram"]["us_per_value"]
    if "memory" in parts:
        log("memory")
        memory = bench_memory(cfg.memory_requests)
        result["memory"] = memory
        result["bytes_per_block"] = memory["bytes_per_block"]
        result["bytes_per_request"] = memory["bytes_per_request"]
    if args.serving:
        serving = json.loads(Path(args.serving).read_text())
        result["serving_overhead_ratio"] = serving["serving_overhead_ratio"]
        result["serving"] = {key: serving[key] for key in (
            "throughput_loss_pct", "ttft_ratio", "itl_ratio", "target", "config", "versions",
            # since one-server-at-a-time rounds: the 95% bootstrap intervals
            "target_loss_max_pct", "throughput_ratio_ci95", "loss_ci95_pct", "loss_ci95_halfwidth_pct",
            "ttft_ratio_ci95", "itl_ratio_ci95", "pinned") if key in serving}
    result["wall_s"] = time.perf_counter() - T0
    result["targets"] = evaluate_targets(result)
    print(render(result), flush=True)
    if args.profile:
        log("profiling")
        print(profile(bench, cfg, pairs=1 if args.quick else 5, self_time_runs=1 if args.quick else 3), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
        log(f"wrote {args.json}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

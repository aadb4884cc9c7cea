"""2. Collection and event cost on a synthetic block map, and 3. memory (no vLLM)."""

from __future__ import annotations

import gc
import math
import statistics
import time
import tracemalloc

import numpy as np

from common import BLOCK_SIZE, _quantiles
from vllm_frag_otel.core.layout import BlockMap


REGIONS = 32  # the region metric's default (VLLM_FRAG_OTEL_REGIONS)

HISTOGRAM_METRICS = (
    "vllm.kv_cache.allocation.duration",
    "vllm.kv_cache.block.cache.duration",
    "vllm.kv_cache.block.idle.duration",
)


def _discarding_exporter():
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

    class DiscardingMetricExporter(MetricExporter):
        """Takes every export and drops it (keeps the last, to check its content)."""

        def __init__(self):
            super().__init__()
            self.exports = 0
            self.last = None

        def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs):
            self.exports += 1
            self.last = metrics_data
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
            pass

    return DiscardingMetricExporter()


class Collector:
    """The plugin's metrics pipeline over one pool, exporting to nowhere.

    `collect()` is one collection: MeterProvider.force_flush() on a
    PeriodicExportingMetricReader(PointsExporter(discarding exporter)) that
    never fires on its own: the SDK's one instrument of the plugin (its liveness
    gauge), then what PointsExporter adds (a snapshot of the pool, the numpy
    fold of the histogram values buffered since the last one, the gauge,
    counter and histogram points), handed to an exporter that drops them.
    """

    def __init__(self, state, guard=None, regions: int = 0):
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        from vllm_frag_otel.export.telemetry import POOL, SCOPE, PointsExporter, KVCacheMetrics

        self.sink = _discarding_exporter()
        exporter = PointsExporter(self.sink)
        self.provider = MeterProvider(
            metric_readers=[PeriodicExportingMetricReader(exporter, export_interval_millis=10**9)]
        )
        exporter.metrics = KVCacheMetrics(self.provider.get_meter(SCOPE, "bench"), guard, regions=regions)
        exporter.metrics.add_pool(state, {POOL: "0"})
        self.collect = self.provider.force_flush

    def exported_metric_names(self) -> set:
        """Metric names of the plugin's scope in the last export (the harness checks them)."""
        from vllm_frag_otel.export.telemetry import SCOPE

        if self.sink.last is None:
            return set()
        return {
            m.name
            for rm in self.sink.last.resource_metrics
            for sm in rm.scope_metrics
            if sm.scope.name == SCOPE
            for m in sm.metrics
        }

    def check(self) -> None:
        missing = set(HISTOGRAM_METRICS) - self.exported_metric_names()
        if missing:
            raise SystemExit(f"a collection exported no {', '.join(sorted(missing))} (exports: {self.sink.exports})")

    def shutdown(self) -> None:
        self.provider.shutdown()


class TableEntry:
    """What KVCacheState reads of a block-table entry (vLLM's KVCacheBlock)."""

    __slots__ = ("block_id",)

    def __init__(self, block_id: int):
        self.block_id = block_id


class FakeRequest:
    """What KVCacheState reads of a request."""

    __slots__ = ("num_computed_tokens", "capacity")

    def __init__(self, num_computed_tokens: int, capacity: int):
        self.num_computed_tokens = num_computed_tokens
        self.capacity = capacity


def build_block_map(num_blocks: int, num_requests: int, seed: int = 0):
    """A KVCacheState ~70% allocated in random-length runs, some runs released
    again (cached when hashed), ~60% of allocated blocks hashed, the rest
    shared out as block tables of `num_requests` requests (half of them
    sharing a 4-block system prompt) with a partly filled last block.

    Returns (state, requests, never-allocated free block ids)."""
    from vllm_frag_otel.core.state import GroupLayout, KVCacheState

    rng = np.random.default_rng(seed)
    now = time.monotonic()
    state = KVCacheState(num_blocks, [BLOCK_SIZE])
    tables, by_id = {}, {}
    state.attach_tables([GroupLayout("full_attention", BLOCK_SIZE)], [tables])
    state.attach_requests(by_id)
    lengths = rng.geometric(1 / 8, size=num_blocks)
    ends = np.cumsum(lengths)
    ends = ends[ends < num_blocks - 1]
    runs = np.split(np.arange(1, num_blocks), ends)
    allocated_runs = [run for run in runs if len(run) and rng.random() < 0.7]
    never = np.concatenate([run for run in runs if len(run)] or [np.empty(0, np.int64)])
    allocated = np.concatenate(allocated_runs)
    never = np.setdiff1d(never, allocated, assume_unique=True)
    for start in range(0, len(allocated), 4096):
        state.on_blocks_allocated(allocated[start : start + 4096].tolist(), now)
    for b in allocated[rng.random(len(allocated)) < 0.6].tolist():
        state.on_block_hashed(b, now)
    release = rng.random(len(allocated_runs)) < 0.15
    released = [run for run, rel in zip(allocated_runs, release) if rel]
    kept = [run for run, rel in zip(allocated_runs, release) if not rel]
    if released:
        state.on_blocks_released(np.concatenate(released).tolist(), now)
    used = np.concatenate(kept)
    prefix, rest = used[:4].tolist(), used[4:]
    requests = []
    for i, table in enumerate(np.array_split(rest, num_requests)):
        blocks = table.tolist()
        if i % 2 == 0:
            state.on_blocks_touched(prefix)
            blocks = prefix + blocks
        capacity = len(blocks) * BLOCK_SIZE
        req = FakeRequest(max(0, capacity - int(rng.integers(1, 2 * BLOCK_SIZE))), capacity)
        tables[f"req-{i}"] = [TableEntry(b) for b in blocks]
        by_id[f"req-{i}"] = req
        requests.append(req)
    return state, requests, never


def _advance(requests, tokens: int = 1) -> None:
    """One decode step: every request computes one more token (within its table)."""
    for req in requests:
        if req.num_computed_tokens + tokens <= req.capacity:
            req.num_computed_tokens += tokens


def bench_collection(num_blocks: int, reps: int, num_requests: int = 512) -> dict:
    t = time.perf_counter()
    state, requests, _ = build_block_map(num_blocks, num_requests)
    build_s = time.perf_counter() - t
    gc.collect()
    clock = time.perf_counter
    t = clock()
    snap = state.snapshot()  # cold: counts every full block of every request once
    first_ms = (clock() - t) * 1e3
    collector = Collector(state)
    collector.collect()  # warm-up: the SDK sets up its instruments; folds anything buffered
    collector.check()
    snapshot_ms, collection_ms = [], []
    for _ in range(reps):
        _advance(requests)
        t = clock()
        state.snapshot()
        snapshot_ms.append((clock() - t) * 1e3)
        _advance(requests)
        t = clock()
        collector.collect()
        collection_ms.append((clock() - t) * 1e3)
    collector.shutdown()
    # the opt-in live heat map (vllm.kv_cache.region.blocks, REGIONS regions): the same
    # collection with and without it, alternating; regions_ms is what it adds
    plain, with_regions = Collector(state), Collector(state, regions=REGIONS)
    for c in (plain, with_regions):
        c.collect()
    if "vllm.kv_cache.region.blocks" not in with_regions.exported_metric_names():
        raise SystemExit("a collection with the region metric on exported no vllm.kv_cache.region.blocks")
    plain_ms, regions_on_ms = [], []
    for _ in range(reps):
        for c, times in ((plain, plain_ms), (with_regions, regions_on_ms)):
            _advance(requests)
            t = clock()
            c.collect()
            times.append((clock() - t) * 1e3)
    for c in (plain, with_regions):
        c.shutdown()
    codes_ms, encode_ms = [], []
    for _ in range(reps):
        _advance(requests)
        t = clock()
        codes = state.block_states()
        codes_ms.append((clock() - t) * 1e3)
        t = clock()
        payload, _ = BlockMap.from_states(codes, 0, 4096).encode()
        encode_ms.append((clock() - t) * 1e3)
    return {
        "num_blocks": num_blocks,
        "requests": num_requests,
        "used": snap.used_blocks,
        "cached": snap.cached_blocks,
        "empty": snap.empty_blocks,
        "free_runs": snap.free_runs,
        "build_s": build_s,
        "first_snapshot_ms": first_ms,
        "snapshot_ms": statistics.median(snapshot_ms),
        "collection_ms": statistics.median(collection_ms),
        "collection_ms_p75": _quantiles(collection_ms)["p75"],
        "regions": REGIONS,
        "collection_regions_ms": statistics.median(regions_on_ms),
        "regions_ms": statistics.median(regions_on_ms) - statistics.median(plain_ms),
        "block_map_codes_ms": statistics.median(codes_ms),
        "block_map_encode_ms": statistics.median(encode_ms),
        "block_map_bytes": len(payload),
    }


def bench_histograms(num_values: int = 200_000, reps: int = 7) -> dict:
    """Cost of the histogram values buffered between two collections.

    At collection (the part that grows with them): (one collection with
    `num_values` allocate_slots durations buffered through
    `state.on_allocation(True, d, None)`, as the hook does with spans off -
    the same collection with none buffered) / num_values; every buffered value
    (one per allocate_slots call, two per evicted block) is folded with numpy
    into bucket counts. `fold_us_per_value` is `fold_histograms` alone, outside
    a collection. On the hot path: `buffer_us_per_value`, one on_allocation call
    (the Python loop calling it included; no lock)."""
    state, _, _ = build_block_map(10_000, 64)
    collector = Collector(state)
    collector.collect()
    collector.check()
    rng = np.random.default_rng(3)
    durations = rng.lognormal(np.log(2e-5), 1.0, num_values).tolist()
    on_allocation = state.on_allocation
    clock = time.perf_counter
    empty, full, buffer, fold = [], [], [], []
    gc.collect()
    for _ in range(reps):
        t = clock()
        collector.collect()
        empty.append(clock() - t)
        t = clock()
        for d in durations:
            on_allocation(True, d, None)
        buffer.append(clock() - t)
        t = clock()
        collector.collect()
        full.append(clock() - t)
        for d in durations:
            on_allocation(True, d, None)
        t = clock()
        state.fold_histograms(time.time_ns())
        fold.append(clock() - t)
    folded = state.allocation_duration["success"].count
    collector.collect()
    collector.shutdown()
    assert folded == 2 * reps * num_values, f"{folded} values folded, {2 * reps * num_values} buffered"
    assert state.dropped_measurements == 0
    empty_s, full_s = statistics.median(empty), statistics.median(full)
    return {
        "values": num_values,
        "collection_empty_ms": empty_s * 1e3,
        "collection_full_ms": full_s * 1e3,
        "us_per_value": (full_s - empty_s) / num_values * 1e6,
        "fold_us_per_value": statistics.median(fold) / num_values * 1e6,
        "buffer_us_per_value": statistics.median(buffer) / num_values * 1e6,
    }


def bench_events(num_blocks: int, groups: int, reps: int, group_size: int = 4) -> dict:
    """Hook-style calls (take the lock, report `group_size` block ids) on random
    never-used free blocks spread over the whole pool."""
    state, _, never = build_block_map(num_blocks, 256, seed=1)
    rng = np.random.default_rng(2)
    groups = min(groups, len(never) // group_size)
    picked = rng.choice(never, size=groups * group_size, replace=False).reshape(groups, group_size)
    id_groups = [g.tolist() for g in picked]
    lock, allocate, release = state.lock, state.on_blocks_allocated, state.on_blocks_released
    clock = time.perf_counter
    alloc_us, release_us = [], []
    now = time.monotonic()
    gc.collect()
    for _ in range(reps):
        rng.shuffle(id_groups)
        t0 = clock()
        for ids in id_groups:
            with lock:
                allocate(ids, now)
        t1 = clock()
        for ids in id_groups:
            with lock:
                release(ids, now)
        t2 = clock()
        alloc_us.append((t1 - t0) / groups * 1e6)
        release_us.append((t2 - t1) / groups * 1e6)
    return {
        "blocks_per_call": group_size,
        "on_blocks_allocated": statistics.median(alloc_us),
        "on_blocks_released": statistics.median(release_us),
    }


def bench_memory(num_requests: int) -> dict:
    from vllm_frag_otel.sim import workloads
    from vllm_frag_otel.core.state import GroupLayout, KVCacheState

    n = 1_000_000

    def traced_state(num_blocks: int):
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        state = KVCacheState(num_blocks, [BLOCK_SIZE])
        traced = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        return state, traced

    # the same at half the size: the slope is the per-block part, the rest is fixed
    half = n // 2
    traced_half = traced_state(half)[1]
    state, traced = traced_state(n)
    marginal = (traced - traced_half) / (n - half)
    # the per-block buffers themselves: every attribute owning memory for every block
    # (numpy arrays, bytearray, array.array; flags may be stored as 64-bit words of 8);
    # views and memoryviews over one of those share its memory and are listed apart,
    # not counted again
    attributes = vars(state)
    arrays, dtypes, views = {}, {}, {}
    for name, value in attributes.items():
        if isinstance(value, np.ndarray):
            if value.base is None and value.nbytes >= n:
                arrays[name], dtypes[name] = value.nbytes, str(value.dtype)
            elif value.shape == (n,):
                owner = next((k for k, v in attributes.items() if v is value.base), None)
                if owner is not None:
                    views[name] = owner
        elif isinstance(value, memoryview):
            if len(value) != n:
                continue
            owner = next((k for k, v in attributes.items() if v is value.obj), None)
            if owner is not None and not isinstance(attributes[owner], memoryview):
                views[name] = owner
            else:
                arrays[name], dtypes[name] = value.nbytes, f"memoryview {value.format}"
        elif isinstance(value, bytearray) or type(value).__name__ == "array":
            if len(value) == n:
                arrays[name] = len(value) * getattr(value, "itemsize", 1)
                dtypes[name] = type(value).__name__ + (f" {value.typecode}" if hasattr(value, "typecode") else "")
    del state, attributes

    # in-flight requests: prompt blocks at admission, then one block at a time (decode),
    # as the allocate_slots hook reports them; sizes from the ShareGPT-like workload
    specs = workloads.generate("sharegpt", num_requests, seed=7, max_len=4096)
    pool = 100_000
    rng = np.random.default_rng(7)
    calls, blocks_total = [], 0
    for i, spec in enumerate(specs):
        prompt_blocks = math.ceil(len(spec.prompt_tokens) / BLOCK_SIZE)
        total = math.ceil((len(spec.prompt_tokens) + spec.output_len // 2) / BLOCK_SIZE)  # mid-generation
        ids = rng.integers(1, pool, size=total).tolist()
        req = FakeRequest(total * BLOCK_SIZE - 3, total * BLOCK_SIZE)
        rid = f"cmpl-{i:08x}-0-{i:08x}"
        chunks = [ids[:prompt_blocks]] + [[b] for b in ids[prompt_blocks:]]
        calls.append((rid, req, chunks))
        blocks_total += total
    state = KVCacheState(pool, [BLOCK_SIZE])
    tables, by_id = {}, {}
    state.attach_tables([GroupLayout("full_attention", BLOCK_SIZE)], [tables])
    state.attach_requests(by_id)
    for rid, req, chunks in calls:  # vLLM's own tables and requests: not the plugin's memory
        tables[rid] = [TableEntry(b) for chunk in chunks for b in chunk]
        by_id[rid] = req
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    state.snapshot()  # the tables are read (and their block ids kept) at collection
    per_request = (tracemalloc.get_traced_memory()[0] - before) / num_requests
    tracemalloc.stop()
    return {
        "bytes_per_block": traced / n,
        "bytes_per_block_marginal": marginal,
        "fixed_bytes": traced - marginal * n,
        "bytes_per_block_arrays": sum(arrays.values()) / n,
        "per_block_arrays": {k: v // n for k, v in arrays.items()},
        "per_block_array_types": dtypes,
        "memoryviews": views,
        "bytes_per_request": per_request,
        "blocks_per_request": blocks_total / num_requests,
        "requests": num_requests,
    }



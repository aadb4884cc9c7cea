"""Incremental KV-cache block and request state: the pure core.

Knows nothing of vLLM or OpenTelemetry. The hook layer reports events as
block ids; every event costs O(1) per block it names. `snapshot()` does the
heavy work at collection time, vectorised with numpy over views that share
memory with the flat arrays the events write (bytearray / array.array item
assignment is several times cheaper from Python than numpy item assignment).

Block 0 is vLLM's null block: it is never tracked and excluded everywhere.
Callers hold `KVCacheState.lock` around event calls; `snapshot()` takes it.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np

from vllm_frag_otel.layout import CACHED, EMPTY, FREE, FULL, PARTIAL

NULL_BLOCK_ID = 0

# Why a cached block lost its prefix-cache entry.
EVICTION_REASONS = ("capacity", "explicit", "reset")
# Where a block handed to a request came from.
BLOCK_SOURCES = ("fresh", "recycled", "prefix_hit")
ALLOCATION_OUTCOMES = ("success", "failure")

# Values buffered per histogram between two collections; beyond this they are
# dropped and counted, so a stalled collection cannot grow memory without bound.
HISTOGRAM_BUFFER_LIMIT = 1 << 20

# Explicit bucket bounds in seconds. allocate_slots takes microseconds to a few
# milliseconds; cached blocks live from milliseconds (thrash) to hours (a hot
# system prompt).
ALLOCATION_BUCKETS = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
)
BLOCK_TIME_BUCKETS = (
    0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0,
)


class BucketHistogram:
    """A cumulative explicit-bucket histogram, folded in batches with numpy.

    Bucket i holds values in (bounds[i-1], bounds[i]], the OpenTelemetry rule.
    Per bucket it also keeps the last value that came with a tag (the span
    context of the request measured), for exemplars.
    """

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self._bounds = np.asarray(bounds, dtype=np.float64)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")
        # extremes since the last take_window_extremes(), for delta temporality
        self._window = (float("inf"), float("-inf"))
        # bucket -> (value, tag, fold time in ns)
        self.exemplars: dict[int, tuple[float, object, int]] = {}

    def fold(self, values: np.ndarray, tags: Sequence | None, time_ns: int) -> None:
        if not values.size:
            return
        buckets = np.searchsorted(self._bounds, values, side="left")
        self.counts += np.bincount(buckets, minlength=self.counts.size)
        self.count += int(values.size)
        self.sum += float(values.sum())
        low, high = float(values.min()), float(values.max())
        self.min, self.max = min(self.min, low), max(self.max, high)
        self._window = (min(self._window[0], low), max(self._window[1], high))
        if tags and any(tag is not None for tag in tags):
            unfilled = set(range(self.counts.size))
            for i in range(len(tags) - 1, -1, -1):  # newest first; stops once every bucket has one
                tag = tags[i]
                if tag is not None and int(buckets[i]) in unfilled:
                    unfilled.discard(int(buckets[i]))
                    self.exemplars[int(buckets[i])] = (float(values[i]), tag, time_ns)
                    if not unfilled:
                        break

    def take_window_extremes(self) -> tuple[float, float]:
        """Min and max of the values folded since the last call."""
        window, self._window = self._window, (float("inf"), float("-inf"))
        return window


class HasComputedTokens(Protocol):
    """What the core reads of a request: how many of its tokens are computed."""

    num_computed_tokens: int


@dataclass(frozen=True, slots=True)
class GroupSnapshot:
    """Token-slot usage of one KV-cache group (each group has its own block size)."""

    group: int
    block_size: int
    used_blocks: int
    allocated_slots: int
    used_slots: int
    unused_slots: int
    partial_blocks: int
    internal_fragmentation: float


@dataclass(frozen=True, slots=True)
class FragmentationSnapshot:
    """The pool as a whole at one instant (null block excluded).

    Gauges are instantaneous; the counters below them are cumulative since the
    pool was created.
    """

    num_blocks: int
    used_blocks: int
    cached_blocks: int
    free_blocks: int
    free_runs: int
    largest_free_run: int
    mean_free_run: float
    external_fragmentation: float
    allocated_slots: int
    used_slots: int
    unused_slots: int
    partial_blocks: int
    internal_fragmentation: float
    slot_utilization: float
    tracked_requests: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    prefix_resumed_queried_tokens: int
    prefix_resumed_hit_tokens: int
    evictions: int
    evicted_never_reused: int
    blocks_allocated_fresh: int
    blocks_allocated_recycled: int
    blocks_prefix_hit: int
    allocation_attempts: int
    allocation_failures: int
    preemptions: int
    groups: tuple[GroupSnapshot, ...] = ()

    @classmethod
    def numeric_fields(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "groups"]


class _RequestRecord:
    """Blocks one request holds, per group, in position order, and how many
    leading blocks of each group are already counted as full."""

    __slots__ = ("source", "blocks", "full")

    def __init__(self, source: HasComputedTokens, num_groups: int):
        self.source = source
        self.blocks: list[list[int]] = [[] for _ in range(num_groups)]
        self.full = [0] * num_groups


class KVCacheState:
    """Exact, incrementally maintained state of one block pool."""

    def __init__(self, num_blocks: int, block_sizes: Sequence[int]):
        if num_blocks < 2:
            raise ValueError("a pool needs the null block and at least one usable block")
        self.lock = threading.Lock()
        self.num_blocks = num_blocks  # including the null block
        self.block_sizes = list(block_sizes)
        n = num_blocks
        # 16 bytes per block: numpy arrays for the vectorised collection work,
        # memoryviews over the same memory for the per-event item access.
        self._free_view = np.ones(n, dtype=np.uint8)
        self._free_view[NULL_BLOCK_ID] = 0
        self._free_count = n - 1
        self._hashed_view = np.zeros(n, dtype=np.uint8)
        self._group_view = np.zeros(n, dtype=np.uint8)
        self._reused_view = np.zeros(n, dtype=np.uint8)  # hit since it was cached
        self._full_holders_view = np.zeros(n, dtype=np.int32)
        # milliseconds of the monotonic clock, modulo 2**32: durations up to 49 days
        self._cached_at_view = np.zeros(n, dtype=np.uint32)
        self._released_at_view = np.zeros(n, dtype=np.uint32)
        self._free, self._hashed, self._group, self._reused, self._full_holders, self._cached_at, self._released_at = (
            memoryview(a) for a in (
                self._free_view, self._hashed_view, self._group_view, self._reused_view,
                self._full_holders_view, self._cached_at_view, self._released_at_view,
            )
        )
        self._full_blocks = [0] * len(self.block_sizes)
        self._requests: dict[str, _RequestRecord] = {}

        # resumed (re-admitted after preemption) -> [queried, hit] tokens
        self.prefix_lookups = {False: [0, 0], True: [0, 0]}
        self.allocations = dict.fromkeys(ALLOCATION_OUTCOMES, 0)
        self.preemptions = 0
        self.block_sources = dict.fromkeys(BLOCK_SOURCES, 0)
        # (reason, reused since cached) -> evicted blocks
        self.evictions = {(r, reused): 0 for r in EVICTION_REASONS for reused in (False, True)}
        # raw measurements since the last fold (the hot path only appends) ...
        self._allocation_durations: dict[str, array] = {o: array("d") for o in ALLOCATION_OUTCOMES}
        # ... with an opaque tag per duration (the span layer's context for exemplars), or None
        self._allocation_tags: dict[str, list] = {o: [] for o in ALLOCATION_OUTCOMES}
        self._block_cache_durations = array("d")
        self._block_idle_durations = array("d")
        self.dropped_measurements = 0
        # ... folded at collection time into cumulative histograms
        self._fold_lock = threading.Lock()
        self.allocation_duration = {o: BucketHistogram(ALLOCATION_BUCKETS) for o in ALLOCATION_OUTCOMES}
        self.block_cache_duration = BucketHistogram(BLOCK_TIME_BUCKETS)
        self.block_idle_duration = BucketHistogram(BLOCK_TIME_BUCKETS)

    # -- configuration -------------------------------------------------------

    def set_block_sizes(self, block_sizes: Sequence[int]) -> None:
        """Name the KV-cache groups; only valid before any request is tracked."""
        if self._requests:
            raise RuntimeError("groups must be set before requests are tracked")
        self.block_sizes = list(block_sizes)
        self._full_blocks = [0] * len(self.block_sizes)

    # -- block events ----------------------------------------------------------

    def on_blocks_allocated(self, block_ids: Iterable[int], now: float) -> None:
        """Blocks popped from the free list; any cached content they held is gone."""
        free, hashed, sources = self._free, self._hashed, self.block_sources
        count = 0
        for b in block_ids:
            count += 1
            if hashed[b]:
                self._evict(b, "capacity", now)
                sources["recycled"] += 1
            else:
                sources["fresh"] += 1
            free[b] = 0
        self._free_count -= count

    def on_blocks_touched(self, block_ids: Iterable[int]) -> None:
        """Prefix-cache hits: cached blocks gain a holder (and leave the free list)."""
        free, reused = self._free, self._reused
        count = 0
        for b in block_ids:
            count += 1
            reused[b] = 1
            if free[b]:
                free[b] = 0
                self._free_count -= 1
        self.block_sources["prefix_hit"] += count

    def on_blocks_released(self, block_ids: Iterable[int], now: float) -> None:
        """Blocks whose last holder let go (ref_cnt reached 0)."""
        free, released_at = self._free, self._released_at
        now_ms = _ms(now)
        for b in block_ids:
            if not free[b]:
                free[b] = 1
                released_at[b] = now_ms
                self._free_count += 1

    def on_block_hashed(self, block_id: int, now: float) -> None:
        if not self._hashed[block_id]:
            self._hashed[block_id] = 1
            self._cached_at[block_id] = _ms(now)
            self._reused[block_id] = 0

    def on_block_unhashed(self, block_id: int, reason: str, now: float) -> None:
        if self._hashed[block_id]:
            self._evict(block_id, reason, now)

    def on_block_hash_moved(self, src: int, dst: int) -> None:
        """The prefix-cache entry of `src` now lives in `dst`; nothing was evicted."""
        if self._hashed[src]:
            self._hashed[src] = 0
            self._hashed[dst] = 1
            self._cached_at[dst] = self._cached_at[src]
            self._reused[dst] = self._reused[src]

    def on_cache_reset(self, now: float) -> None:
        """Every prefix-cache entry was dropped at once (rare: weight updates, benchmarks)."""
        ids = np.flatnonzero(self._hashed_view)
        if not ids.size:
            return
        reused = self._reused_view[ids] > 0
        for flag in (False, True):
            self.evictions[("reset", flag)] += int(np.count_nonzero(reused == flag))
        now_ms = np.uint32(_ms(now))
        idle = np.where(self._free_view[ids] == 1, (now_ms - self._released_at_view[ids]) / 1000.0, 0.0)
        self._buffer(self._block_cache_durations, ((now_ms - self._cached_at_view[ids]) / 1000.0).tolist())
        self._buffer(self._block_idle_durations, idle.tolist())
        self._hashed_view[ids] = 0

    def _evict(self, b: int, reason: str, now: float) -> None:
        self._hashed[b] = 0
        self.evictions[(reason, self._reused[b] > 0)] += 1
        now_ms = _ms(now)
        self._buffer(self._block_cache_durations, (((now_ms - self._cached_at[b]) & _MS_MASK) / 1000.0,))
        idle = ((now_ms - self._released_at[b]) & _MS_MASK) / 1000.0 if self._free[b] else 0.0
        self._buffer(self._block_idle_durations, (idle,))

    # -- request events ----------------------------------------------------------

    def on_request_blocks(
        self, request_id: str, source: HasComputedTokens, group: int, new_block_ids: Iterable[int]
    ) -> None:
        """Blocks appended to a request's block table in one group."""
        record = self._requests.get(request_id)
        if record is None:
            record = self._requests[request_id] = _RequestRecord(source, len(self.block_sizes))
        blocks = record.blocks[group]
        group_of = self._group
        for b in new_block_ids:
            blocks.append(b)
            if b != NULL_BLOCK_ID:
                group_of[b] = group

    def request_block_count(self, request_id: str, group: int) -> int:
        record = self._requests.get(request_id)
        return len(record.blocks[group]) if record is not None else 0

    def on_request_released(self, request_id: str) -> None:
        """The request no longer holds its blocks (finished, aborted or preempted)."""
        record = self._requests.pop(request_id, None)
        if record is None:
            return
        holders = self._full_holders
        for g, blocks in enumerate(record.blocks):
            for i in range(record.full[g]):
                b = blocks[i]
                if b != NULL_BLOCK_ID:
                    holders[b] -= 1
                    if holders[b] == 0:
                        self._full_blocks[g] -= 1

    def request_blocks_held(self, request_id: str) -> int:
        record = self._requests.get(request_id)
        if record is None:
            return 0
        return sum(len(blocks) - blocks.count(NULL_BLOCK_ID) for blocks in record.blocks)

    def request_slots(self, request_id: str) -> tuple[int, int]:
        """(allocated, used) token slots in this request's own blocks, not deduplicated."""
        record = self._requests.get(request_id)
        if record is None:
            return 0, 0
        computed = record.source.num_computed_tokens
        allocated = used = 0
        for blocks, block_size in zip(record.blocks, self.block_sizes):
            for i, b in enumerate(blocks):
                if b != NULL_BLOCK_ID:
                    allocated += block_size
                    used += min(block_size, max(0, computed - i * block_size))
        return allocated, used

    def on_prefix_lookup(self, queried_tokens: int, hit_tokens: int, resumed: bool) -> None:
        """A prefix-cache lookup at admission; `resumed` when re-admitted after preemption."""
        totals = self.prefix_lookups[resumed]
        totals[0] += queried_tokens
        totals[1] += hit_tokens

    def on_allocation(self, succeeded: bool, duration_s: float, tag: object = None) -> None:
        outcome = "success" if succeeded else "failure"
        self.allocations[outcome] += 1
        durations = self._allocation_durations[outcome]
        if len(durations) < HISTOGRAM_BUFFER_LIMIT:
            durations.append(duration_s)
            self._allocation_tags[outcome].append(tag)
        else:
            self.dropped_measurements += 1

    def on_preemption(self) -> None:
        self.preemptions += 1

    # -- collection ----------------------------------------------------------------

    def _buffer(self, buf: array, values: Sequence[float]) -> bool:
        """Buffer values for the next collection; False if any had to be dropped."""
        room = HISTOGRAM_BUFFER_LIMIT - len(buf)
        if room >= len(values):
            buf.extend(values)
            return True
        buf.extend(values[: max(room, 0)])
        self.dropped_measurements += len(values) - max(room, 0)
        return False

    def fold_histograms(self, time_ns: int) -> None:
        """Fold the measurements buffered since the last call into the histograms.

        The buffers are swapped out under the pool lock (O(1)); the numpy work
        runs outside it, so the scheduler is never held up by it.
        """
        with self._fold_lock:
            with self.lock:
                allocations = {o: (buf, self._allocation_tags[o]) for o, buf in self._allocation_durations.items()}
                cache, idle = self._block_cache_durations, self._block_idle_durations
                self._allocation_durations = {o: array("d") for o in ALLOCATION_OUTCOMES}
                self._allocation_tags = {o: [] for o in ALLOCATION_OUTCOMES}
                self._block_cache_durations, self._block_idle_durations = array("d"), array("d")
            for outcome, (durations, tags) in allocations.items():
                self.allocation_duration[outcome].fold(np.frombuffer(durations, dtype=np.float64), tags, time_ns)
            self.block_cache_duration.fold(np.frombuffer(cache, dtype=np.float64), None, time_ns)
            self.block_idle_duration.fold(np.frombuffer(idle, dtype=np.float64), None, time_ns)

    def _sync_computed_tokens(self) -> dict[int, list[int]]:
        """Bring full-block holder counts up to each request's computed tokens.

        Returns, per group, the fill of every block that is some request's
        partially filled tail, keyed by block id (max over its holders).
        """
        holders, full_blocks = self._full_holders, self._full_blocks
        partial: list[dict[int, int]] = [{} for _ in self.block_sizes]
        for record in self._requests.values():
            computed = record.source.num_computed_tokens
            for g, block_size in enumerate(self.block_sizes):
                blocks = record.blocks[g]
                target = min(len(blocks), computed // block_size)
                counted = record.full[g]
                for i in range(counted, target):
                    b = blocks[i]
                    if b != NULL_BLOCK_ID:
                        holders[b] += 1
                        if holders[b] == 1:
                            full_blocks[g] += 1
                for i in range(target, counted):
                    b = blocks[i]
                    if b != NULL_BLOCK_ID:
                        holders[b] -= 1
                        if holders[b] == 0:
                            full_blocks[g] -= 1
                record.full[g] = target
                tail = computed - target * block_size
                if target < len(blocks) and tail > 0 and blocks[target] != NULL_BLOCK_ID:
                    b = blocks[target]
                    if partial[g].get(b, 0) < tail:
                        partial[g][b] = tail
        return partial

    def block_states(self) -> np.ndarray:
        """The state code (`layout.BLOCK_STATES`) of every usable block, block 1 first.

        Under the pool lock only the holder counts are brought up to date and
        the per-block flags read (O(requests) plus a few vectorised passes);
        the codes are built outside it.
        """
        with self.lock:
            partial = self._sync_computed_tokens()
            free = self._free_view[1:].copy()
            hashed = self._hashed_view[1:].copy()
            full = self._full_holders_view[1:] > 0
            tails = [b for group in partial for b in group]
        codes = np.where(free == 1, np.where(hashed == 1, CACHED, FREE), np.where(full, FULL, EMPTY)).astype(np.uint8)
        if tails:
            ids = np.asarray(tails, dtype=np.intp) - 1
            codes[ids] = np.where(codes[ids] == EMPTY, PARTIAL, codes[ids])
        return codes

    def snapshot(self) -> FragmentationSnapshot:
        with self.lock:
            partial = self._sync_computed_tokens()
            usable = self.num_blocks - 1
            free_blocks = self._free_count
            used_blocks = usable - free_blocks
            free_mask = self._free_view[1:]
            cached_blocks = int(np.count_nonzero(free_mask & self._hashed_view[1:]))
            # run edges: where the free flag changes, the mask padded with used on both ends
            padded = np.zeros(free_mask.size + 2, dtype=np.uint8)
            padded[1:-1] = free_mask
            edges = np.flatnonzero(padded[1:] != padded[:-1])
            run_lengths = edges[1::2] - edges[::2]
            free_runs = int(run_lengths.size)
            largest = int(run_lengths.max()) if free_runs else 0

            if len(self.block_sizes) == 1:
                used_per_group = [used_blocks]
            else:
                used_ids = np.flatnonzero(free_mask == 0) + 1
                used_per_group = np.bincount(
                    self._group_view[used_ids], minlength=len(self.block_sizes)
                ).tolist()
            holders = self._full_holders
            groups = []
            for g, block_size in enumerate(self.block_sizes):
                tails = [fill for b, fill in partial[g].items() if holders[b] == 0]
                used_slots = self._full_blocks[g] * block_size + sum(tails)
                allocated = used_per_group[g] * block_size
                groups.append(
                    GroupSnapshot(
                        group=g,
                        block_size=block_size,
                        used_blocks=used_per_group[g],
                        allocated_slots=allocated,
                        used_slots=used_slots,
                        unused_slots=allocated - used_slots,
                        partial_blocks=len(tails),
                        internal_fragmentation=_ratio(allocated - used_slots, allocated),
                    )
                )
            allocated_slots = sum(gs.allocated_slots for gs in groups)
            used_slots = sum(gs.used_slots for gs in groups)
            evictions = sum(self.evictions.values())
            never_reused = sum(v for (_, reused), v in self.evictions.items() if not reused)
            return FragmentationSnapshot(
                num_blocks=usable,
                used_blocks=used_blocks,
                cached_blocks=cached_blocks,
                free_blocks=free_blocks,
                free_runs=free_runs,
                largest_free_run=largest,
                mean_free_run=free_blocks / free_runs if free_runs else 0.0,
                external_fragmentation=1.0 - largest / free_blocks if free_blocks else 0.0,
                allocated_slots=allocated_slots,
                used_slots=used_slots,
                unused_slots=allocated_slots - used_slots,
                partial_blocks=sum(gs.partial_blocks for gs in groups),
                internal_fragmentation=_ratio(allocated_slots - used_slots, allocated_slots),
                slot_utilization=_ratio(used_slots, usable * max(self.block_sizes)),
                tracked_requests=len(self._requests),
                prefix_queried_tokens=self.prefix_lookups[False][0] + self.prefix_lookups[True][0],
                prefix_hit_tokens=self.prefix_lookups[False][1] + self.prefix_lookups[True][1],
                prefix_resumed_queried_tokens=self.prefix_lookups[True][0],
                prefix_resumed_hit_tokens=self.prefix_lookups[True][1],
                evictions=evictions,
                evicted_never_reused=never_reused,
                blocks_allocated_fresh=self.block_sources["fresh"],
                blocks_allocated_recycled=self.block_sources["recycled"],
                blocks_prefix_hit=self.block_sources["prefix_hit"],
                allocation_attempts=sum(self.allocations.values()),
                allocation_failures=self.allocations["failure"],
                preemptions=self.preemptions,
                groups=tuple(groups),
            )


_MS_MASK = 0xFFFFFFFF


def _ms(seconds: float) -> int:
    """A monotonic time in seconds as uint32 milliseconds (wrapping; differences stay right)."""
    return int(seconds * 1000.0) & _MS_MASK


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0

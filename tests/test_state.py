"""The pure core alone: no vLLM, no OpenTelemetry. Hand-built block layouts
with numbers worked out on paper."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
from hypothesis import example, given, strategies as st

import numpy as np

from vllm_frag_otel.core import state as state_module
from vllm_frag_otel.core.layout import CACHED
from vllm_frag_otel.core.state import BucketHistogram, GroupLayout, KVCacheState, free_run_stats


@dataclass
class Req:
    num_computed_tokens: int


@dataclass(frozen=True)
class Block:
    """A block-table entry as the core reads it; id 0 is the null block."""

    block_id: int


def _tables(*ids: int) -> list[Block]:
    return [Block(b) for b in ids]


def _state(num_blocks: int, groups: list[GroupLayout], tables: list[dict], requests: dict) -> KVCacheState:
    s = KVCacheState(num_blocks, [g.block_size for g in groups])
    s.attach_tables(groups, tables)
    s.attach_requests(requests)
    held = {b.block_id for group in tables for table in group.values() for b in table if b.block_id}
    s.on_blocks_allocated(sorted(held), now=0.0)
    return s


FULL4 = GroupLayout("full_attention", 4)


def _runs_by_walking(mask: list[int]) -> tuple[int, int]:
    runs = longest = length = 0
    for free in mask:
        length = length + 1 if free else 0
        runs += length == 1
        longest = max(longest, length)
    return runs, longest


# masks of short and long runs: a run across wholly free 64-block words takes the
# whole-word path, one across a word boundary the boundary path, short runs the in-word one
_runs = st.lists(
    st.tuples(st.booleans(), st.one_of(st.integers(1, 9), st.integers(10, 90), st.integers(100, 400))), max_size=40
)


@given(_runs)
def test_free_run_stats_match_a_walk_over_the_mask(runs):
    mask = [int(free) for free, length in runs for _ in range(length)]
    assert free_run_stats(np.array(mask, dtype=np.uint8)) == _runs_by_walking(mask)


def test_free_run_stats_of_single_runs_and_gaps_at_word_edges():
    """A run, or a used stretch in a free pool, from and to either side of each
    word edge over three words (block i of the mask is bit i + 1: the null block first)."""
    n = 150
    edges = sorted({0, 1, 30, n - 1, n} | {edge + d for edge in (63, 127) for d in range(-2, 3)})
    for start in edges:
        for end in (e for e in edges if e > start):
            for used in (0, 1):
                mask = [used] * n
                mask[start:end] = [1 - used] * (end - start)
                assert free_run_stats(np.array(mask, dtype=np.uint8)) == _runs_by_walking(mask), (start, end, used)


@pytest.mark.parametrize(
    "runs, longest",
    [
        # inside one word, touching neither edge: one longer than a run across an edge
        ([(64, 62), (159, 61)], 62),
        # across an edge, 63 blocks either side: one longer than a run over a wholly free word
        ([(64, 126), (225, 125)], 126),
    ],
)
def test_free_run_stats_find_the_longest_run_however_it_lies_in_words(runs, longest):
    mask = np.zeros(400, dtype=np.uint8)  # block i of the mask is bit i + 1 (the null block first)
    for start, length in runs:
        mask[start : start + length] = 1
    assert free_run_stats(mask) == (len(runs), longest)


def test_free_runs_and_external_fragmentation():
    s = KVCacheState(11, [4])  # blocks 1..10 usable
    s.on_blocks_allocated([1, 2, 5, 9], now=0.0)
    snap = s.snapshot()
    # free: 3-4, 6-8, 10 -> runs of 2, 3, 1
    assert (snap.free_blocks, snap.used_blocks, snap.free_runs, snap.largest_free_run) == (6, 4, 3, 3)
    assert snap.mean_free_run == pytest.approx(2.0)
    assert snap.empty_blocks == 6  # nothing cached: every free block is empty
    # the 3 free blocks outside the largest run, of the 10 usable
    assert snap.external_fragmentation == pytest.approx(3 / 10)
    s.on_blocks_allocated([3, 4, 6, 7, 8, 10], now=0.0)
    full = s.snapshot()
    assert (full.free_blocks, full.free_runs, full.largest_free_run, full.external_fragmentation) == (0, 0, 0, 0.0)


def test_a_nearly_full_pool_reads_low_external_fragmentation_however_scattered_its_free_blocks():
    """A saturated pool's last free blocks, each in a run of its own, weigh their share of the
    pool (2 of 100), not 1 - 1/2 of themselves: no 0 <-> 50 % swing as blocks come and go."""
    s = KVCacheState(101, [4])  # blocks 1..100 usable
    s.on_blocks_allocated([b for b in range(1, 101) if b not in (10, 60)], now=0.0)
    snap = s.snapshot()
    assert (snap.free_runs, snap.largest_free_run) == (2, 1)
    assert snap.external_fragmentation == pytest.approx(1 / 100)
    # the same pool emptied and fully free: one run, nothing outside it
    s.on_blocks_released([b for b in range(1, 101) if b not in (10, 60)], now=1.0)
    assert s.snapshot().external_fragmentation == 0.0


def test_shared_block_counts_once_with_the_most_any_holder_has():
    tables = {"a": _tables(1, 2, 3), "b": _tables(1, 2)}
    requests = {"a": Req(10), "b": Req(5)}  # a: 4 + 4 + 2; b shares block 1 and 2: 4 + 1
    s = _state(9, [FULL4], [tables], requests)
    snap = s.snapshot()
    # block 1: 4, block 2: max(4, 1) = 4, block 3: 2
    assert (snap.allocated_slots, snap.used_slots, snap.partial_blocks) == (12, 10, 1)
    assert snap.internal_fragmentation == pytest.approx(2 / 12)
    assert snap.slot_utilization == pytest.approx(10 / 32)
    assert (s.request_blocks_held("a"), s.request_slots("a"), s.request_slots("b")) == (3, (12, 10), (8, 5))
    del tables["a"]  # a finished: vLLM popped its table; block 3 is still used (ref_cnt) until released
    snap = s.snapshot()
    # only b's view is left: block 1 full, block 2 holds 1
    assert (snap.used_slots, snap.partial_blocks, snap.tracked_requests) == (5, 1, 1)


def test_computed_tokens_can_move_back():
    """Speculative tokens rejected: num_computed_tokens decreases; full blocks stop being full."""
    r = Req(12)
    s = _state(9, [FULL4], [{"r": _tables(1, 2, 3)}], {"r": r})
    assert s.snapshot().used_slots == 12
    r.num_computed_tokens = 6
    snap = s.snapshot()
    assert (snap.used_slots, snap.partial_blocks) == (6, 1)


def test_tables_edited_in_place_are_followed():
    """Sliding window: vLLM replaces retired entries with the null block in place.
    A table reported edited is read again; one that only grew is read again for
    its length; one vLLM replaced by a new list (a preempted request re-admitted)
    for its identity."""
    table = _tables(1, 2, 3)
    r = Req(11)
    s = _state(9, [GroupLayout("sliding_window", 4)], [{"r": table}], {"r": r})
    assert (s.snapshot().used_slots, s.request_blocks_held("r")) == (11, 3)
    table[0] = table[1] = Block(0)  # retired by the window ...
    s.on_table_edited("r")  # ... which the hook layer reports
    snap = s.snapshot()
    assert (snap.groups[0].used_blocks, snap.used_slots, snap.partial_blocks) == (1, 3, 1)
    assert (s.request_blocks_held("r"), s.request_slots("r")) == (1, (4, 3))
    assert snap.used_blocks == 3  # the pool still holds them until vLLM frees them
    table[2] = Block(0)  # a table of null entries only: the request holds nothing
    s.on_table_edited("r")
    snap = s.snapshot()
    assert (snap.tracked_requests, snap.allocated_slots, s.request_blocks_held("r")) == (0, 0, 0)
    tables = s._tables[0]
    tables["r"] = _tables(5)  # the same id, a new list
    assert s.snapshot().groups[0].used_blocks == 1
    tables["r"].append(Block(6))  # grown
    assert s.snapshot().groups[0].used_blocks == 2


def test_groups_with_their_own_block_sizes_and_kinds():
    r = Req(6)
    groups = [FULL4, GroupLayout("sliding_window", 8), GroupLayout("mamba", 16, token_slots=False)]
    tables = [{"r": _tables(1, 2)}, {"r": _tables(3)}, {"r": _tables(0, 4, 5)}]
    s = _state(9, groups, tables, {"r": r})
    snap = s.snapshot()
    g0, g1, g2 = snap.groups
    assert (g0.kind, g0.used_blocks, g0.allocated_slots, g0.used_slots, g0.partial_blocks) == ("full_attention", 2, 8, 6, 1)
    assert (g1.kind, g1.used_blocks, g1.allocated_slots, g1.used_slots, g1.partial_blocks) == ("sliding_window", 1, 8, 6, 1)
    # a Mamba group holds state blocks, not token slots
    assert (g2.token_slots, g2.used_blocks, g2.allocated_slots, g2.unused_slots, g2.internal_fragmentation) == (
        False, 2, 0, 0, 0.0)
    assert (snap.allocated_slots, snap.used_slots, snap.partial_blocks) == (16, 12, 2)
    # each block weighed by its own group: 4/4 + 2/4 + 6/8 + two state blocks, of 8 usable blocks
    assert snap.slot_utilization == pytest.approx((1 + 0.5 + 0.75 + 2) / 8)
    assert s.request_blocks_held("r") == 5 and s.request_slots("r") == (16, 12)
    assert snap.tracked_requests == 1


def test_a_drifted_ledger_is_found_and_resynchronised():
    s = KVCacheState(6, [4])
    s.on_blocks_allocated([1, 2], now=0.0)
    s.on_block_hashed(1, now=0.0)
    pool_free = [False, False, False, True, True, True]  # block 0 is the null block
    pool_cached = [False, True, False, False, False, False]
    probes = [(b, pool_free[b], pool_cached[b]) for b in range(1, 6)]
    assert s.drift(3, probes) == []
    s.on_blocks_released([2], now=1.0)  # an event vLLM never had
    found = s.drift(3, probes)
    assert found == ["free blocks 4, the allocator has 3",
                     "block 2 free=True cached=False, the allocator has free=False cached=False"]
    s.resync(pool_free, pool_cached)
    assert s.drift(3, probes) == []
    assert (s.snapshot().free_blocks, s.snapshot().used_blocks) == (3, 2)


_block_events = st.lists(
    st.tuples(
        st.sampled_from(["allocate", "touch", "release", "unpin", "hash", "unhash", "move", "reset", "resync"]),
        st.lists(st.integers(1, 5), max_size=4),
        st.lists(st.booleans(), min_size=6, max_size=6),
    ),
    max_size=30,
)


@given(_block_events)
def test_cached_blocks_are_the_free_hashed_blocks_after_any_events(events):
    """The cached count is kept by the events, not recounted: after any of them,
    in any order and on blocks in any state, it is the blocks the flags say are cached."""
    s = KVCacheState(6, [4])  # few blocks: events meet blocks in every state
    for event, blocks, flags in events:
        if event == "allocate":
            s.on_blocks_allocated(blocks, now=1.0)
        elif event == "touch":
            s.on_blocks_touched(blocks)
        elif event == "release":
            s.on_blocks_released(blocks, now=1.0)
        elif event == "unpin":
            s.on_blocks_unpinned(blocks, now=1.0)
        elif event == "hash":
            s.on_blocks_hashed(blocks, now=1.0)
        elif event == "unhash":
            for b in blocks:
                s.on_block_unhashed(b, "explicit", now=1.0)
        elif event == "move":
            for src, dst in zip(blocks, blocks[1:] + blocks[:1]):  # also onto a cached block, and onto itself
                s.on_block_hash_moved(src, dst)
        elif event == "reset":
            s.on_cache_reset(now=1.0)
        else:
            s.resync(flags, flags[::-1])
        assert s.snapshot().cached_blocks == np.count_nonzero(s.block_states() == CACHED), event


def test_a_hash_moved_onto_itself_or_onto_a_cached_block():
    s = KVCacheState(6, [4])
    s.on_blocks_allocated([1, 2], now=0.0)
    s.on_blocks_hashed([1, 2], now=0.0)
    s.on_blocks_released([1, 2], now=1.0)
    s.on_block_hash_moved(1, 1)
    assert s.snapshot().cached_blocks == 2
    s.on_block_hash_moved(1, 2)  # block 2 keeps one entry: one cached block is left
    assert s.snapshot().cached_blocks == 1


def test_evictions_by_reason_reuse_and_durations():
    s = KVCacheState(6, [4])
    s.on_blocks_allocated([1, 2], now=0.0)
    s.on_block_hashed(1, now=1.0)
    s.on_block_hashed(2, now=2.0)
    s.on_blocks_released([1, 2], now=3.0)
    s.on_blocks_touched([2])  # block 2 reused by a prefix hit ...
    s.on_blocks_released([2], now=4.0)
    assert s.snapshot().cached_blocks == 2
    # ... then both are recycled for new content: evicted for capacity at t=10
    s.on_blocks_allocated([1, 2], now=10.0)
    snap = s.snapshot()
    assert (snap.evictions, snap.evicted_never_reused, snap.blocks_allocated_recycled) == (2, 1, 2)
    assert s.evictions[("capacity", False)] == 1 and s.evictions[("capacity", True)] == 1
    s.fold_histograms(0)
    assert _values(s.block_cache_duration) == (2, 17.0, 8.0, 9.0)  # cached at 1 and 2
    assert _values(s.block_idle_duration) == (2, 13.0, 6.0, 7.0)  # last released at 3 and 4
    s.fold_histograms(0)
    assert s.block_cache_duration.count == 2  # cumulative: folding nothing new adds nothing


def test_explicit_eviction_of_a_used_block_and_reset():
    s = KVCacheState(6, [4])
    s.on_blocks_allocated([1, 2, 3, 4], now=0.0)
    for b in (1, 2, 3):
        s.on_block_hashed(b, now=1.0)
    s.on_block_unhashed(1, "explicit", now=5.0)  # still in use: idle time is 0
    s.on_block_hash_moved(3, 4)  # copy-on-write keeps the entry alive in block 4
    s.on_blocks_released([1, 2, 3, 4], now=6.0)
    assert s.snapshot().cached_blocks == 2  # blocks 2 and 4
    s.on_cache_reset(now=8.0)
    assert s.evictions[("explicit", False)] == 1 and s.evictions[("reset", False)] == 2
    s.fold_histograms(0)
    assert _values(s.block_cache_duration) == (3, 18.0, 4.0, 7.0)
    assert _values(s.block_idle_duration) == (3, 4.0, 0.0, 2.0)
    assert s.snapshot().cached_blocks == 0


def test_histogram_buffer_is_bounded_and_drops_are_counted(monkeypatch):
    monkeypatch.setattr(state_module, "HISTOGRAM_BUFFER_LIMIT", 3)
    s = KVCacheState(4, [4])
    for _ in range(5):
        s.on_allocation(True, 1e-5)
    s.fold_histograms(0)
    assert s.allocation_duration["success"].count == 3
    assert s.dropped_measurements == 2
    assert s.snapshot().allocation_attempts == 5  # counters never drop


def _values(histogram) -> tuple:
    return histogram.count, histogram.sum, histogram.min, histogram.max


def test_histogram_buckets_follow_the_otel_rule_and_keep_the_newest_tagged_exemplar():
    h = BucketHistogram((1.0, 2.0, 4.0))
    h.fold(np.array([0.5, 1.0, 1.5, 2.0, 3.0, 9.0]), ["a", None, "b", "c", None, None], time_ns=7)
    # buckets: (-inf, 1], (1, 2], (2, 4], (4, inf)
    assert h.counts.tolist() == [2, 2, 1, 1] and h.bounds == (1.0, 2.0, 4.0)
    assert all(type(count) is int for count in h.counts.tolist())  # OTLP bucket counts are integers
    assert _values(h) == (6, 17.0, 0.5, 9.0)
    assert h.exemplars == {0: (0.5, "a", 7), 1: (2.0, "c", 7)}  # newest tagged value per bucket
    h.fold(np.array([1.2]), ["d"], time_ns=8)
    assert h.exemplars[1] == (1.2, "d", 8) and h.counts.tolist() == [2, 3, 1, 1]
    assert h.take_window_extremes() == (0.5, 9.0)
    assert h.take_window_extremes() == (float("inf"), float("-inf"))


def test_counters():
    s = KVCacheState(4, [4])
    s.on_prefix_lookup(100, 32, resumed=False)
    s.on_prefix_lookup(50, 48, resumed=True)
    s.on_allocation(False, 1e-5)
    s.on_preemption()
    snap = s.snapshot()
    assert (snap.prefix_queried_tokens, snap.prefix_hit_tokens) == (100, 32)  # first admissions, as vLLM counts
    assert (snap.prefix_resumed_queried_tokens, snap.prefix_resumed_hit_tokens) == (50, 48)
    assert (snap.allocation_attempts, snap.allocation_failures, snap.preemptions) == (1, 1, 1)


def test_allocation_calls_are_counted_by_the_sampling_countdown():
    """The allocate_slots hook only counts down the untimed calls of a gap; the
    calls are counted by gap, exactly, also across a change of the rate."""
    s = KVCacheState(4, [4])
    s.set_allocation_sample_rate(0.2)
    timed = 0

    def call() -> None:  # what the hook does per call
        nonlocal timed
        if s.calls_until_timed:
            s.calls_until_timed -= 1
        else:
            s.on_timed_call()
            timed += 1

    for i in range(1, 1001):
        call()
        assert s.allocation_calls == i
    assert 140 < timed < 260  # each call timed with probability 0.2: 200 +- 4 sd
    s.set_allocation_sample_rate(1.0)
    for i in range(1001, 1101):
        call()
        assert s.allocation_calls == i
    assert s.calls_until_timed == 0
    s.on_allocation(False, 1e-5)  # counted and timed directly (the hook-free API)
    assert (s.allocation_calls, s.allocations["failure"]) == (1101, 1)


def test_timed_calls_are_a_random_sample_not_every_nth_call():
    """The allocate_slots sample must be random per call, not one call in 1/rate:
    vLLM makes about as many calls per step as it runs requests, so a fixed gap
    times the same batch position every time (4 calls a step, rate 0.01: a gap
    of 99 lands every timed call on one position) and the latency histogram and
    its exemplars describe that position only. Driven as the hook drives it
    (plugin/hooks.py `_ALLOCATE_SLOTS`): count down the untimed calls of a gap,
    `on_timed_call()` when the countdown is 0. The gaps must look geometric:
    P(gap = 0) = rate, mean (1 - rate) / rate, variance (1 - rate) / rate**2."""
    rate, per_step, steps = 0.01, 4, 100_000
    s = KVCacheState(4, [4])
    s.set_allocation_sample_rate(rate)
    positions = [0] * per_step
    gaps, untimed = [], 0
    for _ in range(steps):
        for position in range(per_step):
            if s.calls_until_timed:  # the hook's untimed path
                s.calls_until_timed -= 1
                untimed += 1
            else:  # the hook's timed path
                s.on_timed_call()
                positions[position] += 1
                gaps.append(untimed)
                untimed = 0
    timed = sum(positions)
    assert s.allocation_calls == steps * per_step  # counts stay exact whatever the gaps
    assert abs(timed - rate * steps * per_step) < 4 * (steps * per_step * rate * (1 - rate)) ** 0.5  # 4000 +- 4 sd
    # spread over the batch positions: each about a quarter (chi-square, 3 degrees of freedom, p = 0.001: 16.3)
    expected = timed / per_step
    chi_square = sum((n - expected) ** 2 / expected for n in positions)
    assert chi_square < 16.3, positions
    assert all(0.15 < n / timed < 0.35 for n in positions), positions
    # the gaps (untimed calls before each timed one; the first one follows the rate change) are geometric
    gaps = np.array(gaps[1:], dtype=np.float64)
    mean, variance = (1 - rate) / rate, (1 - rate) / rate**2
    assert abs(gaps.mean() - mean) < 4 * (variance / gaps.size) ** 0.5
    assert 0.8 * variance < gaps.var() < 1.2 * variance  # a fixed gap has variance 0
    zeros = int((gaps == 0).sum())  # a call right after a timed one is timed with probability `rate`
    assert abs(zeros - rate * gaps.size) < 4 * (gaps.size * rate * (1 - rate)) ** 0.5, zeros


# -- paths no earlier test reached or checked (found by `make mutate`, docs/mutation-results.md) --


def _slots_by_counting(tables: list[dict], groups: list[GroupLayout], request_id: str, computed: int):
    """(allocated, used) slots of one request, one slot at a time: slot k of table entry i
    is token i * size + k, used when that token is computed; null entries and groups
    without token slots hold none."""
    allocated = used = 0
    for layout, group_tables in zip(groups, tables):
        if not layout.token_slots:
            continue
        for i, block in enumerate(group_tables.get(request_id, [])):
            if block.block_id:
                for token in range(i * layout.block_size, (i + 1) * layout.block_size):
                    allocated += 1
                    used += token < computed
    return allocated, used


_group_kinds = st.sampled_from([FULL4, GroupLayout("sliding_window", 8), GroupLayout("mamba", 16, token_slots=False)])


@given(
    st.lists(st.tuples(_group_kinds, st.none() | st.lists(st.integers(0, 8), max_size=6)), min_size=1, max_size=3),
    st.none() | st.integers(-3, 60),
)
@example([(FULL4, [0, 1, 2])], 8)  # a retired entry, then one computed block and one not
def test_request_slots_and_blocks_held_match_a_count_slot_by_slot(groups_and_tables, computed):
    """Any order of groups (a stateful one first, or one where the request has no table),
    null entries anywhere, a request vLLM no longer lists (None: no computed tokens)."""
    groups = [layout for layout, _ in groups_and_tables]
    tables = [{} if ids is None else {"r": _tables(*ids)} for _, ids in groups_and_tables]
    s = KVCacheState(9, [g.block_size for g in groups])
    s.attach_tables(groups, tables)
    s.attach_requests({} if computed is None else {"r": Req(computed)})
    assert s.request_slots("r") == _slots_by_counting(tables, groups, "r", computed or 0)
    held = sum(1 for group in tables for b in group.get("r", []) if b.block_id)
    assert s.request_blocks_held("r") == held


def test_tracked_requests_follow_tables_taken_back_one_group_at_a_time():
    """A request is tracked while any group's table names a block: with three groups
    the ledger counts its tables, and it is forgotten with the last one only."""
    groups = [FULL4, GroupLayout("sliding_window", 4), GroupLayout("mamba", 4, token_slots=False)]
    tables = [{"r": _tables(1), "q": _tables(4)}, {"r": _tables(2)}, {"r": _tables(3)}]
    s = _state(9, groups, tables, {"r": Req(4), "q": Req(4)})
    for group in (1, 0, 2):
        assert s.snapshot().tracked_requests == sum(1 for rid in "rq" if any(rid in t for t in tables))
        del tables[group]["r"]
    assert s.snapshot().tracked_requests == 1  # q alone


def test_block_states_of_full_partial_reserved_state_empty_and_cached_blocks():
    """Block 1 full for one holder only (the other computed part of it), 2 partly
    computed, 3 allocated and not computed (reserved), 4 and 5 held by a group without
    token slots, 6 empty, 7 cached, 8 empty; worked out by hand."""
    from vllm_frag_otel.core.layout import EMPTY, FULL, PARTIAL, RESERVED

    groups = [FULL4, GroupLayout("mamba", 16, token_slots=False)]
    tables = [{"a": _tables(1, 2, 3), "b": _tables(1)}, {"a": _tables(0, 4, 5)}]
    s = _state(9, groups, tables, {"a": Req(6), "b": Req(2)})
    s.on_blocks_allocated([7], now=0.0)
    s.on_block_hashed(7, now=0.0)
    s.on_blocks_released([7], now=1.0)
    expected = [FULL, PARTIAL, RESERVED, FULL, FULL, EMPTY, CACHED, EMPTY]  # blocks 1..8
    assert s.block_states().tolist() == expected
    snap, states = s.snapshot_with_states()
    assert states.tolist() == expected
    assert snap == s.snapshot()
    assert (snap.used_blocks, snap.cached_blocks, snap.free_blocks) == (5, 1, 3)


def test_numeric_fields_are_every_field_but_the_groups():
    snap = KVCacheState(4, [4]).snapshot()
    names = type(snap).numeric_fields()
    assert len(names) == 28 and names[0] == "num_blocks" and names[-1] == "drift_repairs"
    assert all(isinstance(getattr(snap, name), (int, float)) for name in names)


def test_counters_add_up_over_repeated_events():
    s = KVCacheState(4, [4])
    for queried, hit in ((100, 32), (60, 16)):
        s.on_prefix_lookup(queried, hit, resumed=False)
        s.on_prefix_lookup(queried // 2, hit // 2, resumed=True)
        s.on_allocation(False, 2e-3, tag=f"failed {queried}")
        s.on_allocation(True, 1e-5, tag=f"ok {queried}")
        s.on_preemption()
    snap = s.snapshot()
    assert (snap.prefix_queried_tokens, snap.prefix_hit_tokens) == (160, 48)
    assert (snap.prefix_resumed_queried_tokens, snap.prefix_resumed_hit_tokens) == (80, 24)
    assert (snap.allocation_attempts, snap.allocation_failures, snap.preemptions) == (4, 2, 2)
    s.fold_histograms(time_ns=42)
    failed, succeeded = s.allocation_duration["failure"], s.allocation_duration["success"]
    # each outcome keeps its own durations, and the newest tag of each bucket with the fold's time
    assert _values(failed) == (2, 4e-3, 2e-3, 2e-3) and _values(succeeded) == (2, 2e-5, 1e-5, 1e-5)
    assert failed.exemplars == {10: (2e-3, "failed 60", 42)}  # (1e-3, 2.5e-3] is bucket 10
    assert succeeded.exemplars == {3: (1e-5, "ok 60", 42)}  # (5e-6, 1e-5] is bucket 3
    s.on_allocation(True, 3e-5)
    s.fold_histograms(time_ns=43)
    assert _values(succeeded) == (3, pytest.approx(5e-5), 1e-5, 3e-5)  # folds add up


def test_a_sample_rate_outside_zero_to_one_is_refused():
    s = KVCacheState(4, [4])
    for rate in (0.0, -0.5, 1.5, 2.0):
        with pytest.raises(ValueError, match=rf"^a sample rate is in \(0, 1\], not {rate}$"):
            s.set_allocation_sample_rate(rate)
    s.set_allocation_sample_rate(1.0)
    assert s.allocation_sample_rate == 1.0


def test_drift_names_a_block_whose_cached_flag_differs():
    s = KVCacheState(4, [4])
    s.on_blocks_allocated([1], now=0.0)
    s.on_block_hashed(1, now=0.0)
    assert s.drift(2, [(1, False, False), (2, True, True)]) == [
        "block 1 free=False cached=True, the allocator has free=False cached=False",
        "block 2 free=True cached=False, the allocator has free=True cached=True",
    ]


@dataclass
class Allocating:
    request_id: str


def test_moves_of_an_allocation_are_kept_per_request_and_taken_once():
    """While a request's allocate_slots runs, the cached blocks it takes over are
    counted for its story (only when stories follow moves); its tables are read again."""
    s = KVCacheState(9, [4])
    s.on_blocks_allocated([1, 2, 3], now=0.0)
    s.on_blocks_hashed([1, 2, 3], now=0.0)
    s.on_blocks_released([1, 2, 3], now=1.0)
    s.allocating = Allocating("quiet")
    s.on_blocks_allocated([1], now=2.0)  # not followed: nothing kept
    assert s.take_moves() == {}
    s.follow_moves = True
    s.allocating = Allocating("a")
    s.on_blocks_allocated([2, 3, 4], now=2.0)  # two cached blocks taken over, one fresh
    s.on_blocks_touched([5])
    s.on_blocks_released([4], now=3.0)
    s.on_blocks_allocated([4], now=3.0)  # released, never hashed: not a take-over
    s.allocating = Allocating("b")
    s.on_blocks_touched([6])
    assert s.take_move("nobody") == {}
    assert s.take_move("a") == {"a": 2}
    assert s.take_move("a") == {}
    assert s.take_moves() == {"b": 0}
    assert s.take_moves() == {}
    assert s._edited == {"quiet", "a", "b"}


def _answer_within(call, seconds: float = 5.0):
    """call() on a thread of its own: a ledger that never answers fails the test instead of hanging it."""
    answers = []
    caller = threading.Thread(target=lambda: answers.append(call()), daemon=True)
    caller.start()
    caller.join(seconds)
    assert answers, f"no answer in {seconds} s"
    return answers[0]


def test_the_self_check_runs_here_on_the_stepping_thread_or_is_waited_for():
    import time

    s = KVCacheState(4, [4])
    assert s.check_before_reading(0.0) and not s.check_due  # no self-check: nothing to wait for
    assert not s.hold()
    runs = []
    s.self_check = lambda: runs.append(threading.get_ident())
    s.stepping_thread = threading.get_ident()
    assert s.check_before_reading(0.0) and runs == [s.stepping_thread] and not s.check_due
    assert s.hold() and len(runs) == 2  # checked here: a collection on another thread now reads at once
    assert _answer_within(lambda: (s.check_before_reading(5.0), s.check_due)) == (True, False) and len(runs) == 2
    s.release()
    s.stepping_thread = -1  # the scheduler steps on another thread
    assert not s.hold() and len(runs) == 2
    assert not _answer_within(lambda: s.check_before_reading(0.01)) and s.check_due  # asked for at the next step

    def step() -> None:  # the scheduler's step boundary, once the check is asked for (or given up on)
        while not s.check_due and time.monotonic() < deadline:
            time.sleep(0.001)
        s.check_done()

    deadline = time.monotonic() + 5.0
    for _ in range(2):  # a second wait is not answered by the first check
        stepper = threading.Thread(target=step, daemon=True)
        s.check_due = False
        stepper.start()
        assert _answer_within(lambda: s.check_before_reading(5.0)) and not s.check_due
        stepper.join()
    assert not _answer_within(lambda: s.check_before_reading(0.01))


def test_groups_moved_asks_the_hook_layer_unless_a_collection_runs():
    s = KVCacheState(4, [4])
    assert s.groups_moved() is False  # no hook layer
    answers = [True, False]
    s.refresh_groups = lambda: answers.pop(0)
    assert s.groups_moved() is True and s.groups_moved() is False
    answers.append(True)
    with s._collect_lock:  # a collection runs (asked on another thread: a check that waited would hang)
        assert _answer_within(s.groups_moved) is False and answers == [True]
    assert s.groups_moved() is True


def test_table_drift_names_tables_edited_in_place_without_a_report():
    """Compared: up to `sample` tables per group, chosen by the rng among the tables
    last read; skipped: tables reported edited, replaced by another list or of another
    length (all read again anyway), and everything while a collection runs."""
    import random

    long_table = _tables(*range(1, 11))
    tables = {"long": long_table, "edited": _tables(11), "replaced": _tables(12), "grown": _tables(13),
              "same": _tables(14)}
    s = _state(16, [FULL4], [tables], {r: Req(0) for r in tables})
    s.snapshot()  # reads the tables
    long_table[9] = Block(15)
    tables["edited"][0] = Block(15)
    s.on_table_edited("edited")
    tables["replaced"] = _tables(15)
    tables["grown"].append(Block(15))
    assert s.table_drift(10, random.Random(0)) == [
        "group 0 request long: table [1, 2, 3, 4, 5, 6, 7, 8] read as [1, 2, 3, 4, 5, 6, 7, 8]"
    ]
    assert "long" in s._edited
    s.snapshot()  # read again: no drift left
    assert s.table_drift(10, random.Random(0)) == []
    tables["same"][0] = Block(15)
    with s._collect_lock:
        assert _answer_within(lambda: s.table_drift(10, random.Random(0))) == []
    # one table compared per group: the one random.Random(seed).sample picks of the sorted ids
    ids = sorted(tables)
    for seed in range(20):
        found = s.table_drift(1, random.Random(seed))
        assert bool(found) == (random.Random(seed).sample(ids, 1) == ["same"]), seed
        s._edited.clear()


def test_a_reset_counts_reused_blocks_apart_and_gives_a_used_block_no_idle_time():
    s = KVCacheState(8, [4])
    for reset_at in (10.0, 20.0):  # evictions add up over resets
        s.on_blocks_allocated([1, 2, 3], now=reset_at - 10)
        s.on_blocks_hashed([1, 2, 3], now=reset_at - 9)
        s.on_blocks_released([1, 2], now=reset_at - 8)
        s.on_blocks_touched([2])  # a prefix hit: block 2 reused and held again
        s.on_cache_reset(now=reset_at)  # block 3 still held by its request
        s.on_blocks_released([2, 3], now=reset_at)
    assert (s.evictions[("reset", False)], s.evictions[("reset", True)]) == (4, 2)
    s.fold_histograms(0)
    assert _values(s.block_cache_duration) == (6, 54.0, 9.0, 9.0)
    assert _values(s.block_idle_duration) == (6, 16.0, 0.0, 8.0)  # only block 1 sat free: 8 s each time


def test_reset_measurements_beyond_the_buffer_are_dropped_and_counted(monkeypatch):
    """Three resets into buffers of room 4: 3 measurements fit, then 1 of 3, then none of 2
    (per histogram: cache and idle duration)."""
    monkeypatch.setattr(state_module, "HISTOGRAM_BUFFER_LIMIT", 4)
    s = KVCacheState(8, [4])
    for blocks, at in (([1, 2, 3], 1.0), ([4, 5, 6], 2.0), ([1, 2], 3.0)):
        s.on_blocks_hashed(blocks, now=0.0)
        s.on_cache_reset(now=at)
    assert s.dropped_measurements == 2 * (2 + 2)
    s.fold_histograms(0)
    assert _values(s.block_cache_duration) == (4, 5.0, 1.0, 2.0)  # 3 blocks at 1 s, then one at 2 s


def test_a_resync_never_makes_the_null_block_cached():
    """The allocator's flags for block 0 are ignored: a reset after the resync evicts the real
    cached blocks only."""
    s = KVCacheState(4, [4])
    s.resync([True, True, False, True], [True, True, True, False])
    assert (s.snapshot().free_blocks, s.snapshot().cached_blocks) == (2, 1)
    s.on_cache_reset(now=1.0)
    assert sum(s.evictions.values()) == 2  # blocks 1 (free) and 2 (used)


@given(st.data())
def test_counters_match_a_replay_of_the_events_over_plain_sets(data):
    """Pool events as vLLM makes them (allocations of free blocks, prefix hits on cached
    blocks, releases of used ones...), replayed by hand over sets: free and cached blocks,
    runs, block sources and evictions by reason and reuse."""
    n = 12
    s = KVCacheState(n, [4])
    warm = [1, 2, 3, 4, 5, 6]  # a warm cache: six cached blocks, free
    s.on_blocks_allocated(warm, now=0.0)
    s.on_blocks_hashed(warm, now=0.0)
    s.on_blocks_released(warm, now=0.0)
    free, hashed, reused = set(range(1, n)), set(warm), set()
    sources = {"fresh": len(warm), "recycled": 0, "prefix_hit": 0}
    evictions: dict = {}

    def evict(b: int, reason: str) -> None:
        hashed.discard(b)
        evictions[(reason, b in reused)] = evictions.get((reason, b in reused), 0) + 1

    def some(pool: set) -> list[int]:
        return data.draw(st.lists(st.sampled_from(sorted(pool)), unique=True, max_size=4)) if pool else []

    for _ in range(data.draw(st.integers(1, 25))):
        event = data.draw(st.sampled_from(["allocate", "touch", "release", "hash", "unhash", "move", "reset"]))
        if event == "allocate":
            blocks = some(free)
            s.on_blocks_allocated(blocks, now=1.0)
            for b in blocks:
                if b in hashed:
                    evict(b, "capacity")
                    sources["recycled"] += 1
                else:
                    sources["fresh"] += 1
                free.discard(b)
        elif event == "touch":
            blocks = some(hashed)
            s.on_blocks_touched(blocks)
            sources["prefix_hit"] += len(blocks)
            reused.update(blocks)
            free.difference_update(blocks)
        elif event == "release":
            blocks = some(set(range(1, n)) - free)
            s.on_blocks_released(blocks, now=1.0)
            free.update(blocks)
        elif event == "hash":
            blocks = some(set(range(1, n)) - free)
            s.on_blocks_hashed(blocks, now=1.0)
            reused.difference_update(set(blocks) - hashed)
            hashed.update(blocks)
        elif event == "unhash":
            for b in some(set(range(1, n))):
                reason = data.draw(st.sampled_from(["explicit", "replaced"]))
                s.on_block_unhashed(b, reason, now=1.0)
                if b in hashed:
                    evict(b, reason)
        elif event == "move" and hashed and free != set(range(1, n)):
            src = data.draw(st.sampled_from(sorted(hashed)))
            dst = data.draw(st.sampled_from(sorted(set(range(1, n)) - free)))
            s.on_block_hash_moved(src, dst)
            was_reused = src in reused
            hashed.discard(src)
            hashed.add(dst)
            (reused.add if was_reused else reused.discard)(dst)
        elif event == "reset":
            s.on_cache_reset(now=1.0)
            for b in sorted(hashed):
                evict(b, "reset")
    snap = s.snapshot()
    mask = [int(b in free) for b in range(1, n)]
    assert (snap.free_blocks, snap.used_blocks) == (len(free), n - 1 - len(free))
    assert snap.cached_blocks == len(free & hashed)
    assert (snap.free_runs, snap.largest_free_run) == _runs_by_walking(mask)
    assert (snap.blocks_allocated_fresh, snap.blocks_allocated_recycled, snap.blocks_prefix_hit) == (
        sources["fresh"], sources["recycled"], sources["prefix_hit"])
    assert {key: count for key, count in s.evictions.items() if count} == evictions
    assert (snap.evictions, snap.evicted_never_reused) == (
        sum(evictions.values()), sum(count for (_, was_reused), count in evictions.items() if not was_reused))


def test_eviction_measurements_beyond_the_buffer_are_dropped_two_at_a_time(monkeypatch):
    """Each eviction measures its cache and idle duration: with room for 2, the third and
    fourth evictions drop both of theirs."""
    monkeypatch.setattr(state_module, "HISTOGRAM_BUFFER_LIMIT", 2)
    s = KVCacheState(8, [4])
    s.on_blocks_hashed([1, 2, 3, 4], now=0.0)
    s.on_blocks_allocated([1, 2, 3, 4], now=5.0)  # cached blocks taken for new content
    assert (sum(s.evictions.values()), s.dropped_measurements) == (4, 2 * 2)
    s.fold_histograms(0)
    assert (s.block_cache_duration.count, s.block_idle_duration.count) == (2, 2)


def _snapshot_by_recounting(groups: list[GroupLayout], tables: list[dict], requests: dict, usable: int) -> dict:
    """Group and pool slot figures recounted from the tables as they are now: a block
    holds, for each holder, the slots of its entry that holder computed, and counts once
    with the most any holder has."""
    per_group, utilised, tracked = [], 0.0, set()
    for layout, group_tables in zip(groups, tables):
        fill: dict[int, int] = {}
        for request_id, table in group_tables.items():
            request = requests.get(request_id)
            computed = request.num_computed_tokens if request is not None else 0
            for i, block in enumerate(table):
                if block.block_id:
                    tracked.add(request_id)
                    mine = min(layout.block_size, max(0, computed - i * layout.block_size))
                    fill[block.block_id] = max(fill.get(block.block_id, 0), mine)
        if layout.token_slots:
            allocated, used = len(fill) * layout.block_size, sum(fill.values())
            partial = sum(1 for f in fill.values() if 0 < f < layout.block_size)
            utilised += used / layout.block_size
        else:
            allocated = used = partial = 0
            utilised += len(fill)
        per_group.append((layout.kind, layout.block_size, len(fill), allocated, used, allocated - used, partial))
    return {"groups": per_group, "tracked": len(tracked), "utilised": utilised / usable}


_table_changes = st.lists(
    st.tuples(
        st.integers(0, 2),  # group
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["new", "grow", "retire", "drop", "compute"]),
        st.integers(0, 8),  # a block id, or computed tokens / 2
    ),
    max_size=25,
)


_THREE_KINDS = [FULL4, GroupLayout("sliding_window", 8), GroupLayout("mamba", 4, token_slots=False)]


@given(_table_changes, st.permutations(_THREE_KINDS))
# computed tokens up a block, up another, then back to none: two full blocks stop being full
@example([(0, "a", "new", 3), (0, "a", "compute", 2), (0, "a", "compute", 4), (0, "a", "compute", 0)], _THREE_KINDS)
def test_snapshots_follow_any_table_changes_as_a_recount_from_scratch_does(changes, groups):
    """Tables created, grown, edited in place (reported), dropped and re-created, and
    computed tokens moving either way, with a snapshot after each change: every one
    equals a recount of the tables as they are."""
    tables: list[dict] = [{} for _ in groups]
    requests = {"a": Req(0), "b": Req(0)}  # "c" is not listed: it counts as having computed nothing
    s = KVCacheState(13, [g.block_size for g in groups])
    s.attach_tables(groups, tables)
    s.attach_requests(requests)
    for g, request_id, change, value in changes:
        table = tables[g].get(request_id)
        first = 4 * g + 1  # each group its own blocks (vLLM's groups never share one): 1..12
        if change == "new":
            tables[g][request_id] = _tables(*range(first, first + value % 4 + 1))
        elif change == "grow" and table is not None:
            table.append(Block(first + value % 4))
        elif change == "retire" and table:
            table[value % len(table)] = Block(0)
            s.on_table_edited(request_id)
        elif change == "drop":
            tables[g].pop(request_id, None)
        elif change == "compute" and request_id in requests:
            requests[request_id].num_computed_tokens = 2 * value
        snap = s.snapshot()
        expected = _snapshot_by_recounting(groups, tables, requests, 12)
        assert [(gs.kind, gs.block_size, gs.used_blocks, gs.allocated_slots, gs.used_slots, gs.unused_slots,
                 gs.partial_blocks) for gs in snap.groups] == expected["groups"]
        assert [gs.group for gs in snap.groups] == [0, 1, 2]
        assert snap.tracked_requests == expected["tracked"]
        assert snap.slot_utilization == pytest.approx(min(1.0, expected["utilised"]))
        allocated = sum(g[3] for g in expected["groups"])
        used = sum(g[4] for g in expected["groups"])
        assert (snap.allocated_slots, snap.used_slots, snap.unused_slots) == (allocated, used, allocated - used)
        assert snap.partial_blocks == sum(g[6] for g in expected["groups"])
        assert snap.internal_fragmentation == pytest.approx((allocated - used) / allocated if allocated else 0.0)
        for gs in snap.groups:
            assert gs.internal_fragmentation == pytest.approx(gs.unused_slots / gs.allocated_slots
                                                              if gs.allocated_slots else 0.0)


def test_a_new_ledger_is_one_free_run_of_usable_blocks_and_nothing_counted():
    with pytest.raises(ValueError, match="^a pool needs the null block and at least one usable block$"):
        KVCacheState(1, [4])
    n = 6400
    s = KVCacheState(n, [16])
    snap = s.snapshot()
    assert (snap.num_blocks, snap.free_blocks, snap.free_runs, snap.largest_free_run) == (n - 1, n - 1, 1, n - 1)
    assert (snap.drift_repairs, snap.evictions, snap.allocation_attempts, snap.tracked_requests) == (0, 0, 0, 0)
    assert [(g.kind, g.block_size) for g in snap.groups] == [("full_attention", 16)]
    assert (s.allocation_sample_rate, s.evictions_counted_by_caller) == (1.0, False)
    # the memory budget per block (module docstring): 15 bytes, and one spare 64-block word of free flags
    per_block = (len(s._free), len(s._hashed), len(s._reused), s._cached_at_view.nbytes, s._released_at_view.nbytes,
                 s._in_tables_view.nbytes, s._full_holders_view.nbytes)
    assert sum(per_block) == 15 * n + 64
    s.drift_repairs = 3  # the hook layer's self-check counts its repairs here
    assert s.snapshot().drift_repairs == 3
    s.on_blocks_allocated(list(range(1, n)), now=0.0)
    full = s.snapshot()
    assert (full.free_runs, full.mean_free_run, full.external_fragmentation) == (0, 0.0, 0.0)
    assert KVCacheState(2, [4]).snapshot().free_blocks == 1


def test_block_tables_and_groups_must_pair_up():
    with pytest.raises(ValueError, match=r"^2 groups but 1 block-table maps$"):
        KVCacheState(4, [4]).attach_tables([FULL4, FULL4], [{}])


def test_a_ledger_without_requests_counts_no_computed_token():
    s = KVCacheState(4, [4])
    s.attach_tables([FULL4], [{"r": _tables(1, 2)}])
    assert s.request_slots("r") == (8, 0)
    assert (s.snapshot().allocated_slots, s.snapshot().used_slots) == (8, 0)


def test_the_sample_of_timed_calls_is_seeded_geometric_gaps():
    """Gaps drawn from random.Random(0), as the documented formula gives them: a rerun
    times the same calls."""
    import math
    import random

    rate = 0.1
    s = KVCacheState(4, [4])
    s.set_allocation_sample_rate(rate)
    draws = random.Random(0)
    gaps = [int(math.log(1.0 - draws.random()) / math.log(1.0 - rate)) for _ in range(20)]
    seen = [s.calls_until_timed]
    for _ in range(19):
        s.on_timed_call()
        seen.append(s.calls_until_timed)
    assert seen == gaps


def test_a_ratio_stays_within_zero_and_one():
    ratio = state_module._ratio
    assert (ratio(3, 2), ratio(-1, 2), ratio(1, 4), ratio(1, 0)) == (1.0, 0.0, 0.25, 0.0)


def test_a_new_ledger_waits_for_the_stepping_thread():
    s = KVCacheState(4, [4])
    s.self_check, s.stepping_thread = (lambda: None), -1
    assert not _answer_within(lambda: s.check_before_reading(0.01)) and s.check_due


def test_tables_are_read_again_when_an_unpinned_block_is_handed_out():
    """vLLM nulls the entry of a table still naming an unpinned block, in place and
    unreported, when it hands the block out again: every table is read again."""
    table = _tables(1, 2)
    tables = {"a": table}
    requests = {"a": Req(8), "b": Req(0)}
    s = _state(6, [FULL4], [tables], requests)
    assert s.snapshot().used_slots == 8
    s.on_blocks_unpinned([2], now=1.0)
    s.on_blocks_allocated([3], now=1.0)  # another block: nothing to read again
    assert s.snapshot().used_slots == 8
    s.on_blocks_allocated([2], now=2.0)
    table[1] = Block(0)
    tables["b"] = _tables(2, 3)
    snap = s.snapshot()
    assert (snap.used_slots, snap.groups[0].used_blocks) == (4, 3)
    s.on_blocks_allocated([4], now=3.0)  # block 2 is no longer unpinned
    table.append(Block(5))  # grows: read again for its length, not because of block 4
    assert s.snapshot().groups[0].used_blocks == 4


def test_a_partly_computed_block_shared_by_two_holders_counts_the_most_either_computed():
    for computed in ((3, 1), (1, 3)):  # either holder first
        requests = {"a": Req(computed[0]), "b": Req(computed[1])}
        s = _state(4, [FULL4], [{"a": _tables(1), "b": _tables(1)}], requests)
        assert (s.snapshot().used_slots, s.snapshot().partial_blocks) == (3, 1)


def test_block_states_of_a_stateful_group_holding_nothing():
    from vllm_frag_otel.core.layout import EMPTY

    s = KVCacheState(4, [4, 16])
    s.attach_tables([FULL4, GroupLayout("mamba", 16, token_slots=False)], [{}, {}])
    assert s.block_states().tolist() == [EMPTY] * 3

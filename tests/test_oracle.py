"""Every snapshot field equals a brute-force recomputation, on vLLM's real scheduler.

Randomised workloads with small pools force preemption, prefix sharing and
evictions, on every KV-cache layout the simulator builds (full, MLA, sliding
window, chunked local, Mamba in both cache modes, and hybrids of them). Counters are checked against what vLLM itself reports: the
requests' own preemption counts, vLLM's prefix-cache stats, vLLM's KV events
(one BlockRemoved per evicted hash) and a test-side count of allocate_slots
results.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import block_states, brute_force, request_blocks_held, request_slots

from vllm_frag_otel import analyzer_for
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.core.layout import BLOCK_STATES



@st.composite
def layouts(draw, block_size: int) -> str:
    """Layouts whose windows are small enough to retire blocks in these small pools."""
    window = draw(st.integers(min_value=block_size, max_value=6 * block_size))
    chunk = block_size * draw(st.integers(min_value=1, max_value=4))
    return draw(st.sampled_from([
        "full", "mla", f"full,sliding_window:{window}", f"sliding_window_mla:{window}",
        f"full,chunked_local:{chunk}", f"full,rswa:{window}", f"full,circular_buffer:{chunk}",
        "full,mamba_align", "full,mamba", f"full,sliding_window:{window},mamba_align",
    ]))


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([2, 4, 8, 16]))
    num_blocks = draw(st.integers(min_value=12, max_value=80))
    layout = draw(layouts(block_size))
    groups = len(sim.parse_layout(layout))
    max_prompt = min(num_blocks * block_size // 2, 300)
    num_prefixes = draw(st.integers(min_value=0, max_value=3))
    prefixes = [
        draw(st.lists(st.integers(3, 999), min_size=block_size, max_size=4 * block_size))
        for _ in range(num_prefixes)
    ]
    requests = []
    for _ in range(draw(st.integers(min_value=1, max_value=24))):
        body = draw(st.lists(st.integers(3, 999), min_size=1, max_size=max_prompt))
        prefix = prefixes[draw(st.integers(0, num_prefixes - 1))] if prefixes and draw(st.booleans()) else []
        # a request that can never fit in the pool would livelock vLLM itself
        room = (num_blocks - 2) // groups * block_size - len(prefix) - len(body)
        if room < 1:
            continue
        requests.append((prefix + body, draw(st.integers(min_value=1, max_value=min(60, room)))))
    shape = sim.EngineShape(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=draw(st.integers(min_value=1, max_value=12)),
        max_num_batched_tokens=draw(st.sampled_from([64, 256, 2048])),
        max_model_len=1024,
        enable_prefix_caching=draw(st.booleans()),
        kv_events=True,
        layout=layout,
    )
    return shape, requests, draw(st.integers(0, 2**16))


def _check(snapshot, expected: dict, where: str) -> None:
    for name, value in expected.items():
        if name == "groups":
            assert len(snapshot.groups) == len(value), where
            for got_group, group in zip(snapshot.groups, value):
                for field, v in group.items():
                    got = getattr(got_group, field)
                    assert got == pytest.approx(v, abs=1e-12), f"{where}: group {group['group']} {field} = {got}, brute force says {v}"
            continue
        got = getattr(snapshot, name)
        assert got == pytest.approx(value, abs=1e-12), f"{where}: {name} = {got}, brute force says {value}"
    _check_possible(snapshot, where)


def _check_possible(snapshot, where: str) -> None:
    """No gauge negative, no ratio outside [0, 1], whatever the brute force says."""
    for name in snapshot.numeric_fields():
        assert getattr(snapshot, name) >= 0, f"{where}: {name} is negative"
    for ratio in ("external_fragmentation", "internal_fragmentation", "slot_utilization"):
        assert 0.0 <= getattr(snapshot, ratio) <= 1.0, f"{where}: {ratio} out of [0, 1]"
    for g in snapshot.groups:
        assert min(g.used_blocks, g.allocated_slots, g.used_slots, g.unused_slots, g.partial_blocks) >= 0, where
        assert 0.0 <= g.internal_fragmentation <= 1.0, where


def _check_requests(analyzer, scheduler, where: str) -> None:
    """The per-request values behind span attributes, for every live request."""
    for req_id in scheduler.requests:
        assert analyzer.request_blocks_held(req_id) == request_blocks_held(scheduler, req_id), f"{where}: {req_id}"
        assert analyzer.request_slots(req_id) == request_slots(scheduler, req_id), f"{where}: {req_id}"


def _check_block_states(analyzer, scheduler, where: str) -> None:
    got = [BLOCK_STATES[code] for code in analyzer.block_states()]
    expected = block_states(scheduler)
    wrong = [(i + 1, g, e) for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert len(got) == len(expected) and not wrong, f"{where}: (block, plugin, brute force) {wrong[:5]}"


def _add_prefix_stats(totals: dict, stats) -> None:
    """vLLM's own counts: first admissions (its prefix_cache_queries / hits) and, apart,
    requests re-admitted after preemption."""
    if stats is None:
        return
    totals["queries"] += stats.queries
    totals["hits"] += stats.hits
    totals["resumed_queries"] += stats.preempted_queries
    totals["resumed_hits"] += stats.preempted_hits


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(workloads())
def test_snapshot_matches_brute_force_at_every_step(plugin, workload):
    shape, prompts, seed = workload
    scheduler = sim.build_scheduler(shape)
    analyzer = analyzer_for(scheduler)
    requests = sim.make_requests(prompts, scheduler.hash_block_size)
    manager = scheduler.kv_cache_manager

    outcomes = {"success": 0, "failure": 0}
    allocate = manager.allocate_slots

    def counting_allocate(*args, **kwargs):
        result = allocate(*args, **kwargs)
        outcomes["success" if result is not None else "failure"] += 1
        return result

    manager.allocate_slots = counting_allocate  # instance attribute: seen by the scheduler only
    vllm_stats = dict.fromkeys(["queries", "hits", "resumed_queries", "resumed_hits", "removed"], 0)
    publish = scheduler.kv_event_publisher.publish

    def counting_publish(batch):
        for event in batch.events:
            if type(event).__name__ == "BlockRemoved":
                vllm_stats["removed"] += len(event.block_hashes)
        return publish(batch)

    scheduler.kv_event_publisher.publish = counting_publish
    rng = random.Random(seed)
    for request in requests:
        scheduler.add_request(request)
    step = 0
    while scheduler.has_requests():
        scheduler_output = scheduler.schedule()
        # between schedule() and update_from_output(): computed tokens ran ahead
        _check(analyzer.snapshot(), brute_force(scheduler), f"step {step} after schedule")
        _check_block_states(analyzer, scheduler, f"step {step} after schedule")
        _check_requests(analyzer, scheduler, f"step {step} after schedule")
        engine_outputs = scheduler.update_from_output(
            scheduler_output, sim.fake_model_output(scheduler_output, scheduler, rng)
        )
        for output in engine_outputs.values():
            if output.scheduler_stats is not None:
                _add_prefix_stats(vllm_stats, output.scheduler_stats.prefix_cache_stats)
        snapshot = analyzer.snapshot()
        analyzer.check_due = True  # as a collection asks: the self-check runs at the next step boundary
        _check(snapshot, brute_force(scheduler), f"step {step} after update")
        _check_block_states(analyzer, scheduler, f"step {step} after update")
        _check_requests(analyzer, scheduler, f"step {step} after update")
        step += 1
        assert step < 5_000, "scheduler did not drain"

    _add_prefix_stats(vllm_stats, manager.make_prefix_cache_stats())  # not yet reported by a step
    assert snapshot.preemptions == sum(r.num_preemptions for r in requests)
    assert snapshot.prefix_resumed_queried_tokens == vllm_stats["resumed_queries"]
    assert snapshot.prefix_resumed_hit_tokens == vllm_stats["resumed_hits"]
    assert snapshot.prefix_queried_tokens == vllm_stats["queries"]
    assert snapshot.prefix_hit_tokens == vllm_stats["hits"]
    assert snapshot.evictions == vllm_stats["removed"]
    assert snapshot.allocation_attempts == outcomes["success"] + outcomes["failure"]
    assert snapshot.allocation_failures == outcomes["failure"]
    # once drained: nothing held, nothing tracked, every block free
    assert snapshot.tracked_requests == 0
    assert snapshot.used_blocks == 0 and snapshot.free_blocks == shape.num_blocks - 1
    assert snapshot.drift_repairs == 0
    if not shape.prefix_caching:
        assert snapshot.prefix_queried_tokens == 0 and snapshot.cached_blocks == 0
    analyzer.fold_histograms(0)
    assert analyzer.allocation_duration["success"].count == outcomes["success"]
    assert analyzer.allocation_duration["failure"].count == outcomes["failure"]
    assert analyzer.block_cache_duration.count == snapshot.evictions
    assert analyzer.block_idle_duration.count == snapshot.evictions


@pytest.mark.parametrize("layout", ["full", "full,sliding_window:64", "full,chunked_local:64", "full,mamba_align"])
def test_a_pressured_workload_exercises_every_path(plugin, layout):
    """The randomised test above is only as good as its coverage: one fixed
    workload per layout must show preemptions, failed allocations, prefix hits,
    evictions of never-reused and of reused blocks, partial blocks and several
    free runs; on windowed and Mamba "align" layouts, blocks retired in place
    (held blocks fall while a request runs), and on Mamba, state blocks."""
    from vllm_frag_otel.sim import workloads as wl

    shape = sim.EngineShape(num_blocks=240, block_size=16, max_num_seqs=16, layout=layout)
    scheduler = sim.build_scheduler(shape)
    analyzer = analyzer_for(scheduler)
    specs = wl.generate("sharegpt", 60, seed=1, max_len=1000)
    seen = {"partial": 0, "runs": 0, "mismatch": [], "states": set(), "retired": 0, "state_blocks": 0}
    held_before: dict[str, int] = {}

    def observe(*_):
        snapshot = analyzer.snapshot()
        try:
            _check(snapshot, brute_force(scheduler), "step")
            _check_block_states(analyzer, scheduler, "step")
            _check_requests(analyzer, scheduler, "step")
        except AssertionError as exc:
            seen["mismatch"].append(str(exc))
        seen["states"].update(BLOCK_STATES[code] for code in analyzer.block_states())
        seen["partial"] = max(seen["partial"], snapshot.partial_blocks)
        seen["runs"] = max(seen["runs"], snapshot.free_runs)
        seen["state_blocks"] = max([seen["state_blocks"]] + [g.used_blocks for g in snapshot.groups if not g.token_slots])
        for req_id in scheduler.requests:
            held = request_blocks_held(scheduler, req_id)
            seen["retired"] += held < held_before.get(req_id, 0) and req_id in scheduler.running_ids()
            held_before[req_id] = held

    scheduler.running_ids = lambda: {r.request_id for r in scheduler.running}
    sim.run_to_completion(
        scheduler, sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], scheduler.hash_block_size),
        on_step=observe,
    )
    final = analyzer.snapshot()
    assert seen["mismatch"] == [], seen["mismatch"][:3]
    assert final.preemptions > 0 and final.allocation_failures > 0
    assert final.prefix_hit_tokens > 0 and final.blocks_prefix_hit > 0
    assert final.evicted_never_reused > 0 and final.evictions > final.evicted_never_reused
    assert final.blocks_allocated_recycled == final.evictions  # only capacity evictions here
    assert seen["partial"] > 1 and seen["runs"] > 1
    assert seen["states"] >= {"empty", "cached", "full", "partial"}
    assert (seen["retired"] > 0) == (layout != "full")  # Mamba "align" nulls interior states too
    assert (seen["state_blocks"] > 0) == ("mamba" in layout)

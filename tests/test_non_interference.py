"""The plugin never changes what vLLM decides, even when its own hooks fail."""

from __future__ import annotations

import logging
import random

import pytest
from helpers import scheduler_trace

from vllm_frag_otel import analyzer_for
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.sim import workloads
from vllm_frag_otel.plugin.hooks import guard
from vllm_frag_otel.core.state import KVCacheState

SHAPE = sim.EngineShape(num_blocks=90, block_size=16, max_num_seqs=12)


def _trace(seed: int = 11) -> list[tuple]:
    """Every scheduler output of one pressured workload, run to completion."""
    scheduler = sim.build_scheduler(SHAPE)
    specs = workloads.generate("sharegpt", 30, seed=seed, max_len=700)
    requests = sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], SHAPE.block_size)
    trace: list[tuple] = []
    sim.run_to_completion(scheduler, requests, seed=seed, on_step=lambda out, _: trace.append(scheduler_trace(out)))
    assert sum(r.num_preemptions for r in requests) > 0  # the interesting paths ran
    return trace


@pytest.fixture()
def unhooked(plugin):
    """vLLM with the plugin's wrappers removed, restored afterwards."""
    plugin.uninstrument()
    try:
        yield
    finally:
        assert plugin.instrument()


@pytest.fixture()
def fresh_guard():
    g = guard()
    saved = (g.active, g.errors, g.max_errors)
    g.active, g.errors = True, 0
    yield g
    g.active, g.errors, g.max_errors = saved


def test_scheduler_outputs_identical_with_and_without_plugin(plugin, request):
    with_plugin = _trace()
    request.getfixturevalue("unhooked")
    from vllm.v1.core.block_pool import BlockPool

    assert not hasattr(BlockPool.__dict__["get_new_blocks"], "__wrapped__")
    without_plugin = _trace()
    assert len(with_plugin) > 100
    assert with_plugin == without_plugin


def test_failing_hooks_are_contained_counted_then_disable_the_plugin(
    plugin, unhooked, fresh_guard, monkeypatch, caplog
):
    reference = _trace()
    assert plugin.instrument()
    fresh_guard.max_errors = 25

    def broken(self, *args, **kwargs):
        raise RuntimeError("injected hook failure")

    monkeypatch.setattr(KVCacheState, "on_blocks_allocated", broken)
    monkeypatch.setattr(KVCacheState, "on_blocks_released", broken)
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        traced = _trace()
    assert traced == reference  # vLLM decided exactly the same things
    assert fresh_guard.errors == 25 and not fresh_guard.active
    disabled = [r for r in caplog.records if "disabled after 25 hook errors" in r.getMessage()]
    assert len(disabled) == 1
    assert "injected hook failure" in disabled[0].getMessage()
    # disabled: every hook is a pass-through, so state stops following vLLM
    scheduler = sim.build_scheduler(SHAPE)
    scheduler.add_request(sim.make_requests([([5] * 40, 3)], SHAPE.block_size, "probe")[0])
    sim.step(scheduler, random.Random(0))
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() < SHAPE.num_blocks - 1
    assert analyzer_for(scheduler).snapshot().blocks_allocated_fresh == 0


def _attributes_moved_out(obj) -> bool:
    """Whether `obj`'s attributes left CPython's inline values for a dict object
    (what reading `obj.__dict__` does on 3.11/3.12): from then on every `self.x`
    in vLLM's methods of that object takes about twice the work. Seen from the
    garbage collector, which then finds the attributes behind one dict."""
    import gc

    attributes = [r for r in gc.get_referents(obj) if isinstance(r, dict)]
    return any(any(isinstance(k, str) and v is getattr(obj, k, object()) for k, v in d.items()) for d in attributes)


def _run_and_list_objects_moved_out(layout: str, collect) -> list[str]:
    shape = sim.EngineShape(num_blocks=90, block_size=16, max_num_seqs=12, layout=layout,
                            max_num_batched_tokens=256, max_model_len=1024)
    scheduler = sim.build_scheduler(shape)
    specs = workloads.generate("sharegpt", 20, seed=3, max_len=700)
    requests = sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], shape.block_size)
    sim.run_to_completion(scheduler, requests, seed=3)
    assert sum(r.num_preemptions for r in requests) > 0
    collect(scheduler)
    manager = scheduler.kv_cache_manager
    touched = [scheduler, manager, manager.block_pool, manager.coordinator, *manager.coordinator.single_type_managers]
    return [type(obj).__name__ for obj in touched if _attributes_moved_out(obj)]


@pytest.mark.parametrize("layout", ["full", "full,mamba_align"])
def test_the_plugin_leaves_vllms_objects_as_fast_to_read_as_it_found_them(plugin, request, layout):
    """The plugin keeps its state on vLLM's pool and manager with setattr/getattr:
    after a run, a collection and the engine's stop, the objects it touches have
    their attributes where vLLM alone leaves them (vLLM's Scheduler has too many
    to keep them inline either way)."""
    from vllm_frag_otel.plugin.hooks import engine_stopped

    def collect(scheduler):
        state = analyzer_for(scheduler)
        state.snapshot()
        state.self_check()
        engine_stopped(scheduler, seconds=0)

    with_plugin = _run_and_list_objects_moved_out(layout, collect)
    request.getfixturevalue("unhooked")
    without_plugin = _run_and_list_objects_moved_out(layout, lambda scheduler: None)
    assert with_plugin == without_plugin
    assert "BlockPool" not in without_plugin and "KVCacheManager" not in without_plugin
    pool = sim.build_scheduler(sim.EngineShape(num_blocks=90)).kv_cache_manager.block_pool
    assert not _attributes_moved_out(pool)
    pool.__dict__  # what the check must see
    assert _attributes_moved_out(pool)

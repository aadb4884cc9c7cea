"""How vLLM loads the plugin, and what happens when it should not (or cannot) hook.

Each case that changes vLLM or the environment runs in a fresh interpreter
and goes through vLLM's own `load_general_plugins()`.
"""

from __future__ import annotations

import importlib.metadata
import textwrap

import pytest

from helpers import run_python

# Prints whether vLLM's BlockPool is wrapped after vLLM loaded its plugins.
PROBE = textwrap.dedent(
    """
    {prelude}
    from vllm.plugins import load_general_plugins
    load_general_plugins()
    {after}
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.sched.scheduler import Scheduler
    wrapped = [hasattr(cls.__dict__[m], "__vllm_frag_otel_hook__")
               for cls, m in ((BlockPool, "get_new_blocks"), (Scheduler, "_preempt_request"))]
    print("WRAPPED" if all(wrapped) else "UNTOUCHED" if not any(wrapped) else "PARTIAL")
    inner = BlockPool.__dict__["get_new_blocks"]
    print("DOUBLE" if hasattr(getattr(inner, "__wrapped__", None), "__vllm_frag_otel_hook__") else "SINGLE")
    """
)


def _probe(prelude: str = "", after: str = "", **env) -> tuple[str, str]:
    proc = run_python(PROBE.format(prelude=prelude, after=after), env={"VLLM_PLUGINS": "frag_otel", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "vllm-frag-otel" in line]


def test_entry_point_is_declared():
    (entry,) = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "frag_otel"]
    assert entry.value == "vllm_frag_otel:register"


def test_vllm_loads_the_plugin_once_per_process():
    # vLLM may load plugins twice in one process: a second register() changes nothing
    stdout, stderr = _probe(after="import vllm_frag_otel; vllm_frag_otel.register()")
    assert "WRAPPED" in stdout and "SINGLE" in stdout
    assert not _warnings(stderr)


def test_vllm_plugins_allow_list_without_us_leaves_vllm_untouched():
    stdout, _ = _probe(VLLM_PLUGINS="some_other_plugin")
    assert "UNTOUCHED" in stdout


def test_disabled_by_variable():
    stdout, stderr = _probe(VLLM_FRAG_OTEL_ENABLED="false")
    assert "UNTOUCHED" in stdout and not _warnings(stderr)


def test_unsupported_vllm_version_warns_once_and_leaves_vllm_untouched():
    stdout, stderr = _probe("import vllm; vllm.__version__ = '0.29.1'")
    assert "UNTOUCHED" in stdout
    (warning,) = _warnings(stderr)
    assert "vLLM 0.29.1 is not supported" in warning and ">=0.30,<0.35" in warning


def test_a_newer_untested_vllm_whose_hook_points_match_is_instrumented_with_one_warning():
    stdout, stderr = _probe("import vllm; vllm.__version__ = '0.35.1'")
    assert "WRAPPED" in stdout and "SINGLE" in stdout
    (warning,) = _warnings(stderr)
    assert "vLLM 0.35.1 is newer than the versions this plugin is tested with (>=0.30,<0.35)" in warning
    assert "a scripted run of its block pool and KV-cache manager kept the ledger exact" in warning
    assert "vllm.frag_otel.drift" in warning


def test_a_newer_vllm_with_a_missing_hook_point_is_refused():
    stdout, stderr = _probe("import vllm; vllm.__version__ = '0.35.0rc1'\n"
                            "from vllm.v1.core.block_pool import BlockPool; del BlockPool.move_block_hashes")
    assert "UNTOUCHED" in stdout
    (warning,) = _warnings(stderr)
    assert "vLLM 0.35.0rc1: vllm.v1.core.block_pool.BlockPool.move_block_hashes is missing" in warning


def test_a_tested_vllm_is_instrumented_without_a_warning():
    stdout, stderr = _probe("import vllm; vllm.__version__ = '0.34.2.dev5+gabc'")
    assert "WRAPPED" in stdout and not _warnings(stderr)


def test_missing_hook_point_warns_and_leaves_vllm_untouched():
    stdout, stderr = _probe("from vllm.v1.core.block_pool import BlockPool; del BlockPool.move_block_hashes")
    assert "UNTOUCHED" in stdout
    (warning,) = _warnings(stderr)
    assert "vllm.v1.core.block_pool.BlockPool.move_block_hashes is missing" in warning


def test_changed_hook_signature_warns_and_leaves_vllm_untouched():
    stdout, stderr = _probe(
        "from vllm.v1.core.block_pool import BlockPool\n"
        "def touch(self, block_list): pass\n"
        "BlockPool.touch = touch"
    )
    assert "UNTOUCHED" in stdout
    (warning,) = _warnings(stderr)
    assert "BlockPool.touch takes ('block_list',), expected ('blocks',)" in warning


def test_a_hot_hook_whose_parameter_names_clash_leaves_vllm_untouched():
    # the hottest hooks are compiled with vLLM's own parameter list (see
    # hooks._Forwarder); a parameter named like one of the hook's variables
    # must refuse, all or nothing, not shadow it
    stdout, stderr = _probe(
        "from vllm.v1.core.kv_cache_manager import KVCacheManager\n"
        "original = KVCacheManager.allocate_slots\n"
        "def allocate_slots(self, request, num_new_tokens, result=None): return original(self, request, num_new_tokens)\n"
        "KVCacheManager.allocate_slots = allocate_slots"
    )
    assert "UNTOUCHED" in stdout
    (warning,) = _warnings(stderr)
    assert "allocate_slots has parameters named like the hook's own variables: ['result']" in warning


def test_bad_settings_are_named_and_defaults_used():
    stdout, stderr = _probe(
        VLLM_FRAG_OTEL_ENABLED="maybe",
        VLLM_FRAG_OTEL_EXPORTER="kafka",
        VLLM_FRAG_OTEL_MAX_HOOK_ERRORS="-3",
    )
    assert "WRAPPED" in stdout  # ENABLED fell back to its default, true
    warnings = "\n".join(_warnings(stderr))
    assert "VLLM_FRAG_OTEL_ENABLED='maybe'" in warnings and "1, true, yes, on, 0, false, no, off" in warnings
    assert "VLLM_FRAG_OTEL_EXPORTER='kafka'" in warnings and "auto, otlp, file, console, none" in warnings
    assert "VLLM_FRAG_OTEL_MAX_HOOK_ERRORS='-3'" in warnings and "a whole number >= 1" in warnings
    assert len(_warnings(stderr)) == 3


def test_a_hook_variable_bound_by_except_as_clashes_too():
    from vllm_frag_otel.plugin import hooks

    def free_blocks(self, ordered_blocks, exc): ...

    with pytest.raises(ValueError, match=r"named like the hook's own variables: \['exc'\]"):  # `except ... as exc`
        hooks._compile(free_blocks, hooks._release("on_blocks_released"))


ENGINE_CORE = "import multiprocessing; multiprocessing.current_process().name = 'EngineCore_DP0'"
STOP_HOOKED = (
    "from vllm_frag_otel.plugin.stop import stop_instrumentor\n"
    "print('STOP HOOKED' if stop_instrumentor.is_instrumented else 'STOP NOT HOOKED')\n"
)


def test_the_stop_is_hooked_with_the_kv_cache_so_vllm_s_default_stop_needs_no_warning():
    stdout, stderr = _probe(ENGINE_CORE, after=STOP_HOOKED)
    assert "WRAPPED" in stdout and "STOP HOOKED" in stdout
    assert not _warnings(stderr), _warnings(stderr)


def test_a_vllm_whose_stop_moved_keeps_the_kv_cache_hooks_and_says_once_what_its_stop_loses():
    stdout, stderr = _probe(ENGINE_CORE + "\nfrom vllm.v1.engine.core import EngineCore; del EngineCore.shutdown",
                            after="import vllm_frag_otel; vllm_frag_otel.register()\n" + STOP_HOOKED)
    assert "WRAPPED" in stdout and "STOP NOT HOOKED" in stdout
    (warning,) = _warnings(stderr)  # the engine core's, once though vLLM loads the plugin twice
    assert "cannot hook vLLM's stop (vllm.v1.engine.core.EngineCore.shutdown is missing)" in warning, warning
    assert "--shutdown-timeout 0 (vLLM's default)" in warning, warning
    assert "start vLLM with --shutdown-timeout 10 or more" in warning, warning

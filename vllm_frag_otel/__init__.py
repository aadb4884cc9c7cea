"""vllm-frag-otel: OpenTelemetry telemetry for where vLLM's KV-cache memory goes.

vLLM loads `register()` through the `vllm.general_plugins` entry point in each
of its processes. It only wraps vLLM's v1 KV-cache classes; the OTel providers
start later, in the process that builds a KV cache manager.
"""

from __future__ import annotations

from vllm_frag_otel.core.state import FragmentationSnapshot, GroupSnapshot, KVCacheState

__version__ = "0.1.0"
__all__ = ["FragmentationSnapshot", "GroupSnapshot", "KVCacheState", "analyzer_for", "register", "__version__"]


def register() -> None:
    """vLLM's plugin entry point: idempotent and cheap, safe in every process."""
    from vllm_frag_otel.config import load_settings
    from vllm_frag_otel.plugin.hooks import instrumentor
    from vllm_frag_otel.plugin import stop

    if instrumentor.is_instrumented:
        return
    settings = load_settings()
    if settings.enabled and instrumentor.instrument(max_hook_errors=settings.max_hook_errors):
        stop.install()


def analyzer_for(obj) -> KVCacheState:
    """The live analyzer of a hooked Scheduler, KVCacheManager or BlockPool."""
    from vllm_frag_otel.plugin.hooks import analyzer_for as _analyzer_for

    return _analyzer_for(obj)

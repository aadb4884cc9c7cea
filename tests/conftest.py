"""Shared set-up: vLLM's real plugin loader, once per test session.

Telemetry export is off by default here (tests that exercise exporters set
their own environment, usually in a subprocess).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_PLUGINS"] = "frag_otel"
os.environ["VLLM_FRAG_OTEL_EXPORTER"] = "none"
# every allocate_slots call timed, so histogram counts can be checked against call counts
# (tests of the sampled default set their own rate)
os.environ["VLLM_FRAG_OTEL_ALLOCATION_SAMPLE_RATE"] = "1"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402

# CI: the same examples on every run. `HYPOTHESIS_PROFILE=explore pytest tests/test_oracle.py`
# searches afresh, and longer.
settings.register_profile("ci", derandomize=True, max_examples=100, print_blob=True)
settings.register_profile("explore", max_examples=2000, print_blob=True)
# scripts/mutate.py: a mutant is killed by any failing example; shrinking it costs seconds to tens of seconds
settings.register_profile("mutate", derandomize=True, max_examples=100, phases=[Phase.explicit, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def plugin():
    """The plugin as vLLM loads it: through the `vllm.general_plugins` entry point."""
    from vllm.plugins import load_general_plugins

    from vllm_frag_otel.plugin.hooks import instrumentor

    load_general_plugins()
    assert instrumentor.is_instrumented, "vLLM did not load the frag_otel entry point"
    return instrumentor

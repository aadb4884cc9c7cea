"""What the benchmarks share: the targets, progress lines, and the plugin's settings.

Imported first by every benchmark module: vLLM reads the plugin settings when it
loads plugins, so they must be in the environment before vLLM is imported.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_PLUGINS"] = "frag_otel"
os.environ["VLLM_FRAG_OTEL_EXPORTER"] = "none"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

T0 = time.perf_counter()
BLOCK_SIZE = 16

# Targets set by the issue.
TARGET_STEP_OVERHEAD = 1.01  # metrics only: <= +1% step time
TARGET_STEP_OVERHEAD_WITH_SPANS = 1.03  # the default (spans on): <= +3%
TARGET_COLLECTION_MS = {1_000_000: 1.0, 4_000_000: 5.0}  # one collection at that many blocks
TARGET_BYTES_PER_BLOCK = 16
FLAT_TOLERANCE = 1.25  # "flat": largest / smallest per-event cost across pool sizes


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def _quantiles(values: list[float]) -> dict:
    values = sorted(values)
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1, q3 = values[0], values[-1]
    return {"median": statistics.median(values), "p25": q1, "p75": q3, "min": values[0], "max": values[-1]}


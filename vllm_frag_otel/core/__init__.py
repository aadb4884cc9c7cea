"""The ledger: KV-cache block state, fragmentation and request stories.

Pure Python and numpy: it imports neither vLLM nor OpenTelemetry, so it is
tested alone (`tests/test_layering.py` enforces it).
"""

"""The simulator: vLLM's real scheduler and KV-cache manager on a CPU, fed seeded workloads."""

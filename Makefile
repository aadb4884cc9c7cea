# The two commands of the README.
.PHONY: test simulate setup

setup:
	bash scripts/setup-venv.sh

# Set up everything (first run: a few minutes) and run the whole test suite.
test: setup
	.venv/bin/python -m pytest

# Run vLLM's real scheduler on a ShareGPT-like workload with the plugin and print the summary.
simulate: setup
	.venv/bin/vllm-frag-otel simulate --workload sharegpt --output sim-out

# The two commands of the README.
.PHONY: test simulate setup e2e test-rules stack-up stack-down test-vllm-newest test-vllm-peer mutate

setup:
	bash scripts/setup-venv.sh

# Set up everything (first run: a few minutes) and run the whole test suite, on both cores:
# the long CPU-bound tests (marker cpu_heavy) in a second pytest process beside the rest.
test: setup
	.venv/bin/python scripts/run_tests.py

# Run vLLM's real scheduler on a ShareGPT-like workload with the plugin and print the summary.
simulate: setup
	.venv/bin/vllm-frag-otel simulate --workload sharegpt --output sim-out

# Only the end-to-end proof: real vLLM (CPU build) -> Collector -> VictoriaMetrics + Phoenix (first run ~7 min).
e2e: setup
	.venv/bin/python -m pytest tests/e2e

# Release-day canary: every exactness suite on the newest vLLM on the package index (minutes).
test-vllm-newest: setup
	.venv/bin/python scripts/vllm_newest.py

# vLLM's own tests/v1/core, with and without the plugin, on every supported release (~20 min).
test-vllm-peer: setup
	.venv/bin/python scripts/vllm_peer_suite.py

# promtool unit tests of the alert rules.
test-rules:
	bash scripts/stack.sh test-rules

# A local Collector + VictoriaMetrics + Phoenix on loopback (no Docker needed), and its stop.
stack-up:
	bash scripts/stack.sh setup && bash scripts/stack.sh start

stack-down:
	bash scripts/stack.sh stop

# Mutation testing with mutmut (not part of `make test`; CONTRIBUTING.md): in a copy of the tree
# (.mutation/), against the fast unit tests; stops after MUTATE_BUDGET seconds and resumes where it
# stopped on the next run. One module: make mutate MODULE=vllm_frag_otel/core/layout.py
MODULE ?= vllm_frag_otel/core vllm_frag_otel/plugin vllm_frag_otel/export vllm_frag_otel/analysis
MUTATE_TESTS ?= tests/
MUTATE_BUDGET ?= 1800
MUTATE_JOBS ?= 1
mutate: setup
	.venv/bin/pip install -q --disable-pip-version-check -r requirements/dev.txt
	.venv/bin/python scripts/mutate.py $(foreach m,$(MODULE),--module $(m)) $(foreach t,$(MUTATE_TESTS),--tests $(t)) \
		--budget $(MUTATE_BUDGET) --jobs $(MUTATE_JOBS)

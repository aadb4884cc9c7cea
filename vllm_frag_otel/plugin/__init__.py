"""What runs inside vLLM: the hooks on its v1 KV-cache classes and the versions they fit.

The only layer that imports vLLM. It feeds the ledger (`core`) and starts the
export (`export`); nothing imports it back but the package's entry point.
"""

"""The OpenTelemetry layer: metrics, spans and block-map logs of the ledger, over OTLP or to files."""

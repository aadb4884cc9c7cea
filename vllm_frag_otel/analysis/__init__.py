"""Offline analysis: reading OTLP files, the report and its charts, the what-if sweep."""

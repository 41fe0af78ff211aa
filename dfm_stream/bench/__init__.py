"""Tooling: the benchmark harness and the soak test (never imported by the pipeline)."""

"""Tooling: the live demo (settings, model, child processes, terminal view)."""

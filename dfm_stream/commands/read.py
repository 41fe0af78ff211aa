"""The ``dfm-stream`` subcommand(s) of this module (placeholder until implemented)."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``subparsers``."""

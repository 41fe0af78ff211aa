"""The ``dfm-stream`` command: an argparse root whose subcommands live in :mod:`dfm_stream.commands`.

Each module in :data:`COMMAND_MODULES` exposes ``register(subparsers)``, which adds its parser(s)
and sets ``func`` (a callable taking the parsed namespace and returning an exit code). Heavy
imports (torch, OpenCV) happen inside the handlers, so ``--help`` stays quick.
"""

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from dfm_stream import __version__
from dfm_stream.errors import DfmStreamError

COMMAND_MODULES = ("offline", "read", "work", "inspect", "jobs", "bridge", "model", "demo", "bench", "soak")

log = logging.getLogger("dfm_stream")


def build_parser() -> argparse.ArgumentParser:
    """Return the full argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="dfm-stream",
        description="Streaming visual inspection with DFM (Deep Feature Modeling) over Redis Streams.",
    )
    parser.add_argument("--version", action="version", version=f"dfm-stream {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("DFM_LOG_LEVEL", "INFO"),
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (env DFM_LOG_LEVEL; default %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"dfm_stream.commands.{name}").register(sub)
    return parser


def configure_logging(level: str) -> None:
    """Send log records to stderr with timestamps; only entry points call this."""
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dfm-stream``; return the process exit code (2 for a clear user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except DfmStreamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

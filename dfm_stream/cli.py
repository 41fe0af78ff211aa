"""The ``dfm-stream`` command: an argparse root whose subcommands live in :mod:`dfm_stream.commands`.

Each module in :data:`COMMAND_MODULES` exposes ``register(subparsers)``, which adds its parser(s)
and sets ``func`` (a callable taking the parsed namespace and returning an exit code). Heavy
imports (torch, OpenCV) happen inside the handlers, so ``--help`` stays quick.

Errors, one style for every command (:func:`main`): a user mistake or an unreachable dependency is
one ``error: ...`` line on stderr that says what is wrong and what to do, and exit status 2 --
argparse usage errors, :class:`~dfm_stream.errors.DfmStreamError` and Redis connection, credential
and permission failures alike. Anything else is a bug of ours: the traceback, then a line saying
so, and exit status 1.
"""

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

import redis

from dfm_stream import __version__
from dfm_stream.errors import DfmStreamError
from dfm_stream.redact import safe_url

COMMAND_MODULES = (
    "offline", "read", "work", "inspect", "jobs", "bridge", "model", "cameras", "demo", "bench", "soak",
    "console", "drift", "quantize", "enrol",
)  # fmt: skip

log = logging.getLogger("dfm_stream")

EXIT_USER_ERROR = 2
EXIT_BUG = 1
BUG_REPORT = (
    "this is a bug in dfm-stream {version}, not a mistake of yours: please report it to the"
    " dfm-stream maintainers (issue tracker of the project) with the traceback above and the command line"
)


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: ``error: ... (see `PROG --help`)``."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` on one line and exit with status 2."""
        self.exit(EXIT_USER_ERROR, f"error: {_one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the full argument parser with every subcommand registered."""
    parser = Parser(
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
    """Run ``dfm-stream``; return the exit code (2: a user mistake or unreachable dependency; 1: a bug)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the boundary: explain what we can, report the rest as a bug
        message = explain(e, args)
        if message is None:
            traceback.print_exc()
            print(BUG_REPORT.format(version=__version__), file=sys.stderr)
            return EXIT_BUG
        print(f"error: {_one_line(message)}", file=sys.stderr)
        return EXIT_USER_ERROR


def explain(error: BaseException, args: argparse.Namespace) -> str | None:
    """Return the one-line message for an error the user can fix, or None for a bug of ours.

    Redis errors are mapped here, once for every command: unreachable, wrong credentials, missing
    ACL rights. Each message ends with what to do.
    """
    if isinstance(error, DfmStreamError):
        return str(error)
    where = _redis_where(args)
    if isinstance(error, redis.AuthenticationError):
        return (
            f"Redis{where} refused the credentials ({error}): check the user and password in --redis,"
            " DFM_REDIS_USERNAME / DFM_REDIS_PASSWORD or --redis-password-file"
        )
    if isinstance(error, redis.ConnectionError | redis.TimeoutError):
        return (
            f"cannot reach Redis{where} ({error}): check --redis / DFM_REDIS_URL (or [redis] url in"
            " --config) and that the server is running and reachable from here"
        )
    if isinstance(error, redis.exceptions.RedisClusterException) and "reachable node" in str(error):
        return (
            f"cannot reach the Redis Cluster{where} ({error}): check the seed node in --redis and that"
            " the cluster is running (leave out --cluster for a single server)"
        )
    if isinstance(error, redis.exceptions.NoPermissionError):
        return (
            f"Redis{where} refused a command for lack of rights ({error}): use a Redis user allowed"
            " the stream, hash, pub/sub and script commands on the --prefix keys"
        )
    return None


def _redis_where(args: argparse.Namespace) -> str:
    url = getattr(args, "redis", None)
    return f" at {safe_url(url)}" if isinstance(url, str) and url else ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


if __name__ == "__main__":
    sys.exit(main())

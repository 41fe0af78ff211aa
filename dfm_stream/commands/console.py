"""``dfm-stream console``: serve the operator console; ``dfm-stream console add-user``: write its users file.

The console reads everything from Redis (any number of consoles may run) and binds 127.0.0.1
unless told otherwise. Without ``--users`` it is read only and says so on every page. Options win
over the environment (``DFM__CONSOLE__PORT``), which wins over ``[console]`` of ``--config``, which
wins over the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dfm_stream.commands.config_flags import add_section_flags, overlay
from dfm_stream.config import Config, ConsoleConfig, settings_config
from dfm_stream.connect import add_redis_args, connect, settings_with_config
from dfm_stream.errors import ConsoleError, PortInUseError

log = logging.getLogger(__name__)

CONSOLE_FLAGS = ("host", "port", "users", "secret_file", "secure_cookies")


def _listen(host: str, port: int) -> socket.socket:
    """Bind the console's socket now, so a taken port is a one-line error, not a server traceback."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        sock = socket.socket(infos[0][0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(infos[0][4])
    except OSError as e:
        raise PortInUseError(
            f"cannot serve the console on {host}:{port} ({e.strerror or e}; another console on this host?):"
            " choose another --port (0 for a free one) or --host"
        ) from e
    return sock


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``console`` (and its ``add-user`` action) to ``subparsers``."""
    p = subparsers.add_parser("console", help="serve the operator console (web pages over Redis)")
    p.add_argument("--config", help="TOML config: its [redis] and [console] sections")
    g = p.add_argument_group("console (option > environment DFM__CONSOLE__KEY > [console] > default)")
    add_section_flags(g, ConsoleConfig, CONSOLE_FLAGS)
    add_redis_args(p)
    p.set_defaults(func=run_console)
    sub = p.add_subparsers(dest="console_command", metavar="ACTION")
    a = sub.add_parser("add-user", help="add or replace a user in a console users file")
    a.add_argument("--users", required=True, help="users file (created with mode 0600 if missing)")
    a.add_argument("--name", required=True, help="user name (letters, digits, '_', '.', '-')")
    a.add_argument("--role", required=True, choices=("viewer", "operator"), help="viewer: read only")
    a.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    a.set_defaults(func=run_add_user)


def resolve(args: argparse.Namespace) -> tuple[Config, ConsoleConfig]:
    """Return the config and its ``[console]`` with the options that were given laid over."""
    config = settings_config(args.config)
    return config, overlay(config.console, args, CONSOLE_FLAGS)


def run_add_user(args: argparse.Namespace) -> int:
    """Hash the password (argon2id) and write the user into the users file."""
    from dfm_stream.console.auth import add_user

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ConsoleError("the two passwords differ")
    new = add_user(Path(args.users), args.name, args.role, password)
    print(f"{'added' if new else 'updated'} user {args.name} ({args.role}) in {args.users}")
    return 0


def run_console(args: argparse.Namespace) -> int:
    """Serve the console until SIGINT/SIGTERM."""
    import uvicorn

    from dfm_stream.console.app import build_app
    from dfm_stream.console.auth import Users, load_secret

    config, section = resolve(args)
    host, port = section.host, section.port
    users_path, secret_path = section.users, section.secret_file
    settings = settings_with_config(args, config.redis)
    users = Users(Path(users_path) if users_path else None)
    app = build_app(
        connect(settings),
        settings.prefix,
        users,
        load_secret(Path(secret_path) if secret_path else None),
        https_only=section.secure_cookies,
    )
    sock = _listen(host, port)
    port = sock.getsockname()[1]
    mode = f"users from {users_path}" if users.enabled else "read only: no users file"
    print(f"console: http://{host}:{port}/ ({mode}; Redis {settings.safe_url()})", flush=True)
    server_config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=3
    )
    _Server(server_config, app.state.console.live.closing).run(sock)
    return 0


class _Server:
    """uvicorn's server, stopped by SIGINT/SIGTERM with exit code 0 (uvicorn would re-raise the signal)."""

    def __init__(self, config: Any, closing: threading.Event) -> None:
        import uvicorn

        self.server = uvicorn.Server(config)
        self.server.capture_signals = self._capture_signals  # type: ignore[method-assign]
        self.closing = closing

    @contextlib.contextmanager
    def _capture_signals(self) -> Iterator[None]:
        def stop(signum: int, frame: object) -> None:
            self.closing.set()  # end the event streams, so open pages do not hold the shutdown
            self.server.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self, sock: socket.socket) -> None:
        """Serve on ``sock`` until a signal arrives."""
        self.server.run(sockets=[sock])

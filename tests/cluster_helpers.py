"""A Redis Cluster of real processes on loopback, with or without replicas.

Plain helpers (the fixtures that build one are in the test modules that need them): each node is
an :class:`~dfm_stream.embedded_redis.EmbeddedRedis` in cluster mode with its own ``nodes.conf``
in the test's directory, joined by ``redis-cli --cluster create``. A node that is killed and
started again on the same port rejoins with the identity its ``nodes.conf`` holds (as a replica of
whoever was promoted in its place).
"""

from __future__ import annotations

import random
import socket
import subprocess
from pathlib import Path

import redis
from redis.cluster import key_slot
from support import wait_until
from tools import require_tool

from dfm_stream.embedded_redis import EmbeddedRedis


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_ports(n: int) -> list[int]:
    """Return ``n`` ports that are free together with their cluster bus ports (port + 10000)."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randint(20000, 45000)
        if port not in ports and _bindable(port) and _bindable(port + 10000):
            ports.append(port)
    return ports


def node_info(port: int, section: str) -> dict[str, object]:
    """``INFO section`` (or ``CLUSTER INFO`` for ``"cluster"``) of one node; empty when it does not answer."""
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True) as r:
        try:
            return dict(r.cluster("info")) if section == "cluster" else dict(r.info(section))
        except (redis.RedisError, OSError):
            return {}


def node_keys(server: EmbeddedRedis, pattern: str) -> set[str]:
    """Return the keys matching ``pattern`` that live on this one node."""
    with redis.Redis(host="127.0.0.1", port=server.port) as client:
        return {k.decode() for k in client.scan_iter(match=pattern, count=1000)}


class RedisClusterNodes:
    """``primaries`` primaries, each with ``replicas`` replicas, all slots covered once started.

    ``node_timeout_ms`` is the cluster's ``cluster-node-timeout``: a primary that does not answer
    for that long is failed over to its replica.
    """

    def __init__(
        self, workdir: Path, primaries: int = 3, replicas: int = 0, node_timeout_ms: int = 5000
    ) -> None:
        self.replicas = replicas
        self.servers: list[EmbeddedRedis] = []
        for i, port in enumerate(cluster_ports(primaries * (1 + replicas))):
            node_dir = workdir / f"node{i}"
            node_dir.mkdir(parents=True)
            args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", str(node_timeout_ms)]
            self.servers.append(EmbeddedRedis(port=port, workdir=node_dir, extra_args=args))

    @property
    def seed_url(self) -> str:
        """The URL of the first node (any node will do as a cluster client's seed)."""
        return self.servers[0].url

    def start(self, timeout: float = 60.0) -> RedisClusterNodes:
        """Start the nodes and create the cluster; return once every node is ok and every replica in sync."""
        for server in self.servers:
            server.start()
        nodes = [f"127.0.0.1:{s.port}" for s in self.servers]
        cmd = [require_tool("redis-cli"), "--cluster", "create", *nodes]
        cmd += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"redis-cli --cluster create failed: {done.stdout}{done.stderr}"
        wait_until(self.healthy, timeout, 0.2, "cluster_state:ok on every node, every replica in sync")
        return self

    def healthy(self) -> bool:
        """True when every running node says ``cluster_state:ok`` and every replica's link is up."""
        for server in self.servers:
            if server.proc is None:
                continue
            if node_info(server.port, "cluster").get("cluster_state") != "ok":
                return False
            replication = node_info(server.port, "replication")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def role(self, port: int) -> str:
        """``master`` or ``slave`` as the node on ``port`` sees itself ("" when it does not answer)."""
        return str(node_info(port, "replication").get("role", ""))

    def primary_of(self, key: str) -> EmbeddedRedis:
        """The server that holds ``key``'s slot now, asked of any node that answers."""
        slot = key_slot(key.encode())
        for server in self.servers:
            if server.proc is None:
                continue
            with redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2) as r:
                try:
                    shards = r.execute_command("CLUSTER", "SLOTS")
                except (redis.RedisError, OSError):
                    continue
            for start, end, primary, *_ in shards:
                if start <= slot <= end:
                    return self.server(int(primary[1]))
        raise AssertionError(f"no node answers for the slot of {key}")

    def replica_of(self, primary: EmbeddedRedis) -> EmbeddedRedis:
        """The server that replicates ``primary`` now."""
        for server in self.servers:
            info = node_info(server.port, "replication") if server.proc is not None else {}
            if info.get("role") == "slave" and int(str(info.get("master_port", 0))) == primary.port:
                return server
        raise AssertionError(f"no replica of the node on port {primary.port}")

    def server(self, port: int) -> EmbeddedRedis:
        """The server listening on ``port``."""
        (server,) = [s for s in self.servers if s.port == port]
        return server

    def close(self) -> None:
        """Stop every node and wait for it."""
        for server in self.servers:
            server.close()

"""Helpers of the reliability and security tests: metrics over HTTP, stream accounting, process memory.

The tiny fitted artifact comes from ``worker_helpers.artifact`` (a session fixture); frames are pushed
with ``worker_helpers.push_frames``. What is here is what those tests need on top: finding and
scraping a process's ``/metrics``, counting scores per frame id, and listening sockets.
"""

from __future__ import annotations

import urllib.request
from collections import Counter
from pathlib import Path

import redis
from prometheus_client.parser import text_string_to_metric_families
from support import Processes, wait_until

from dfm_stream import keys
from dfm_stream.bench.soak import metrics_port
from dfm_stream.wire import FIELD, ScoreMsg


def wait_metrics_port(procs: Processes, proc: object, timeout: float = 60) -> int:
    """Return the /metrics port a dfm-stream child logged at start (it was started with --metrics-port 0)."""
    path = Path(proc.log_path)  # type: ignore[attr-defined]
    port = wait_until(lambda: metrics_port(path), timeout, what=f"the metrics port in {path.name}")
    return int(port)  # type: ignore[arg-type]


def http_get(port: int, path: str = "/metrics") -> str:
    """GET ``http://127.0.0.1:PORT/PATH`` and return the body (any status)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.read().decode()


def sample(body: str, name: str, **labels: str) -> float:
    """Sum of the samples ``name`` whose labels include ``labels`` in a /metrics body (0 when absent)."""
    total = 0.0
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def scrape(port: int, name: str, **labels: str) -> float:
    """Scrape ``/metrics`` on ``port`` now and return :func:`sample` of it."""
    return sample(http_get(port), name, **labels)


def score_counts(client: redis.Redis, camera: str) -> Counter[str]:
    """Return frame id -> number of accepted score entries, over ``camera``'s whole score stream."""
    counts: Counter[str] = Counter()
    for _, fields in client.xrange(keys.scores_key(camera)):
        counts[ScoreMsg.from_bytes(fields[FIELD.encode()]).frame_id] += 1
    return counts


def stream_ids(client: redis.Redis, camera: str) -> list[str]:
    """Return the frame ids of every entry now in ``camera``'s frame stream."""
    return [f"{camera}:{i.decode()}" for i, _ in client.xrange(keys.frames_key(camera))]


def group_pending(client: redis.Redis, camera: str, group: str = keys.DEFAULT_GROUP) -> int:
    """Return the pending count of the worker group on ``camera`` (0 when there is no group yet)."""
    try:
        return int(client.xpending(keys.frames_key(camera), group)["pending"])
    except redis.ResponseError:
        return 0


def group_lag(client: redis.Redis, camera: str, group: str = keys.DEFAULT_GROUP) -> int | None:
    """Return the group's lag on ``camera`` (entries not yet delivered), None when Redis cannot tell."""
    for g in client.xinfo_groups(keys.frames_key(camera)):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            lag = g.get("lag")
            return None if lag is None else int(lag)
    return None


def undelivered(client: redis.Redis, camera: str, group: str = keys.DEFAULT_GROUP) -> int:
    """Entries of ``camera``'s stream after the group's last-delivered id (counted, not Redis's lag).

    ``XINFO GROUPS`` ``lag`` is not used: Redis 7.0 leaves it too high for good after entries were
    trimmed before the group read them.
    """
    key = keys.frames_key(camera)
    for g in client.xinfo_groups(key):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            last = g["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else last
            return len(client.xrange(key, min=f"({last}", max="+"))
    return client.xlen(key)


def listening_addresses(port: int) -> set[str]:
    """Return the local IPv4/IPv6 addresses (hex, as in /proc/net/tcp*) that listen on TCP ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


LOOPBACK_V4 = "0100007F"
"""127.0.0.1 as /proc/net/tcp writes it (little-endian hex)."""

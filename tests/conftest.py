"""Shared fixtures: real Redis server processes on free loopback ports, and child processes of ours.

Everything a fixture starts, it stops: servers are terminated and their directories removed,
child processes are killed if a test left them running. Session fixtures that need more than
Redis (the tiny fitted ``artifact``) are in the plugin modules of ``pytest_plugins``, so pytest
registers them once for the whole run. Plain helpers (``Processes``, ``wait_until``, ``REPO``)
are in ``support.py``: import them from there, not from this module.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support import REPO, Processes, wait_until

from dfm_stream.embedded_redis import EmbeddedRedis

pytest_plugins = ["artifact_fixtures"]

__all__ = ["REPO", "Processes", "wait_until"]
"""Re-exported for test modules written before ``support.py``; new code imports from ``support``."""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A fresh redis-server (no persistence) on a free port, stopped after the test."""
    server = EmbeddedRedis(workdir=tmp_path / "redis-data")
    server.dir.mkdir()
    server.start()
    yield server
    server.close()


@pytest.fixture
def aof_redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server with AOF persistence, so a test can kill and restart it without losing data."""
    server = EmbeddedRedis(appendonly=True, workdir=tmp_path / "redis-aof")
    server.dir.mkdir()
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The URL of the test's own redis-server."""
    return redis_server.url


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A binary client of the test's own redis-server."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Child processes of the test, killed at the end if still running; logs under tmp_path/logs."""
    p = Processes(tmp_path / "logs")
    yield p
    p.cleanup()

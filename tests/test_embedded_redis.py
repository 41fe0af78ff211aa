"""The embedded Redis server used by the demo and by every test."""

import pytest
import redis

from dfm_stream.embedded_redis import EmbeddedRedis
from dfm_stream.errors import DfmStreamError


def test_aof_server_keeps_stream_entries_across_a_kill(aof_redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(aof_redis_server.url)
    client.xadd("s", {"msg": b"1"})
    aof_redis_server.stop(kill=True)
    aof_redis_server.start()
    assert client.xlen("s") == 1
    client.close()


def test_a_server_that_cannot_start_says_why() -> None:
    server = EmbeddedRedis(extra_args=["--no-such-directive", "x"])
    try:
        with pytest.raises(DfmStreamError, match=r"(?s)exited at start \(code 1\): .*no-such-directive"):
            server.start()
    finally:
        server.close()

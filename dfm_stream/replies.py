"""Typed views of the Redis replies this project reads.

redis-py annotates each reply as the union of every shape it could take (``bytes`` or ``str``
depending on ``decode_responses``, ``None`` where some server versions answer nil, RESP2 vs RESP3
layouts). Our clients never decode responses (:func:`dfm_stream.connect.connect`), so each reply's
shape is known from the command: these thin wrappers state it once, at the boundary, instead of
narrowing it at every use. A missing key reads as an empty list, as Redis itself answers.
"""

from collections.abc import Iterable, Mapping
from typing import TypedDict, cast

from redis.typing import KeyT, StreamIdT

from dfm_stream.connect import RedisClient as Client


def text(value: bytes | str, errors: str = "strict") -> str:
    """Return a reply value (an id, a field, a hash value) as ``str``: bytes are UTF-8 decoded."""
    return value.decode(errors=errors) if isinstance(value, bytes) else str(value)


Record = tuple[bytes, dict[bytes, bytes]]
"""One stream entry: its id and its fields."""
ScriptArg = bytes | str | int | float
"""What a Lua script's ``ARGV`` may be given."""


class PendingRow(TypedDict):
    """One row of ``XPENDING key group start end count``."""

    message_id: bytes
    consumer: bytes
    time_since_delivered: int
    times_delivered: int


def xrange(
    client: Client, key: str, start: str | bytes = "-", end: str | bytes = "+", count: int | None = None
) -> list[Record]:
    """``XRANGE key start end [COUNT count]``, oldest first."""
    return cast(list[Record], client.xrange(key, min=start, max=end, count=count) or [])


def xrevrange(
    client: Client, key: str, count: int | None = None, end: str | bytes = "+", start: str | bytes = "-"
) -> list[Record]:
    """``XREVRANGE key end start [COUNT count]``, newest first."""
    return cast(list[Record], client.xrevrange(key, max=end, min=start, count=count) or [])


def xread_one(client: Client, key: str, after: str, count: int, block: int | None = None) -> list[Record]:
    """``XREAD [COUNT count] [BLOCK ms] STREAMS key after``: the new entries of one stream."""
    reply = cast(list[tuple[bytes, list[Record]]], client.xread({key: after}, count=count, block=block))
    return reply[0][1] if reply else []


def xread_any(client: Client, streams: Mapping[str, str], count: int, block: int) -> bool:
    """``XREAD COUNT count BLOCK ms STREAMS ...``: return True when some stream had a newer entry."""
    ids: dict[KeyT, StreamIdT] = {key: after for key, after in streams.items()}
    return bool(client.xread(ids, count=count, block=block))


def xreadgroup(
    client: Client,
    group: str,
    consumer: str,
    streams: Mapping[str, str],
    count: int,
    block: int | None = None,
) -> list[tuple[bytes, list[Record]]]:
    """``XREADGROUP GROUP group consumer [COUNT count] [BLOCK ms] STREAMS ...``: per stream, its entries.

    An entry of the consumer's own pending list that was deleted (trimmed) since reads with empty
    fields.
    """
    ids: dict[KeyT, StreamIdT] = {key: after for key, after in streams.items()}
    reply = client.xreadgroup(group, consumer, ids, count=count, block=block)
    return cast(list[tuple[bytes, list[Record]]], reply or [])


def xautoclaim(
    client: Client,
    key: str,
    group: str,
    consumer: str,
    min_idle_ms: int,
    start: str = "0-0",
    count: int = 100,
) -> list[Record]:
    """``XAUTOCLAIM key group consumer min-idle start COUNT count``: the entries claimed.

    An entry deleted while pending (nil before Redis 7) is left out; one read with no fields keeps
    empty fields.
    """
    claimed = cast(
        list[tuple[bytes | None, dict[bytes, bytes] | None]],
        client.xautoclaim(key, group, consumer, min_idle_ms, start, count=count)[1],
    )
    return [(entry_id, fields or {}) for entry_id, fields in claimed if entry_id is not None]


def xpending_range(
    client: Client, key: str, group: str, start: str, count: int, idle: int | None = None
) -> list[PendingRow]:
    """``XPENDING key group [IDLE ms] start + count``: the pending entries, oldest first."""
    return cast(list[PendingRow], client.xpending_range(key, group, start, "+", count, idle=idle))


def hget(client: Client, key: str, field: str) -> bytes | None:
    """``HGET key field``."""
    return cast(bytes | None, client.hget(key, field))


def hgetall(client: Client, key: str) -> dict[bytes, bytes]:
    """``HGETALL key`` (empty when the key does not exist)."""
    return cast(dict[bytes, bytes], client.hgetall(key))


def lrange(client: Client, key: str, start: int = 0, end: int = -1) -> list[bytes]:
    """``LRANGE key start end``."""
    return cast(list[bytes], client.lrange(key, start, end))


def xclaim(
    client: Client, key: str, group: str, consumer: str, min_idle_ms: int, ids: Iterable[str]
) -> list[Record]:
    """``XCLAIM``: the entries claimed; those deleted while pending (nil before Redis 7) are left out."""
    claim: list[StreamIdT] = list(ids)
    reply = cast(
        list[tuple[bytes | None, dict[bytes, bytes] | None] | None],
        client.xclaim(key, group, consumer, min_idle_ms, claim),
    )
    return [(e[0], e[1]) for e in reply if e and e[0] is not None and e[1] is not None]

"""Reader heartbeats per camera, and the cameras a discovering worker may follow.

A reader marks each of its cameras alive every :data:`HEARTBEAT_INTERVAL_S` with
``ZADD {prefix}:cameras:alive <unix seconds> CAM`` (:func:`beat`). A worker started without
``--cameras`` or a config follows a camera only when it is registered in ``{prefix}:cameras`` and
its heartbeat is younger than :data:`ALIVE_TTL_S` (:func:`live_cameras`), so names written into
the registry by anyone else cost nothing. Both sides use their own clock: keep the hosts' clocks
within a few seconds of each other (NTP).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dfm_stream import keys

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 10.0
"""How often a reader marks its cameras alive."""

ALIVE_TTL_S = 60.0
"""A camera whose heartbeat is older than this has no live reader."""

FORGET_AFTER_S = 86_400.0
"""Heartbeats older than this are removed from the sorted set (a reader of that camera is long gone)."""

DEFAULT_MAX_CAMERAS = 256
"""Most cameras a worker follows by discovery (``--max-cameras``); given cameras are not limited."""

SCAN_LIMIT = 4096
"""Most live heartbeats one discovery looks at (bounds its cost whatever was written into the set)."""


def beat(
    client: Any, cameras: list[str], prefix: str = keys.DEFAULT_PREFIX, now: float | None = None
) -> None:
    """Mark ``cameras`` alive now (one ``ZADD``) and drop heartbeats older than a day."""
    if not cameras:
        return
    now = time.time() if now is None else now
    key = keys.cameras_alive_key(prefix)
    pipe = client.pipeline(transaction=False)
    pipe.zadd(key, dict.fromkeys(cameras, now))
    pipe.zremrangebyscore(key, "-inf", now - FORGET_AFTER_S)
    pipe.execute()


def live_cameras(client: Any, prefix: str = keys.DEFAULT_PREFIX, ttl_s: float = ALIVE_TTL_S) -> list[str]:
    """Return the registered cameras with a live heartbeat, sorted (ids not validated here)."""
    now = time.time()
    key = keys.cameras_alive_key(prefix)
    raw = client.zrangebyscore(key, now - ttl_s, now + ttl_s, start=0, num=SCAN_LIMIT)
    names = [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in raw]
    if not names:
        return []
    registered = client.hmget(keys.cameras_key(prefix), names)
    return sorted(n for n, r in zip(names, registered, strict=True) if r is not None)


class Refusals:
    """Logs each camera id a worker refuses to follow, once (bounded memory)."""

    def __init__(self, cap: int = 100_000) -> None:
        self.cap = cap
        self._said: set[str] = set()

    def say(self, cameras: list[str], why: str) -> None:
        """Log the ids of ``cameras`` not said before, with ``why``."""
        fresh = [c for c in cameras if c not in self._said]
        if not fresh:
            return
        if len(self._said) > self.cap:  # names keep changing: forget, at worst say some again
            self._said.clear()
        self._said.update(fresh)
        more = f" and {len(fresh) - 20} more" if len(fresh) > 20 else ""
        log.warning("not following camera(s) %s%s: %s", ", ".join(repr(c) for c in fresh[:20]), more, why)

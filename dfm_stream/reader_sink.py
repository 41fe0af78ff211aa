"""The Redis side of a reader: frame XADDs, health events, camera registration and heartbeats, with backoff.

One :class:`RedisSink` is shared by all cameras of a reader. While Redis is unreachable it does
not block the cameras: :meth:`RedisSink.add_frame` returns False at once (the caller drops and
counts the frame) until the next retry is due, and retries follow a capped exponential backoff
with jitter; each step is logged once, not each frame. Events and registrations that could not be
written are kept (bounded) and written when Redis answers again.

With ``durability="replicated"`` a frame counts as accepted only once ``WAIT 1`` confirmed that a
replica has it (XADD and WAIT go in one round trip, to the node that holds the stream:
:mod:`dfm_stream.replication`). A frame no replica confirmed within
:data:`~dfm_stream.connect.REPLICA_WAIT_MS` is reported as dropped with reason ``unreplicated``
(it is on the primary and may well be scored, but a failover now could lose it), and the sink
backs off as if Redis were down: until a replica confirms again, frames are dropped at once
(``redis_unavailable``) instead of each waiting for the timeout.
"""

import json
import logging
import threading
import time
from collections import deque
from typing import Any

import redis

from dfm_stream import liveness
from dfm_stream.backoff import READER_SINK, Backoff
from dfm_stream.connect import REPLICA_WAIT_MS, RedisClient
from dfm_stream.errors import NotReplicatedError
from dfm_stream.keys import DEFAULT_PREFIX, alarms_channel, alarms_key, cameras_key
from dfm_stream.replication import write_confirmed
from dfm_stream.wire import FIELD, EventMsg

log = logging.getLogger(__name__)

ALARMS_MAXLEN = 10_000
"""Approximate MAXLEN of ``{prefix}:alarms``."""
PENDING_EVENTS = 1_000
"""Events kept while Redis is down (the oldest are dropped beyond this)."""


class RedisSink:
    """Writes a reader's frames, events and registrations; see the module docstring."""

    def __init__(
        self,
        client: RedisClient,
        prefix: str = DEFAULT_PREFIX,
        backoff: Backoff | None = None,
        durability: str = "local",
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.replicated = durability == "replicated"
        self.backoff = backoff or READER_SINK.backoff()
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._dropped_while_down = 0
        self._events: deque[EventMsg] = deque(maxlen=PENDING_EVENTS)
        self._registrations: dict[str, str] = {}
        self._dirty: set[str] = set()
        self.last_error = ""
        """The last error of a frame write, for the reader's verdict at exit ("" when none failed)."""

    @property
    def available(self) -> bool:
        """Return False while the last write failed and no retry succeeded yet."""
        return self._down_since is None

    def _may_try(self) -> bool:
        with self._lock:
            if self._down_since is None:
                return True
            if time.monotonic() < self._retry_at:
                self._dropped_while_down += 1
                return False
            self._retry_at = time.monotonic() + 3600  # one thread probes; the others keep dropping
            return True

    def _failed(self, error: Exception) -> None:
        with self._lock:
            self.last_error = f"Redis: {error}"
            delay = self.backoff.next()
            self._retry_at = time.monotonic() + delay
            self._dropped_while_down += 1
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("Redis unreachable (%s): dropping frames, retrying in %.1f s", error, delay)
            else:
                log.warning(
                    "Redis still unreachable after %.0f s (%s); %d frames dropped so far; retrying in %.1f s",
                    time.monotonic() - self._down_since,
                    error,
                    self._dropped_while_down,
                    delay,
                )

    def _succeeded(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is None:
                return
            log.warning(
                "Redis reachable again after %.1f s; %d frames were dropped (reason redis_unavailable)",
                time.monotonic() - self._down_since,
                self._dropped_while_down,
            )
            self._down_since = None
            self._dropped_while_down = 0
            self.backoff.reset()
            self._dirty.update(self._registrations)
        self._flush()

    def add_frame(self, key: str, data: bytes, maxlen: int) -> bool:
        """XADD one frame message with ``MAXLEN ~ maxlen``; False (drop it) while Redis is down."""
        return self.write_frame(key, data, maxlen) is None

    def write_frame(self, key: str, data: bytes, maxlen: int) -> str | None:
        """XADD one frame; return None when it was accepted, else the reason it counts as dropped."""
        if not self._may_try():
            return "redis_unavailable"
        try:
            if self.replicated:
                _, confirmed = write_confirmed(
                    self.client,
                    key,
                    lambda pipe: pipe.xadd(key, {FIELD: data}, maxlen=maxlen, approximate=True),
                )
                if not confirmed:
                    self._failed(
                        NotReplicatedError(f"no replica confirmed the frame within {REPLICA_WAIT_MS} ms")
                    )
                    return "unreplicated"
            else:
                self.client.xadd(key, {FIELD: data}, maxlen=maxlen, approximate=True)
        except (redis.RedisError, OSError) as e:
            self._failed(e)
            return "redis_unavailable"
        self._succeeded()
        return None

    def emit(self, event: EventMsg) -> None:
        """Write a health event to ``{prefix}:alarms`` and publish it; keep it for later if Redis is down."""
        with self._lock:
            self._events.append(event)
        if self.available:
            self._flush()

    def register(self, camera: str, description: dict[str, Any]) -> None:
        """HSET the camera's description in ``{prefix}:cameras`` (again after an outage)."""
        with self._lock:
            self._registrations[camera] = json.dumps(description, sort_keys=True)
            self._dirty.add(camera)
        if self.available:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            events = list(self._events)
            self._events.clear()
            regs = {c: self._registrations[c] for c in self._dirty}
            self._dirty.clear()
        try:
            if regs:
                # a fresh dict typed by redis-py's parameter: dict[str, str] is not a Mapping[KeyT, ...]
                self.client.hset(cameras_key(self.prefix), mapping={c: desc for c, desc in regs.items()})
                liveness.beat(self.client, list(regs), self.prefix)
            while events:
                data = events[0].to_bytes()
                self.client.xadd(
                    alarms_key(self.prefix), {FIELD: data}, maxlen=ALARMS_MAXLEN, approximate=True
                )
                self.client.publish(alarms_channel(self.prefix), data)
                events.pop(0)
        except (redis.RedisError, OSError) as e:
            log.warning("Redis: could not write %d event(s) / registrations (%s); will retry", len(events), e)
            with self._lock:
                self._events.extendleft(reversed(events))
                self._dirty.update(regs)
            if self.available:
                self._failed(e)

    def beat(self) -> None:
        """Mark every registered camera alive (:func:`~dfm_stream.liveness.beat`); not while Redis is down."""
        with self._lock:
            cameras = list(self._registrations)
        if not cameras or not self.available:
            return
        try:
            liveness.beat(self.client, cameras, self.prefix)
        except (redis.RedisError, OSError) as e:
            log.debug("Redis: could not write the camera heartbeats (%s); will retry", e)

    def ping(self) -> bool:
        """Return True when Redis answers PING now."""
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False

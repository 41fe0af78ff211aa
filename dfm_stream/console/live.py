"""Live state of the line, read by one poller thread per console and pushed to browsers over SSE.

However many pages are open, a console reads Redis from one thread: every
:data:`SNAPSHOT_PERIOD_S` the state of every camera (a few small reads per camera: the scores
added since the last snapshot, the newest frame's id, the alarm flag), and every
:data:`EVENTS_PERIOD_S` the new entries of ``{prefix}:alarms``. Each browser's
``/events`` stream only compares in-memory versions, so its cost to Redis is nil. The latest frame
JPEG of each camera is cached for :data:`FRAME_CACHE_S`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import redis

from dfm_stream import keys, replies
from dfm_stream.console import queries
from dfm_stream.console.store import reviews
from dfm_stream.errors import WireError
from dfm_stream.wire import FIELD, REVIEW_TYPES, EventMsg, ScoreMsg

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from dfm_stream.connect import RedisClient

log = logging.getLogger(__name__)

SNAPSHOT_PERIOD_S = 1.0
EVENTS_PERIOD_S = 0.25
SCAN_PERIOD_S = 5.0
FRAME_CACHE_S = 0.4
"""Pages fetch a tile's frame every 0.5 s (``FRAME_PERIOD_MS`` of console.js): within one
period, every page of a console gets the frame one Redis read fetched."""
KEEP_EVENTS = 500
SSE_TICK_S = 0.25
SSE_KEEPALIVE_S = 15.0


class Live:
    """The poller: a snapshot of every camera and a ring of recent events, versioned for SSE."""

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.snapshot: dict[str, Any] = {"cameras": [], "error": None}
        self.snapshot_version = 0
        self.events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=KEEP_EVENTS)
        self.event_seq = 0
        self._last_event_id = "$"
        self._streamed: set[str] = set()
        self._next_scan = 0.0
        self._frames: dict[str, tuple[float, bytes | None]] = {}
        self._scores: dict[str, deque[tuple[str, ScoreMsg]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.closing = threading.Event()
        """Set when the server is shutting down: event streams end so connections close at once."""
        self._thread = threading.Thread(target=self._run, name="console-live", daemon=True)

    def start(self) -> None:
        """Start the poller thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the poller thread and wait for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        next_snapshot = 0.0
        while not self._stop.is_set():
            try:
                self._poll_events()
                if time.monotonic() >= next_snapshot:
                    self._take_snapshot()
                    next_snapshot = time.monotonic() + SNAPSHOT_PERIOD_S
            except (redis.RedisError, OSError) as e:
                log.warning("console: cannot read Redis: %s", e)
                self._publish_snapshot({"cameras": self.snapshot["cameras"], "error": str(e)})
                self._stop.wait(2.0)
            self._stop.wait(EVENTS_PERIOD_S)

    def _take_snapshot(self) -> None:
        described = queries.registered_cameras(self.client, self.prefix)
        if time.monotonic() >= self._next_scan:
            self._streamed = queries.streamed_cameras(self.client, self.prefix)
            self._next_scan = time.monotonic() + SCAN_PERIOD_S
        names = sorted(set(described) | self._streamed)
        assigned = {c: str(r) for c, r in _assignments(self.client, self.prefix).items()}
        cams = []
        self._scores = {cam: self._scores.get(cam, deque(maxlen=queries.STATS_SCORES)) for cam in names}
        for cam in names:
            kept = self._scores[cam]  # only the scores added since the last snapshot are read
            kept.extend(queries.scores_since(self.client, self.prefix, cam, kept[-1][0] if kept else ""))
            state = queries.camera_state(self.client, self.prefix, cam, described.get(cam, {}), list(kept))
            state["assigned"] = assigned.get(cam, "")
            cams.append(state)
        self._publish_snapshot({"cameras": cams, "error": None})

    def _publish_snapshot(self, snapshot: dict[str, Any]) -> None:
        with self._lock:
            if snapshot != self.snapshot:
                self.snapshot = snapshot
                self.snapshot_version += 1

    def _poll_events(self) -> None:
        key = keys.alarms_key(self.prefix)
        if self._last_event_id == "$":
            newest = replies.xrevrange(self.client, key, count=1)
            self._last_event_id = queries.text(newest[0][0]) if newest else "0-0"
        for entry_id, fields in replies.xread_one(self.client, key, self._last_event_id, count=200):
            self._last_event_id = queries.text(entry_id)
            try:
                event = EventMsg.from_bytes(fields[FIELD.encode()])
            except (KeyError, WireError):
                continue
            data = queries.event_json(self._last_event_id, event)
            if event.type in REVIEW_TYPES and event.frame_id:
                data["review"] = reviews(self.client, self.prefix, [event.frame_id]).get(event.frame_id)
            with self._lock:
                self.event_seq += 1
                self.events.append((self.event_seq, data))

    def frame(self, camera: str) -> bytes | None:
        """Return the latest frame JPEG of ``camera`` (cached briefly, so many viewers cost one read)."""
        now = time.monotonic()
        cached = self._frames.get(camera)
        if cached and now - cached[0] < FRAME_CACHE_S:
            return cached[1]
        jpeg = queries.latest_frame_jpeg(self.client, self.prefix, camera)
        self._frames[camera] = (now, jpeg)
        return jpeg

    def events_after(self, seq: int) -> list[tuple[int, dict[str, Any]]]:
        """Return the buffered events newer than ``seq``."""
        with self._lock:
            return [(s, e) for s, e in self.events if s > seq]

    async def stream(self, disconnected: Callable[[], Any]) -> AsyncIterator[str]:
        """Yield Server-Sent Events: ``snapshot`` when the line changes, ``alarm`` for each new event."""
        sent_version = -1
        with self._lock:
            seen = self.event_seq
        last_write = time.monotonic()
        yield "retry: 2000\n\n"
        while not self.closing.is_set() and not await disconnected():
            chunks = []
            if self.snapshot_version != sent_version:
                sent_version = self.snapshot_version
                chunks.append(_sse("snapshot", self.snapshot))
            for seq, event in self.events_after(seen):
                seen = seq
                chunks.append(_sse("alarm", event))
            if not chunks and time.monotonic() - last_write > SSE_KEEPALIVE_S:
                chunks.append(": keep-alive\n\n")
            if chunks:
                last_write = time.monotonic()
                yield "".join(chunks)
            await asyncio.sleep(SSE_TICK_S)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _assignments(client: RedisClient, prefix: str) -> dict[str, str]:
    return {queries.text(c): queries.text(r) for c, r in client.hgetall(keys.assignments_key(prefix)).items()}

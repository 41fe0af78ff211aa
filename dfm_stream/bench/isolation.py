"""Bench stage ``isolation``: how much the honest cameras notice a hostile one beside them.

The latency stage's paced traffic at one load runs twice on fresh keys with the same worker
command (it follows one extra camera, ``hostile``): once alone, once while a thread writes hostile
entries into ``hostile`` (a valid frame padded with a 14-million-element array, bytes that are not
msgpack, an entry without ``msg``; a few per second, the stream capped at a few entries so Redis
memory stays bounded) and a probe client PINGs Redis every 10 ms. Reported per run: the honest
cameras' throughput (frames scored per second of the paced window) and latency percentiles, the
errors (``BUSY`` included) the probe saw, and the ratios hostile / clean.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
import time
from typing import Any

import msgpack
import redis

from dfm_stream import keys
from dfm_stream.bench.env import percentile
from dfm_stream.bench.stream_stages import (
    StreamSetup,
    WorkerGroup,
    _paced_send,
    delete_prefix,
    push_backlog,
    read_scores,
    wait_for_scores,
)
from dfm_stream.wire import FIELD, ScoreStatus

HOSTILE = "hostile"
HOSTILE_PER_S = 3.0
PAD_ITEMS = 14_000_000


def padded_entry(template: bytes) -> bytes:
    """``template`` (a msgpack map of at most 14 keys) with a first key holding 14 million zeros."""
    body = msgpack.unpackb(template, raw=False)
    rest = msgpack.packb(body, use_bin_type=True)
    pad = b"\xdd" + struct.pack(">I", PAD_ITEMS) + b"\x00" * PAD_ITEMS
    return bytes([0x80 + len(body) + 1]) + msgpack.packb("pad") + pad + rest[1:]


class Hostile(threading.Thread):
    """Writes hostile entries into the ``hostile`` camera and probes Redis until stopped."""

    def __init__(self, url: str, prefix: str, template: bytes) -> None:
        super().__init__(daemon=True, name="bench-hostile")
        self.writer = redis.Redis.from_url(url)
        self.probe = redis.Redis.from_url(url)
        self.key = keys.frames_key(HOSTILE, prefix)
        self.entries = [{FIELD: padded_entry(template)}, {FIELD: b"\xc1 not msgpack"}, {"other": b"x"}]
        self.sent = 0
        self.probes = 0
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        """Write a hostile entry every 1/HOSTILE_PER_S s and PING between them, until :meth:`stop`."""
        next_write = time.monotonic()
        while not self.halt.is_set():
            if time.monotonic() >= next_write:
                entry = self.entries[self.sent % len(self.entries)]
                self.writer.xadd(self.key, entry, maxlen=6, approximate=False)  # type: ignore[arg-type]
                self.sent += 1
                next_write += 1 / HOSTILE_PER_S
            try:
                self.probe.ping()
                self.probes += 1
            except redis.RedisError as e:
                self.errors.append(str(e))
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the thread and close its connections."""
        self.halt.set()
        self.join(30)
        self.writer.close()
        self.probe.close()


def _one_run(setup: StreamSetup, tag: str, rate: float, duration: float, hostile: bool) -> dict[str, Any]:
    prefix = setup.prefix(tag, 0)
    worker_setup = dataclasses.replace(setup, cameras=[*setup.cameras, HOSTILE])
    session = f"{tag}-paced"
    attacker = None
    try:
        with WorkerGroup(worker_setup, prefix, tag) as group:
            warm = 2 * setup.batch_size * setup.workers
            push_backlog(setup, prefix, warm, session="warmup")
            expected = wait_for_scores(setup, prefix, warm, 120 + 5 * warm / max(rate, 0.1), group)
            if hostile:
                attacker = Hostile(setup.url, prefix, setup.templates[setup.cameras[0]][0].to_bytes())
                attacker.start()
            sent = _paced_send(setup, prefix, rate, duration, session=session)
            wait_for_scores(setup, prefix, expected + sent, 60 + 5 * sent / max(rate, 0.1), group)
            if attacker:
                attacker.stop()
        scores = [s for s in read_scores(setup.client, prefix, setup.cameras) if s.session == session]
    finally:
        if attacker and attacker.is_alive():
            attacker.stop()
        delete_prefix(setup.client, prefix)
    times = sorted(s.scored_ts for s in scores)
    span = (times[-1] - times[0]) / 1e9 if len(times) > 1 else 0.0
    lat = [s.latency_ms for s in scores if s.status == ScoreStatus.SCORED]
    return {
        "frames": len(scores),
        "throughput_fps": (len(times) - 1) / span if span > 0 else None,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "hostile_entries": attacker.sent if attacker else 0,
        "probes": attacker.probes if attacker else 0,
        "probe_errors": len(attacker.errors) if attacker else 0,
        "probe_error_examples": attacker.errors[:3] if attacker else [],
    }


def isolation_run(
    setup: StreamSetup, rep: int, capacity: float, load: float, duration: float
) -> dict[str, Any]:
    """Paced honest traffic at ``load`` x ``capacity`` without, then with, a hostile camera beside it."""
    rate = load * capacity
    clean = _one_run(setup, f"isolation{rep}-clean", rate, duration, hostile=False)
    dirty = _one_run(setup, f"isolation{rep}-hostile", rate, duration, hostile=True)

    def ratio(field: str) -> float | None:
        a, b = dirty[field], clean[field]
        return a / b if a is not None and b else None

    return {
        "load": load,
        "offered_fps": rate,
        "clean": clean,
        "hostile": dirty,
        "throughput_ratio": ratio("throughput_fps"),
        "p99_ratio": ratio("p99_ms"),
    }

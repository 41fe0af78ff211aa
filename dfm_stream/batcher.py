"""Dynamic batching, per model: up to ``batch_size`` frames, or ``max_wait`` after a batch's first frame.

A batch is also closed by bytes: with ``max_bytes``, it takes no frame that would bring the bytes
its frames will hold once decoded above ``max_bytes`` (a single larger frame makes a batch of its
own), so a batch of huge frames costs about ``max_bytes``, not ``batch_size`` times a frame.

Frames of cameras that use different models go into different batches; a batch is bound to the
model (one complete version) that was resolved when its first frame arrived, so a model switch
only ever happens at a batch boundary. Pure logic (no Redis, no threads): the worker feeds it and
asks which batches are ready, which keeps it easy to test.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_WAIT_MS = 20.0
DEFAULT_MAX_BATCH_BYTES = 256 * 2**20
"""Decoded bytes one batch may hold (8 frames of 4K RGB fit; one frame at the 8192 x 8192 pixel cap alone)."""


@dataclass
class Batch(Generic[T]):
    """Items collected for one model; ``started`` is when the first item arrived (monotonic s)."""

    key: Hashable
    items: list[T] = field(default_factory=list)
    started: float = 0.0
    sizes: list[int] = field(default_factory=list)
    """Bytes of each item (parallel to ``items``)."""


class Batcher(Generic[T]):
    """Collects items per key (the model) and hands out full or expired batches."""

    def __init__(
        self,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        max_bytes: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max wait must be >= 0 ms, got {max_wait_ms}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max batch bytes must be >= 1, got {max_bytes}")
        self.batch_size = int(batch_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.max_bytes = float("inf") if max_bytes is None else int(max_bytes)
        self._open: dict[Hashable, Batch[T]] = {}

    def __len__(self) -> int:
        return sum(len(b.items) for b in self._open.values())

    def add(self, key: Hashable, item: T, now: float | None = None, nbytes: int = 0) -> None:
        """Add ``item`` (``nbytes`` once decoded) to the open batch of ``key`` (opened if needed)."""
        batch = self._open.get(key)
        if batch is None:
            batch = Batch(key, [], time.monotonic() if now is None else now)
            self._open[key] = batch
        batch.items.append(item)
        batch.sizes.append(int(nbytes))

    def room(self) -> int:
        """Return how many items the fullest open batch can still take (``batch_size`` when none)."""
        if not self._open:
            return self.batch_size
        return max(1, self.batch_size - max(len(b.items) for b in self._open.values()))

    def deadline(self) -> float | None:
        """Return the monotonic time at which the oldest open batch expires (None when empty)."""
        if not self._open:
            return None
        return min(b.started for b in self._open.values()) + self.max_wait_s

    def ready(self, now: float | None = None, flush: bool = False) -> list[Batch[T]]:
        """Remove and return the batches that are full, expired, or (``flush``) all of them.

        A batch never holds more than ``batch_size`` items, nor more than ``max_bytes`` unless it
        is a single item: a key with more items yields several.
        """
        now = time.monotonic() if now is None else now
        out: list[Batch[T]] = []
        for key in list(self._open):
            batch = self._open[key]
            while n := self._full(batch.sizes):
                out.append(Batch(key, batch.items[:n], batch.started, batch.sizes[:n]))
                batch.items, batch.sizes = batch.items[n:], batch.sizes[n:]
            if batch.items and (flush or now >= batch.started + self.max_wait_s):
                out.append(batch)
                del self._open[key]
            elif not batch.items:
                del self._open[key]
        return out

    def _full(self, sizes: list[int]) -> int:
        """Return how many leading items make a full batch (0: none yet)."""
        total = 0
        for n, size in enumerate(sizes):
            if n == self.batch_size or (n and total + size > self.max_bytes):
                return n
            total += size
        return len(sizes) if len(sizes) >= self.batch_size or total >= self.max_bytes else 0

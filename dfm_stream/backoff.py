"""The one retry delay of the project: capped exponential backoff with jitter, interrupted by a stop event.

Every retry loop waits through a :class:`Backoff` on an :class:`threading.Event`, so a stop request
ends the wait at once. The caps of the loops are kept here, in one place:

========================  =========  =======  ===========================================
loop                      initial s  cap s    why this cap
========================  =========  =======  ===========================================
worker fetch (Redis)      0.1        5        a worker catches up soon after Redis returns
worker publish            0.1        5        frames stay pending meanwhile; same as fetch
alarm event delivery      0.1        2        retried for ``EVENT_RETRY_S`` (15 s) inside a
                                              publish; then the outbox keeps the event
model-change subscription 0.5        10       polling covers the gap; quiet when down
reader Redis sink         0.2        5        (or the camera's own, if smaller)
camera reconnect          config     config   ``backoff_initial`` / ``backoff_max``
========================  =========  =======  ===========================================
"""

import random
import threading
from dataclasses import dataclass

__all__ = [
    "EVENT_SEND",
    "MODEL_WATCH",
    "PUBLISH",
    "READER_SINK",
    "WORKER_FETCH",
    "Backoff",
    "BackoffCap",
]


@dataclass(frozen=True)
class BackoffCap:
    """The first delay and the longest delay of one retry loop, in seconds."""

    initial: float
    maximum: float

    def backoff(self, rng: random.Random | None = None) -> "Backoff":
        """Return a fresh :class:`Backoff` with these delays."""
        return Backoff(self.initial, self.maximum, rng)


WORKER_FETCH = BackoffCap(0.1, 5.0)
PUBLISH = BackoffCap(0.1, 5.0)
EVENT_SEND = BackoffCap(0.1, 2.0)
MODEL_WATCH = BackoffCap(0.5, 10.0)
READER_SINK = BackoffCap(0.2, 5.0)


class Backoff:
    """Capped exponential backoff with equal jitter: attempt n waits within [d/2, d], d = initial*2^n."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = max(initial, maximum)
        self.attempts = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """Return the next delay in seconds and count the attempt."""
        delay = min(self.maximum, self.initial * 2 ** min(self.attempts, 30))
        self.attempts += 1
        return delay / 2 + self._rng.uniform(0, delay / 2)

    def wait(self, stop: threading.Event, delay: float | None = None) -> bool:
        """Wait ``delay`` s (default: :meth:`next`), less if ``stop`` is set; return True when stopped."""
        return stop.wait(self.next() if delay is None else delay)

    def reset(self) -> None:
        """Start again from the initial delay (after a success)."""
        self.attempts = 0

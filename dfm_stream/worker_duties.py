"""The worker's periodic duties, run by its fetch thread between two reads.

Each duty runs when it is due (:meth:`Duties.every`): discovering cameras, following model
assignments, the consumer heartbeat, delivering alarm events left in the outbox, reclaiming frames
idle at other consumers, flushing the drift figures, and the group and device metrics. A duty that
raises is retried on the next round (the fetch loop's backoff handles the error); only one that
completed waits its interval again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dfm_stream.worker import Worker

log = logging.getLogger(__name__)


class Duties:
    """The periodic duties of one :class:`~dfm_stream.worker.Worker`."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._due: dict[str, float] = {}

    def every(self, name: str, interval: float, action: Callable[[], object]) -> None:
        """Run ``action`` when ``name`` is due; only a run that did not raise waits ``interval`` again."""
        now = time.monotonic()
        if now < self._due.get(name, 0.0):
            return
        action()
        self._due[name] = now + interval

    def now(self, name: str) -> None:
        """Make the duty ``name`` due at once (after a reconnect: look for cameras now)."""
        self._due.pop(name, None)

    def run(self) -> None:
        """Run every duty that is due."""
        w = self.worker
        s = w.settings
        self.every("discover", s.discover_interval_s, self.discover)
        if w.router.refresh(w.consumer.cameras):
            log.info("model routing changed")
        self.every("heartbeat", s.heartbeat_interval_s, w.consumer.heartbeat)
        self.every("outbox", s.outbox_interval_s, self.deliver_stale_events)
        self._due.setdefault("reclaim", time.monotonic() + max(0.05, s.claim_idle_s / 2))
        self.every("reclaim", max(0.05, s.claim_idle_s / 2), self.reclaim)
        self.every("drift", s.stats_interval_s, w.drift.flush)
        if w.metrics:
            self.every("stats", s.stats_interval_s, self.group_stats)
            self.every("device", s.stats_interval_s, self.report_device)

    def deliver_stale_events(self) -> None:
        """Deliver alarm events a publish left in the outbox (a worker that died before delivering)."""
        w = self.worker
        w.stats.events_recovered += w.publisher.deliver_stale_events(
            list(w.consumer.cameras), w.settings.outbox_deliver_after_s
        )

    def report_device(self) -> None:
        """Publish where the model runs; ``auto`` may have fallen back to another backend since."""
        w = self.worker
        if w.metrics:
            e = w.engine
            w.metrics.device_info.clear()
            w.metrics.device_info.labels(str(e.device), e.precision, e.backend).set(1)

    def group_stats(self) -> None:
        """Export each camera's consumer-group lag and pending count."""
        w = self.worker
        if w.metrics is None:
            return
        for camera, (lag, pending) in w.consumer.group_stats().items():
            w.metrics.stream_lag.labels(camera).set(lag)
            w.metrics.stream_pending.labels(camera).set(pending)

    def discover(self) -> None:
        """Follow the cameras given, or those readers registered (bounded by ``max_cameras``)."""
        w = self.worker
        added = w.consumer.discover(w.settings.cameras, w.settings.max_cameras)
        if w.metrics is not None:
            for camera in added:
                w.metrics.init_camera(camera)
        if added:
            log.info("worker %s reads cameras %s", w.name, ", ".join(added))

    def reclaim(self) -> None:
        """Claim frames idle at other consumers (dead or stuck) and take them like newly read ones."""
        w = self.worker
        exclude = w.inflight_ids()
        # only cameras with a model: claiming raises the delivery count, and their frames must wait
        scored = [c for c in w.consumer.cameras if w.router.resolve(c) is not None]
        result = w.consumer.reclaim(int(w.settings.claim_idle_s * 1000), exclude=exclude, cameras=scored)
        for camera, ids in result.deleted.items():  # never one in flight here: the publish acks those
            w.drop(camera, "trimmed", len(ids))
        if result.entries:
            log.info("reclaimed %d idle frames from other consumers", len(result.entries))
            w.stats.redelivered += len(result.entries)
            if w.metrics:
                for e in result.entries:
                    w.metrics.redelivered.labels(e.camera).inc()
            w.take(result.entries, claimed=True)

"""The worker loop: frames from Redis -> batches -> model -> scores, acks and alarms back to Redis.

Three threads keep the model busy:

* **fetch** (:meth:`Worker._fetch_loop`): reads the frame streams (:mod:`dfm_stream.consumer`),
  reclaims idle entries, skips stale frames, dead-letters bad ones, batches per model
  (:mod:`dfm_stream.batcher`), decodes and pre-processes each batch, and queues it (depth 2, so
  the next batch is ready while the model runs the current one);
* **model** (the thread that calls :meth:`Worker.run`): scores queued batches;
* **publisher** (:class:`dfm_stream.publisher.PublisherThread`): publishes + acks atomically and
  emits alarm events, so waiting on Redis never stalls the model.

Stopping (``stop`` event, SIGTERM): reading stops, every frame already read is scored, published
and acked, then :meth:`Worker.run` returns. ``burst`` mode stops by itself once every stream is
drained and nothing is pending in the group; ``max_frames`` stops after that many frames were read.
Redis errors: capped exponential backoff, then resume; nothing is acked that was not published.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import redis
import torch

from dfm_stream import keys
from dfm_stream.artifact import normalize_score
from dfm_stream.backoff import WORKER_FETCH, Backoff
from dfm_stream.batcher import Batch, Batcher
from dfm_stream.connect import RedisClient
from dfm_stream.consumer import StreamConsumer, StreamEntry
from dfm_stream.deadletter import send_to_deadletter
from dfm_stream.drift_watch import DriftWatch
from dfm_stream.errors import WireError
from dfm_stream.inference import DecodedFrame, DecodeFailure, Decoder, Engine, parse_entry
from dfm_stream.metrics import WorkerMetrics
from dfm_stream.model.dfm import ScoreType
from dfm_stream.publisher import (
    REDIS_ERRORS,
    AlarmBit,
    Publisher,
    PublisherThread,
    PublishResult,
    ScoredItem,
    frame_score,
)
from dfm_stream.routing import LoadedModel, ModelRouter
from dfm_stream.shadow import ShadowMetrics, ShadowScorer
from dfm_stream.wire import FrameMsg, ScoreStatus, frame_bytes_cap, make_frame_id
from dfm_stream.worker_duties import Duties
from dfm_stream.worker_settings import WorkerSettings, WorkerStats

__all__ = ["PreparedBatch", "Worker", "WorkerSettings", "WorkerStats"]

log = logging.getLogger(__name__)

IDLE_BLOCK_MS = 500
"""Longest single wait for new frames (bounds how long a stop request waits)."""


@dataclass
class PreparedBatch:
    """A decoded, pre-processed batch bound to one model version."""

    model: LoadedModel
    frames: list[DecodedFrame]
    tensor: torch.Tensor
    started: float


class Worker:
    """One worker process's pipeline; build it, then call :meth:`run` (optionally with a stop event)."""

    def __init__(
        self,
        client: RedisClient,
        router: ModelRouter,
        settings: WorkerSettings | None = None,
        prefix: str = keys.DEFAULT_PREFIX,
        metrics: WorkerMetrics | None = None,
        cluster: bool = False,
        name: str | None = None,
        shadow_metrics: ShadowMetrics | None = None,
    ) -> None:
        self.client = client
        self.router = router
        self.engine: Engine = router.engine
        self.settings = settings or WorkerSettings()
        self.prefix = prefix
        self.metrics = metrics
        self.max_frame_bytes = self.settings.max_frame_bytes or frame_bytes_cap(self.settings.max_pixels)
        self.consumer = StreamConsumer(
            client, prefix, self.settings.group, name, cluster, max_frame_bytes=self.max_frame_bytes
        )
        self.name = self.consumer.name
        self.stats = WorkerStats()
        self.publisher = Publisher(
            client,
            prefix,
            self.settings.group,
            self.settings.scores_maxlen,
            self.settings.alarm,
            metrics,
            durability=self.settings.durability,
        )
        self.decoder = Decoder(self.engine.device, self.settings.max_pixels)
        self.drift = DriftWatch(client, prefix, self.name, metrics.drift if metrics else None)
        self.shadow = ShadowScorer.create(client, router, prefix, self.name, shadow_metrics)
        self.batcher: Batcher[tuple[StreamEntry, FrameMsg, LoadedModel]] = Batcher(
            self.settings.batch_size, self.settings.max_wait_ms, self.settings.max_batch_bytes
        )
        self._ready: queue.Queue[PreparedBatch | None] = queue.Queue(maxsize=2)
        self._inflight: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.duties = Duties(self)
        self._warned_uncalibrated: set[str] = set()
        self._redis_ok = False
        self.duties.report_device()

    # -- public --------------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> WorkerStats:
        """Run until ``stop`` is set (or burst/max_frames ends it); every frame read gets published."""
        self._stop = stop or threading.Event()
        self.router.start_watch()
        pub = PublisherThread(self.publisher, self._published, metrics=self.metrics)
        fetch = threading.Thread(target=self._fetch_main, name="fetch", daemon=True)
        fetch.start()
        try:
            while True:
                batch = self._ready.get()
                if batch is None:
                    break
                items = self._score_batch(batch)
                if items:
                    pub.submit(items)
        finally:
            self._stop.set()
            fetch.join(30)
            pub.close()
            self.shadow.publisher.close()
            self.router.close()
            self.decoder.close()
        log.info(
            "worker %s stopped: %d read, %d scored, %d skipped, %d dead-lettered, %d duplicates suppressed",
            self.name,
            self.stats.read,
            self.stats.scored,
            self.stats.skipped,
            self.stats.deadlettered,
            self.stats.duplicates,
        )
        return self.stats

    def ready(self) -> tuple[bool, str]:
        """Answer ``/readyz``: Redis reachable and a model built (at start, or for a camera)."""
        try:
            self.client.ping()
        except Exception as e:
            return False, f"Redis unreachable: {e}"
        return self.router.readiness()

    # -- model thread ------------------------------------------------------------------------------

    def _score_batch(self, batch: PreparedBatch) -> list[ScoredItem]:
        model = self.router.rebind(batch.model, {f.entry.camera for f in batch.frames})
        info = model.fitted.info
        t0 = time.perf_counter()
        try:
            features = self.engine.features(model.fitted.model, batch.tensor)
            result = self.engine.score_features(
                model.fitted.model, features, want_maps=info.score_type == ScoreType.FRE
            )
        except Exception:
            log.exception(
                "model %s failed on a batch of %d frames: left pending", model.label, len(batch.frames)
            )
            self._count_error("inference")
            self._forget([f.entry for f in batch.frames])
            return []
        if self.metrics:
            self.metrics.inference_seconds.labels(model.label).observe(time.perf_counter() - t0)
            self.metrics.batch_size.labels(model.label).observe(len(batch.frames))
            self.metrics.gpu_memory_bytes.set(self.engine.gpu_memory_bytes())
        if info.threshold is None and model.label not in self._warned_uncalibrated:
            self._warned_uncalibrated.add(model.label)
            log.warning("model %s has no threshold (not calibrated): no frame will be anomalous", model.label)
        self.stats.batches += 1
        self.drift.observe(
            [f.entry.camera for f in batch.frames], model.label, info, batch.tensor, result.scores
        )
        self.shadow.score(model, batch.frames, batch.tensor, features, result.scores)  # never raises
        items = []
        for i, frame in enumerate(batch.frames):
            score = float(result.scores[i])
            anomalous = info.threshold is not None and score > info.threshold
            template = frame_score(
                frame.entry,
                frame.msg,
                self.name,
                model.label,
                score,
                info.threshold,
                score_norm=normalize_score(score, info),
                anomalous=anomalous,
            )
            amap = result.maps[i] if anomalous and result.maps is not None else None
            items.append(
                ScoredItem(
                    template=template,
                    entry_id=frame.entry.entry_id,
                    alarm_bit=AlarmBit.of(anomalous),
                    frame=frame if anomalous else None,
                    anomaly_map=amap,
                )
            )
        return items

    # -- publisher thread --------------------------------------------------------------------------

    def _published(self, items: list[ScoredItem], result: PublishResult | None) -> None:
        if result is not None:
            duplicates = set(result.duplicates)
            self.stats.duplicates += len(duplicates)
            duplicates.update(result.unconfirmed)  # not acknowledged: counted only if scored again
            self.stats.scored += sum(
                1 for i in items if i.alarm_bit != AlarmBit.SKIPPED and i.template.frame_id not in duplicates
            )
            self.stats.events += [f"{e.type}:{e.camera}:{e.frame_id}" for e in result.events]
        self._forget_ids([i.template.frame_id for i in items])

    # -- fetch thread ------------------------------------------------------------------------------

    def _fetch_main(self) -> None:
        try:
            self._fetch_loop()
        except Exception:
            log.exception("the fetch loop died")
            self._count_error("fetch")
        finally:
            self._flush_batches()
            self._ready.put(None)

    def _fetch_loop(self) -> None:
        backoff = WORKER_FETCH.backoff()
        while not self._stop.is_set():
            try:
                if not self._redis_ok:
                    self._connected()
                self._fetch_once()
                backoff.reset()
            except REDIS_ERRORS as e:
                self._redis_ok = False
                delay = backoff.next()
                log.warning("Redis unavailable (%s); retrying in %.1f s", e, delay)
                backoff.wait(self._stop, delay)
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):  # the server lost its data (restart without persistence)
                    log.warning("consumer group missing (%s): creating it again", e)
                    self.consumer.ensure_groups()
                else:
                    self._loop_error("fetch", backoff)
            except Exception:
                self._loop_error("fetch", backoff)

    def _connected(self) -> None:
        """Ping Redis; once it answers, log it, make sure the groups exist and look for cameras now."""
        self.client.ping()
        self.consumer.ensure_groups()
        self.duties.now("discover")
        self._redis_ok = True
        log.info("worker %s connected to Redis", self.name)

    def _loop_error(self, where: str, backoff: Backoff) -> None:
        delay = backoff.next()
        log.exception("unexpected error in the %s loop; retrying in %.1f s", where, delay)
        self._count_error(where)
        backoff.wait(self._stop, delay)

    def _fetch_once(self) -> None:
        self.duties.run()
        cameras = [c for c in self.consumer.cameras if self.router.resolve(c) is not None]
        room = self.batcher.room()
        if self.settings.max_frames is not None:
            room = min(room, self.settings.max_frames - self.stats.read)
            if room <= 0:
                self._stop.set()
                return
        result = self.consumer.read(room, cameras)
        self.take(result.entries)
        for camera, gaps in result.trimmed.items():
            self.drop(camera, "trimmed", gaps)
        if self.metrics is not None:
            for camera, odd in result.seq_anomalies.items():
                self.metrics.seq_anomalies.labels(camera).inc(odd)
        self._dispatch(self.batcher.ready())
        if len(result.entries) >= room:
            return
        if self.settings.burst and not result.entries and not len(self.batcher) and self._drained(cameras):
            log.info("burst mode: every stream is drained and nothing is pending; stopping")
            self._stop.set()
            return
        deadline = self.batcher.deadline()
        wait_ms = IDLE_BLOCK_MS if deadline is None else (deadline - time.monotonic()) * 1000
        if wait_ms > 0:
            if cameras:
                self.consumer.wait(int(min(wait_ms, IDLE_BLOCK_MS)), cameras)
            else:
                self._stop.wait(min(wait_ms, IDLE_BLOCK_MS) / 1000)
        self._dispatch(self.batcher.ready())

    def _drained(self, cameras: list[str]) -> bool:
        with self._lock:
            if self._inflight:
                return False
        if not self._ready.empty():
            return False
        stats = self.consumer.group_stats()
        return all(stats.get(c, (0, 0))[1] == 0 for c in cameras)

    def take(self, entries: list[StreamEntry], claimed: bool = False) -> None:
        """Route new entries: dead letters, stale skips, or into the batcher.

        If a Redis error stops this half-way (a dead letter refused), the stale frames collected so
        far leave the in-flight set (reclaimed later); the rest are in the batcher or never entered
        the in-flight set.
        """
        skipped: list[ScoredItem] = []
        try:
            self._route(entries, claimed, skipped)
        except BaseException:
            self._forget_ids([i.template.frame_id for i in skipped])
            raise
        if skipped:
            self.stats.skipped += len(skipped)
            self._publish_direct(skipped)

    def _route(self, entries: list[StreamEntry], claimed: bool, skipped: list[ScoredItem]) -> None:
        now_ns = time.time_ns()
        for entry in entries:
            self.stats.read += 1
            model = self.router.resolve(entry.camera)
            if model is None:  # its model went away: it waits, pending, until its camera has one
                continue
            if claimed and entry.deliveries > self.settings.max_deliveries:
                self._dead_letter(entry, "max_deliveries", f"delivered {entry.deliveries} times")
                continue
            if entry.refused is not None:  # cut by the read script: its payload never came over
                self._dead_letter(entry, entry.refused.reason, entry.refused.error)
                continue
            try:
                msg = parse_entry(entry, self.settings.max_pixels, self.max_frame_bytes)
            except WireError as e:
                self._dead_letter(entry, e.reason, str(e))
                continue
            frame_id = make_frame_id(entry.camera, entry.entry_id)
            with self._lock:
                self._inflight.add(frame_id)
            max_age = self.settings.max_age_s
            if max_age and now_ns - msg.ts > max_age * 1e9:
                skipped.append(self._skipped(entry, msg, model))
                continue
            self.batcher.add(model.label, (entry, msg, model), nbytes=msg.w * msg.h * 3)  # decoded RGB

    def _skipped(self, entry: StreamEntry, msg: FrameMsg, model: LoadedModel) -> ScoredItem:
        self.drop(entry.camera, "stale", 1)
        template = frame_score(
            entry, msg, self.name, model.label, None, model.fitted.info.threshold, status=ScoreStatus.SKIPPED
        )
        return ScoredItem(template=template, entry_id=entry.entry_id, alarm_bit=AlarmBit.SKIPPED)

    def _publish_direct(self, items: list[ScoredItem]) -> None:
        try:
            result = self.publisher.publish(items)
        except Exception:
            self._forget_ids([i.template.frame_id for i in items])  # left pending: reclaimed later
            raise
        self._published(items, result)

    def _dispatch(self, batches: list) -> None:
        """Prepare and queue batches taken from the batcher; on any error, release what is left.

        The batches are out of the batcher already, so a batch that fails (a Redis error while
        dead-lettering one of its frames, a failed pre-processing) and every batch after it leave
        the in-flight set: they stay pending and :meth:`_reclaim` takes them again, instead of
        waiting for a restart (reclaim skips frames in flight).
        """
        for n, batch in enumerate(batches):
            try:
                self._prepare(batch)
            except BaseException:
                self._forget([e for b in batches[n:] for e, _, _ in b.items])
                raise

    def _prepare(self, batch: Batch) -> None:
        model = batch.items[0][2]  # the version resolved when the batch's frames were read
        t0 = time.perf_counter()
        min_size = model.fitted.info.image_size if self.settings.decode_at_model_size else None
        decoded = self.decoder.decode([(e, m) for e, m, _ in batch.items], min_size)
        good = [d for d in decoded if isinstance(d, DecodedFrame)]
        for bad in (d for d in decoded if isinstance(d, DecodeFailure)):
            self._dead_letter(bad.entry, bad.reason, bad.error)
        if not good:
            return
        tensor = self.engine.to_tensor([g.image for g in good], model.fitted.info.image_size)
        if self.metrics:
            self.metrics.decode_seconds.observe(time.perf_counter() - t0)
            now_ms = time.time() * 1000
            for g in good:
                self.metrics.queue_wait_seconds.labels(g.entry.camera).observe(
                    max(0.0, now_ms - g.entry.entry_ms) / 1000
                )
        prepared = PreparedBatch(model=model, frames=good, tensor=tensor, started=time.monotonic())
        while True:  # a busy model: take registry switches while waiting for room in the queue
            try:
                return self._ready.put(prepared, timeout=0.05)
            except queue.Full:
                self.router.refresh(self.consumer.cameras)

    def _flush_batches(self) -> None:
        try:
            self._dispatch(self.batcher.ready(flush=True))
        except Exception:
            log.exception("could not prepare the last batches at shutdown: they stay pending (reclaimed)")
            self._count_error("fetch")

    def _dead_letter(self, entry: StreamEntry, reason: str, error: str) -> None:
        send_to_deadletter(self.client, entry, reason, error, self.settings.group, self.prefix, self.name)
        self.stats.deadlettered += 1
        self._forget([entry])
        if self.metrics:
            self.metrics.deadlettered.labels(entry.camera, reason).inc()

    def drop(self, camera: str, reason: str, n: int) -> None:
        """Count ``n`` frames of ``camera`` that will never be scored, and why (``trimmed``, ``stale``)."""
        if reason == "trimmed":
            self.stats.trimmed += n
        if self.metrics and n:
            self.metrics.frames_dropped.labels(camera, reason).inc(n)

    def _forget(self, entries: list[StreamEntry]) -> None:
        self._forget_ids([make_frame_id(e.camera, e.entry_id) for e in entries])

    def inflight_ids(self) -> set[str]:
        """Return the ids of the frames read and not yet published (never reclaimed meanwhile)."""
        with self._lock:
            return set(self._inflight)

    def _forget_ids(self, frame_ids: list[str]) -> None:
        with self._lock:
            self._inflight.difference_update(frame_ids)

    def _count_error(self, where: str) -> None:
        if self.metrics:
            self.metrics.loop_errors.labels(where).inc()

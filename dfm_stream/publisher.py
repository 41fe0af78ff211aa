"""Publish scores and acknowledge frames atomically, step the alarms, emit events — off the model's thread.

:data:`PUBLISH_SCRIPT` runs once per camera per batch (its keys — frames, scores, alarm state —
share the camera's ``{camera}`` hash tag, so it is cluster safe). For each frame it does
``XACK frames group id`` and **only if that returned 1** ``XADD scores MAXLEN ~ N * msg <score>``
and steps the camera's alarm state machine (:mod:`dfm_stream.alarms`). Guarantees:

* a frame is acknowledged only together with its score (one atomic script: a crash before it
  leaves the frame pending, to be reclaimed and scored again);
* at most one accepted score per frame id, even when a slow consumer wakes up after its frames
  were reclaimed and scored by another worker: its XACK returns 0, its score is not written, and
  the script reports the id as a suppressed duplicate (counted, logged at debug);
* re-running the script after a lost reply (connection dropped) is harmless for the same reason;
* the alarm state changes in the same atomic step as the score it is based on, and each alarm
  transition is written to the camera's event outbox (``{prefix}:{camera}:outbox``) in that step:
  the worker then delivers it to the alarm stream and channel and deletes it from the outbox. An
  event whose worker died (or gave up while Redis was away) before delivering it stays in the
  outbox, and any worker delivers it after :data:`OUTBOX_DELIVER_AFTER_S` (without the picture):
  alarm events are delivered at least once.

With ``durability="replicated"`` the script and a ``WAIT 1`` go in one round trip (to the node
that holds the camera's slot on a cluster: :mod:`dfm_stream.replication`), and the
worker acknowledges the frames (counts them scored, delivers their alarm events) only once a
replica confirmed the script's effects. A batch no replica confirmed in time is reported as
``unconfirmed``: its score and XACK are on the primary (and reach the replica later, or are lost
with the primary together with the XACK, leaving the frame pending or unread on the new primary,
where it is scored again), and its alarm events stay in the outbox, delivered by the stale-event
path only if they survive. Either way the new primary ends with exactly one score per frame.

The :class:`PublisherThread` owns a bounded queue, so waiting on Redis never stalls the model, and
retries with capped exponential backoff while Redis is unavailable.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import redis

from dfm_stream import keys, replies
from dfm_stream.alarms import ALARM_LUA, overlay_jpeg, publish_event
from dfm_stream.backoff import EVENT_SEND, PUBLISH
from dfm_stream.config import AlarmsConfig
from dfm_stream.connect import REPLICA_WAIT_MS, RedisClient
from dfm_stream.consumer import StreamEntry
from dfm_stream.errors import WireError
from dfm_stream.inference import DecodedFrame
from dfm_stream.keys import DEFAULT_SCORES_MAXLEN
from dfm_stream.metrics import WorkerMetrics
from dfm_stream.replication import write_confirmed
from dfm_stream.replies import text as _s
from dfm_stream.wire import EventMsg, EventType, FrameMsg, ScoreMsg, ScoreStatus, make_frame_id

log = logging.getLogger(__name__)

OUTBOX_MAXLEN = 1_000
"""Approximate cap of a camera's undelivered alarm events (only reached with no worker alive)."""
OUTBOX_DELIVER_AFTER_S = 20.0
"""Age after which any worker delivers an outbox event: longer than a live worker's retries."""
EVENT_RETRY_S = 15.0
"""How long a worker retries an alarm event itself before leaving it to the outbox (< the age above)."""
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.ReadOnlyError)

PUBLISH_SCRIPT = (
    f"local transitions = {{}}\nlocal outbox_maxlen = {OUTBOX_MAXLEN}\n"
    + ALARM_LUA
    + """
local published = {}
local msgs = {}
local maxlen = tonumber(ARGV[2])
local function newer(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b or '', '^(%d+)-(%d+)$')
  if not bms then return true end
  if tonumber(ams) ~= tonumber(bms) then return tonumber(ams) > tonumber(bms) end
  return tonumber(aseq) > tonumber(bseq)
end
local scored = redis.call('HGET', KEYS[5], 'scored')
local top = scored
for i = 7, #ARGV, 3 do
  local id, msg, bit = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'msg', msg)
    table.insert(published, id)
    msgs[id] = msg
    if bit ~= 's' then alarm_step(bit, id) end
    if newer(id, top) then top = id end
  end
end
if top ~= scored then redis.call('HSET', KEYS[5], 'scored', top) end
local active = alarm_save()
for _, t in ipairs(transitions) do
  t[4] = redis.call('XADD', KEYS[4], 'MAXLEN', '~', outbox_maxlen, '*',
    'type', t[1], 'entry', t[2], 'ms', t[3], 'msg', msgs[t[2]])
end
return {published, transitions, active}
"""
)
"""KEYS: frames, scores, alarm hash, event outbox, seq hash (``scored``: the highest scored entry id,
where a re-created consumer group starts). ARGV: group, maxlen, k, n, clear_after,
cooldown_ms, then (entry id, score msg bytes, '1' anomalous | '0' normal | 's' skipped) per frame.
Returns {published ids, {{type, id, ms, outbox id}...}, alarm active 0/1}."""


class AlarmBit(enum.StrEnum):
    """What one frame tells the alarm step of the publish script (the ARGV value is the string)."""

    ANOMALOUS = "1"
    NORMAL = "0"
    SKIPPED = "s"
    """Not scored (too old): no alarm step."""

    @classmethod
    def of(cls, anomalous: bool) -> AlarmBit:
        """Return ANOMALOUS or NORMAL."""
        return cls.ANOMALOUS if anomalous else cls.NORMAL


@dataclass
class ScoredItem:
    """One frame's result on its way to Redis (``template`` gets ``scored_ts``/``latency_ms`` at publish)."""

    template: ScoreMsg
    entry_id: str
    alarm_bit: AlarmBit
    frame: DecodedFrame | None = None
    anomaly_map: np.ndarray | None = None

    @property
    def camera(self) -> str:
        """The camera of the frame."""
        return self.template.camera


def frame_score(
    entry: StreamEntry,
    msg: FrameMsg,
    worker: str,
    model: str,
    score: float | None,
    threshold: float | None,
    score_norm: float | None = None,
    anomalous: bool = False,
    status: ScoreStatus = ScoreStatus.SCORED,
) -> ScoreMsg:
    """Return the score message of frame ``msg`` read as ``entry``; the publish sets its times."""
    return ScoreMsg(
        camera=entry.camera,
        frame_id=make_frame_id(entry.camera, entry.entry_id),
        seq=msg.seq,
        ts=msg.ts,
        scored_ts=0,
        score=score,
        score_norm=score_norm,
        threshold=threshold,
        anomalous=anomalous,
        model=model,
        latency_ms=0.0,
        status=status,
        session=msg.session,
        worker=worker,
    )


@dataclass
class PublishResult:
    """What one publish did: the frame ids published, the duplicates suppressed, the events sent."""

    published: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    events: list[EventMsg] = field(default_factory=list)
    unconfirmed: list[str] = field(default_factory=list)
    """``durability="replicated"``: frame ids whose script no replica confirmed in time (not counted)."""


class Publisher:
    """Runs the publish script per camera and emits the alarm events it reports."""

    def __init__(
        self,
        client: RedisClient,
        prefix: str = keys.DEFAULT_PREFIX,
        group: str = keys.DEFAULT_GROUP,
        scores_maxlen: int = DEFAULT_SCORES_MAXLEN,
        alarm: AlarmsConfig | None = None,
        metrics: WorkerMetrics | None = None,
        durability: str = "local",
        abort: threading.Event | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.replicated = durability == "replicated"
        self.group = group
        self.scores_maxlen = int(scores_maxlen)
        self.alarm = alarm or AlarmsConfig()
        self.metrics = metrics
        self.abort = abort or threading.Event()
        """Set to stop retrying at once (shutdown gave up); undelivered events stay in the outbox."""
        self._script = client.register_script(PUBLISH_SCRIPT)

    def publish(self, items: list[ScoredItem]) -> PublishResult:
        """Publish + ack ``items`` (any cameras), camera by camera; raise Redis errors to the caller."""
        result = PublishResult()
        by_camera: dict[str, list[ScoredItem]] = {}
        for item in items:
            by_camera.setdefault(item.camera, []).append(item)
        for camera, group in by_camera.items():
            self._publish_camera(camera, group, result)
        return result

    def _publish_camera(self, camera: str, items: list[ScoredItem], result: PublishResult) -> None:
        now_ns = time.time_ns()
        args: list[replies.ScriptArg] = [self.group, self.scores_maxlen, *self.alarm.script_args()]
        final: dict[str, ScoreMsg] = {}
        for item in items:
            msg = dataclasses.replace(
                item.template, scored_ts=now_ns, latency_ms=max(0.0, (now_ns - item.template.ts) / 1e6)
            )
            final[item.entry_id] = msg
            args += [item.entry_id, msg.to_bytes(), item.alarm_bit]
        keys_ = [
            keys.frames_key(camera, self.prefix),
            keys.scores_key(camera, self.prefix),
            keys.alarm_state_key(camera, self.prefix),
            keys.event_outbox_key(camera, self.prefix),
            keys.seq_key(camera, self.prefix),
        ]
        (published_raw, transitions, active), confirmed = self._run_script(keys_, args)
        published = {_s(i) for i in published_raw}
        if not confirmed:
            self._unconfirmed(camera, items, published, result)
            return
        by_id = {item.entry_id: item for item in items}
        for item in items:
            frame_id = item.template.frame_id
            if item.entry_id in published:
                result.published.append(frame_id)
                self._count(final[item.entry_id])
            else:
                result.duplicates.append(frame_id)
                log.debug(
                    "frame %s was already acknowledged (reclaimed elsewhere): score not published", frame_id
                )
                if self.metrics:
                    self.metrics.duplicates.labels(camera).inc()
        for kind, entry_id, ms, outbox_id in transitions:
            event = self._event(EventType(_s(kind)), by_id[_s(entry_id)], final[_s(entry_id)], int(ms))
            if self._send_event(event):
                self._forget(camera, _s(outbox_id))
            result.events.append(event)
            log.info(
                "alarm %s on camera %s at frame %s (score %s)",
                event.type,
                camera,
                event.frame_id,
                event.score,
            )
            if self.metrics:
                self.metrics.alarms.labels(camera, event.type).inc()
        if self.metrics:
            self.metrics.alarm_active.labels(camera).set(int(active))

    def _run_script(self, keys_: list[str], args: Sequence[replies.ScriptArg]) -> tuple[list, bool]:
        """Run the publish script; with ``replicated``, WAIT for one replica in the same round trip."""
        if not self.replicated:
            return self._script(keys=keys_, args=args), True
        (reply,), confirmed = write_confirmed(
            self.client, keys_[0], lambda pipe: self._script(keys=keys_, args=args, client=pipe)
        )
        return reply, confirmed

    def _unconfirmed(
        self, camera: str, items: list[ScoredItem], published: set[str], result: PublishResult
    ) -> None:
        ids = [item.template.frame_id for item in items if item.entry_id in published]
        result.unconfirmed.extend(ids)
        result.duplicates.extend(i.template.frame_id for i in items if i.entry_id not in published)
        log.warning(
            "camera %s: no replica confirmed %d scores within %d ms: not counted; their alarm events stay "
            "in the outbox (a failover now would have them scored again on the new primary)",
            camera,
            len(ids),
            REPLICA_WAIT_MS,
        )

    def deliver_stale_events(self, cameras: list[str], min_age_s: float = OUTBOX_DELIVER_AFTER_S) -> int:
        """Deliver the outbox events of ``cameras`` older than ``min_age_s``; return how many.

        They were left by a worker that died, or gave up while Redis was away, between its publish
        script and the event. The picture is not kept in Redis, so these events come without it.
        """
        server_s, server_us = self.client.time()
        cutoff_ms = int(server_s * 1000 + server_us // 1000 - min_age_s * 1000)
        delivered = 0
        for camera in cameras:
            key = keys.event_outbox_key(camera, self.prefix)
            for outbox_id, fields in replies.xrange(self.client, key, "-", str(max(0, cutoff_ms)), count=100):
                event = self._stale_event(camera, fields)
                if event is not None:
                    publish_event(self.client, event, self.prefix)
                    log.warning(
                        "camera %s: delivered alarm event %s of frame %s left undelivered by a worker",
                        camera,
                        event.type,
                        event.frame_id,
                    )
                    delivered += 1
                    if self.metrics:
                        self.metrics.events_recovered.labels(camera).inc()
                self._forget(camera, _s(outbox_id))
        return delivered

    def _stale_event(self, camera: str, fields: dict[bytes, bytes]) -> EventMsg | None:
        try:
            msg = ScoreMsg.from_bytes(fields[b"msg"])
            kind, ms = EventType(_s(fields[b"type"])), int(fields[b"ms"])
        except (KeyError, ValueError, WireError) as e:
            log.error("camera %s: unreadable outbox entry dropped (%s)", camera, e)
            return None
        return self._event(kind, None, msg, ms)

    def _forget(self, camera: str, outbox_id: str) -> None:
        try:
            self.client.xdel(keys.event_outbox_key(camera, self.prefix), outbox_id)
        except REDIS_ERRORS as e:  # delivered but still in the outbox: sent once more later
            log.warning("camera %s: could not clear delivered event %s: %s", camera, outbox_id, e)

    def _send_event(self, event: EventMsg) -> bool:
        # The script already ran: retrying it would find the frames acked, so retry the event alone.
        backoff = EVENT_SEND.backoff()
        deadline = time.monotonic() + EVENT_RETRY_S
        while True:
            try:
                publish_event(self.client, event, self.prefix)
                return True
            except REDIS_ERRORS as e:
                delay = backoff.next()
                if time.monotonic() + delay > deadline or backoff.wait(self.abort, delay):
                    log.error(
                        "camera %s: alarm event %s not delivered yet, Redis unavailable (%s); it stays in "
                        "the camera's outbox and is delivered once Redis is back",
                        event.camera,
                        event.type,
                        e,
                    )
                    return False

    def _event(self, kind: EventType, item: ScoredItem | None, msg: ScoreMsg, ms: int) -> EventMsg:
        image = None
        if kind == EventType.RAISED and item is not None and item.frame is not None:
            try:
                image = overlay_jpeg(item.frame.rgb_numpy(), item.anomaly_map)
            except Exception:  # an event without a picture beats no event
                log.exception("camera %s: cannot draw the alarm image for %s", msg.camera, msg.frame_id)
        return EventMsg(
            type=kind,
            camera=msg.camera,
            ts=time.time_ns(),
            frame_id=msg.frame_id,
            seq=msg.seq,
            score=msg.score,
            threshold=msg.threshold,
            model=msg.model,
            image=image,
            since_ts=ms * 1_000_000 if kind == EventType.CLEARED and ms >= 0 else None,
        )

    def _count(self, msg: ScoreMsg) -> None:
        m = self.metrics
        if m is None or msg.status != ScoreStatus.SCORED:
            return
        m.frames_scored.labels(msg.camera, msg.model).inc()
        m.e2e_latency_seconds.labels(msg.camera).observe(msg.latency_ms / 1000.0)
        if msg.score is not None and msg.threshold:
            m.score_ratio.labels(msg.camera).observe(msg.score / msg.threshold)


class PublisherThread:
    """A thread that publishes queued batches in order, retrying while Redis is unavailable."""

    def __init__(
        self,
        publisher: Publisher,
        on_done: Callable[[list[ScoredItem], PublishResult | None], None],
        maxsize: int = 4,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.publisher = publisher
        self.on_done = on_done
        self.metrics = metrics
        self.abort = publisher.abort
        self._queue: queue.Queue[list[ScoredItem] | None] = queue.Queue(maxsize=maxsize)
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def submit(self, items: list[ScoredItem]) -> None:
        """Queue ``items`` (blocks while the queue is full: backpressure on the model)."""
        self._queue.put(items)

    def idle(self) -> bool:
        """Return True when nothing is queued (a batch being published is not counted)."""
        return self._queue.empty()

    def close(self, timeout: float = 30.0) -> None:
        """Publish what is queued, then stop; after ``timeout`` s give up retrying (Redis down)."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.abort.set()
            self._thread.join(10)

    def _run(self) -> None:
        while True:
            items = self._queue.get()
            if items is None:
                return
            result = self._publish_with_retry(items)
            try:
                self.on_done(items, result)
            except Exception:
                log.exception("publisher: on_done callback failed")

    def _publish_with_retry(self, items: list[ScoredItem]) -> PublishResult | None:
        backoff = PUBLISH.backoff()
        while not self.abort.is_set():
            delay = backoff.next()  # drawn first: a publish that succeeds returns before it matters
            try:
                return self.publisher.publish(items)
            except REDIS_ERRORS as e:
                log.warning(
                    "Redis unavailable while publishing %d scores (%s); retrying in %.1f s",
                    len(items),
                    e,
                    delay,
                )
            except Exception:
                log.exception("publishing %d scores failed; retrying in %.1f s", len(items), delay)
                if self.metrics:
                    self.metrics.loop_errors.labels("publish").inc()
            backoff.wait(self.abort, delay)
        log.error(
            "gave up publishing %d scores at shutdown: the frames stay pending and will be reclaimed",
            len(items),
        )
        return None

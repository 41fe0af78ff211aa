"""The protocol-independent bridge: consumer groups, at-least-once delivery, camera state, jobs.

Delivery: the bridge reads ``{prefix}:alarms`` and each camera's ``{prefix}:{CAM}:results``
through its consumer group (``dfm-bridge``, created at the end of the stream on first use) under
a stable consumer name (``bridge-<host>``; give each bridge of a pair its own ``--name``). An
entry is handed to every adapter and acknowledged (``XACK``) only when all of them confirmed it;
until then it stays pending and is offered again, after a restart too (its own pending entries
are read first; those of a bridge that died are claimed after ``claim_idle_s``). An adapter that
already confirmed an entry is not offered it again by the same process.

Camera state (alarm active, camera up, last score, threshold, model, frames scored since the
bridge started) is polled once per ``state_interval_s`` and handed to the adapters when it changed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dfm_stream import keys, replies
from dfm_stream.connect import RedisClient
from dfm_stream.inspection import Inspector, Job, JobRequest, result_error_code
from dfm_stream.metrics import LATENCY_BUCKETS
from dfm_stream.replies import text as _s
from dfm_stream.wire import FIELD, EventMsg, ResultMsg, ScoreMsg, WireError

log = logging.getLogger(__name__)

DEFAULT_GROUP = "dfm-bridge"
_DEDUP_KEEP = 10_000


class Adapter:
    """One protocol. Subclasses override what they support; ``deliver_*`` return True once confirmed."""

    protocol = "none"

    def start(self, bridge: Bridge) -> None:
        """Connect or start serving; must not block."""

    def stop(self) -> None:
        """Disconnect or stop serving."""

    def connected(self) -> bool:
        """Return True while the adapter can deliver (connected to its broker, or serving)."""
        return True

    def deliver_event(self, event_id: str, event: EventMsg) -> bool:
        """Hand over one alarm/health event; True once the far side confirmed it."""
        return True

    def deliver_result(self, result: ResultMsg) -> bool:
        """Hand over one part result; True once the far side confirmed it."""
        return True

    def camera_state(self, camera: str, state: dict[str, Any]) -> None:
        """Take the camera's current state (called when it changed)."""

    def score(self, score: ScoreMsg) -> None:
        """Take one per-frame score (only adapters that asked: ``wants_scores``)."""

    wants_scores = False


@dataclass
class BridgeMetrics:
    """The bridge's Prometheus metrics (names are a contract, like the workers')."""

    delivered: Counter
    latency: Histogram
    connected: Gauge
    bad_requests: Counter
    jobs: Counter
    pending: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> BridgeMetrics:
        """Register the metrics on ``registry``."""
        return cls(
            delivered=Counter(
                "dfm_bridge_delivered_total",
                "Entries delivered and confirmed, by protocol and kind (event, result)",
                ["protocol", "kind"],
                registry=registry,
            ),
            latency=Histogram(
                "dfm_bridge_delivery_latency_seconds",
                "From the entry's XADD to the far side's confirmation",
                ["protocol"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            connected=Gauge(
                "dfm_bridge_connected",
                "1 while the protocol adapter is connected (MQTT) or serving (OPC UA, Modbus)",
                ["protocol"],
                registry=registry,
            ),
            bad_requests=Counter(
                "dfm_bridge_bad_requests_total",
                "Requests refused: malformed, unknown camera, busy, read-only register...",
                ["protocol", "reason"],
                registry=registry,
            ),
            jobs=Counter(
                "dfm_bridge_jobs_total",
                "Part inspection jobs started through the bridge, by protocol",
                ["protocol"],
                registry=registry,
            ),
            pending=Gauge(
                "dfm_bridge_pending_entries",
                "Entries read but not yet confirmed by every adapter",
                registry=registry,
            ),
        )


@dataclass
class BridgeSettings:
    """How the bridge reads Redis."""

    prefix: str = keys.DEFAULT_PREFIX
    group: str = DEFAULT_GROUP
    name: str = "bridge"
    cameras: list[str] | None = None
    claim_idle_s: float = 60.0
    retry_s: float = 1.0
    state_interval_s: float = 1.0
    block_ms: int = 500
    job_timeout_s: float = 10.0
    extra: dict[str, Any] = field(default_factory=dict)


class Bridge:
    """Reads events and results through a consumer group and hands them to the adapters."""

    def __init__(
        self,
        client: RedisClient,
        adapters: list[Adapter],
        settings: BridgeSettings,
        metrics: BridgeMetrics,
    ) -> None:
        self.client = client
        self.adapters = adapters
        self.settings = settings
        self.metrics = metrics
        self.inspector = Inspector(client, settings.prefix)
        self.cameras: list[str] = []
        self._groups: set[str] = set()
        self._done: dict[str, OrderedDict[str, None]] = {a.protocol: OrderedDict() for a in adapters}
        self._state: dict[str, dict[str, Any]] = {}
        self._score_ids: dict[str, str] = {}
        self._lock = threading.Lock()
        self._job_cameras: set[str] = set()
        self.stop_event = threading.Event()
        for a in adapters:
            metrics.connected.labels(a.protocol).set(0)
            for kind in ("event", "result"):
                metrics.delivered.labels(a.protocol, kind)

    # -- lifecycle --------------------------------------------------------------------------------

    def run(self) -> None:
        """Start the adapters and deliver until :attr:`stop_event` is set."""
        for adapter in self.adapters:
            adapter.start(self)
        poller = threading.Thread(target=self._state_loop, name="bridge-state", daemon=True)
        poller.start()
        try:
            while not self.stop_event.is_set():
                try:
                    self._refresh_cameras()
                    self.deliver_once()
                except (redis.RedisError, OSError) as e:
                    log.warning("redis: %s; retrying", e)
                    self.stop_event.wait(self.settings.retry_s)
        finally:
            for adapter in self.adapters:
                adapter.stop()

    def ready(self) -> tuple[bool, str]:
        """Readiness: Redis answers and every adapter is connected/serving."""
        self.client.ping()
        down = [a.protocol for a in self.adapters if not a.connected()]
        for a in self.adapters:
            self.metrics.connected.labels(a.protocol).set(0 if a.protocol in down else 1)
        return (not down, f"not connected: {', '.join(down)}" if down else "ok")

    # -- cameras and groups -----------------------------------------------------------------------

    def _refresh_cameras(self) -> None:
        if self.settings.cameras is not None:
            cameras = list(self.settings.cameras)
        else:
            names = self.client.hkeys(keys.cameras_key(self.settings.prefix))
            cameras = sorted(n for n in (_s(n) for n in names) if keys.valid_name(n))
        with self._lock:
            cameras += sorted(self._job_cameras - set(cameras))
        for camera in cameras:
            self.ensure_camera(camera)
        self.cameras = cameras

    def ensure_camera(self, camera: str) -> None:
        """Create the bridge's group on ``camera``'s results stream (once per process)."""
        self._ensure_group(keys.results_key(camera, self.settings.prefix))

    def _ensure_group(self, key: str) -> None:
        if key in self._groups:
            return
        try:
            self.client.xgroup_create(key, self.settings.group, id="$", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups.add(key)

    def _streams(self) -> list[str]:
        alarms = keys.alarms_key(self.settings.prefix)
        self._ensure_group(alarms)
        return [alarms, *(keys.results_key(c, self.settings.prefix) for c in self.cameras)]

    # -- delivery ---------------------------------------------------------------------------------

    def deliver_once(self) -> None:
        """Offer pending entries (own, then claimed), then new ones; back off if one is refused."""
        streams = self._streams()
        group, name = self.settings.group, self.settings.name
        idle_ms = int(self.settings.claim_idle_s * 1000)
        backlog = 0
        for key in streams:
            rows = replies.xreadgroup(self.client, group, name, {key: "0"}, count=100)
            entries = rows[0][1] if rows else []
            entries += replies.xautoclaim(self.client, key, group, name, idle_ms, "0-0", count=100)
            backlog += len(entries)
            if entries and not self._offer(key, entries):
                self.metrics.pending.set(backlog)
                self.stop_event.wait(self.settings.retry_s)
                return
        self.metrics.pending.set(0)
        rows = replies.xreadgroup(
            self.client, group, name, dict.fromkeys(streams, ">"), count=100, block=self.settings.block_ms
        )
        for stream, entries in rows:
            if not self._offer(_s(stream), entries):
                self.stop_event.wait(self.settings.retry_s)
                return

    def _offer(self, key: str, entries: list[replies.Record]) -> bool:
        """Hand entries of ``key`` to the adapters in order; ack the confirmed ones; False on refusal."""
        for raw_id, fields in entries:
            entry_id = _s(raw_id)
            if not fields:  # trimmed by MAXLEN while pending: nothing left to deliver
                self.client.xack(key, self.settings.group, entry_id)
                continue
            if not self._deliver(key, entry_id, fields.get(FIELD.encode(), b"")):
                return False
            self.client.xack(key, self.settings.group, entry_id)
        return True

    def _deliver(self, key: str, entry_id: str, data: bytes) -> bool:
        is_event = key == keys.alarms_key(self.settings.prefix)
        try:
            message: EventMsg | ResultMsg = (EventMsg if is_event else ResultMsg).from_bytes(data)
        except WireError as e:
            log.error("%s %s: undecodable entry acknowledged without delivery: %s", key, entry_id, e)
            return True
        kind = "event" if is_event else "result"
        uid = f"{key}/{entry_id}"
        ok = True
        for adapter in self.adapters:
            done = self._done[adapter.protocol]
            if uid in done:
                continue
            try:
                if isinstance(message, EventMsg):
                    confirmed = adapter.deliver_event(entry_id, message)
                else:
                    confirmed = adapter.deliver_result(message)
            except Exception as e:  # an adapter bug must not stop the other protocols
                log.exception("%s: delivering %s failed: %s", adapter.protocol, uid, e)
                confirmed = False
            if not confirmed:
                ok = False
                continue
            done[uid] = None
            if len(done) > _DEDUP_KEEP:
                done.popitem(last=False)
            self.metrics.delivered.labels(adapter.protocol, kind).inc()
            self.metrics.latency.labels(adapter.protocol).observe(_age_s(entry_id))
        return ok

    # -- jobs -------------------------------------------------------------------------------------

    def start_job(self, request: JobRequest) -> Job | ResultMsg:
        """Start a job for an adapter; its result reaches the adapters through the results stream.

        Returns the started job, or the ``error`` result when it could not start: that one is
        counted as a bad request and handed to every adapter directly (it is in no stream).
        """
        protocol = request.source
        started = self.inspector.start(request)
        if isinstance(started, Job):
            self.ensure_camera(request.camera)  # before the job can end: the group sees its result
            with self._lock:
                self._job_cameras.add(request.camera)
            self.metrics.jobs.labels(protocol).inc()
            threading.Thread(target=self.inspector.run, args=(started,), daemon=True).start()
            return started
        self.metrics.bad_requests.labels(protocol, result_error_code(started) or "error").inc()
        for adapter in self.adapters:
            try:
                adapter.deliver_result(started)
            except Exception as e:  # best effort: the caller also gets it as the return value
                log.warning("%s: could not hand over error result: %s", adapter.protocol, e)
        return started

    def count_bad_request(self, protocol: str, reason: str) -> None:
        """Count a request an adapter refused before it became a job."""
        self.metrics.bad_requests.labels(protocol, reason).inc()

    # -- camera state -----------------------------------------------------------------------------

    def _state_loop(self) -> None:
        while not self.stop_event.wait(self.settings.state_interval_s):
            try:
                for camera in list(self.cameras):
                    self._poll_camera(camera)
            except (redis.RedisError, OSError) as e:
                log.warning("state poll: %s", e)

    def _poll_camera(self, camera: str) -> None:
        prefix = self.settings.prefix
        state = dict(self._state.get(camera) or _blank_state(camera))
        key = keys.scores_key(camera, prefix)
        last_id = self._score_ids.get(camera)
        if last_id is None:  # first look: the last score only, counting starts now
            rows = replies.xrevrange(self.client, key, count=1)
            last_id = _s(rows[0][0]) if rows else "0-0"
            scores = [ScoreMsg.from_bytes(rows[0][1][FIELD.encode()])] if rows else []
        else:
            rows = replies.xread_one(self.client, key, last_id, count=1000)
            last_id = _s(rows[-1][0]) if rows else last_id
            scores = [m for m in (_score(f) for _, f in rows) if m is not None]
            state["frames_scored"] += sum(s.status == "scored" for s in scores)
        self._score_ids[camera] = last_id
        for s in scores:
            if s.status == "scored":
                state.update(
                    last_score=s.score, threshold=s.threshold, model=s.model, last_anomalous=s.anomalous
                )
            for adapter in self.adapters:
                if adapter.wants_scores:
                    adapter.score(s)
        alarm = replies.hget(self.client, keys.alarm_state_key(camera, prefix), "active")
        state["alarm_active"] = alarm == b"1"
        state["camera_up"] = _camera_up(replies.hget(self.client, keys.cameras_key(prefix), camera))
        if state != self._state.get(camera):
            self._state[camera] = state
            stamped = {**state, "ts": time.time_ns()}
            for adapter in self.adapters:
                adapter.camera_state(camera, stamped)


def _blank_state(camera: str) -> dict[str, Any]:
    return {
        "camera": camera,
        "alarm_active": False,
        "camera_up": None,
        "last_score": None,
        "last_anomalous": None,
        "threshold": None,
        "model": None,
        "frames_scored": 0,
    }


def _camera_up(raw: bytes | None) -> bool | None:
    """``state`` of the camera's ``dfm:cameras`` entry: up -> True, down/stopped -> False, else None."""
    if raw is None:
        return None
    try:
        state = json.loads(raw).get("state")
    except (ValueError, AttributeError):
        return None
    return {"up": True, "down": False, "stopped": False, "finished": False}.get(state)


def _score(fields: dict[bytes, bytes]) -> ScoreMsg | None:
    try:
        return ScoreMsg.from_bytes(fields.get(FIELD.encode(), b""))
    except WireError:
        return None


def _age_s(entry_id: str) -> float:
    ms = int(entry_id.split("-", 1)[0])
    return max(0.0, time.time() - ms / 1000)

"""Part inspections: a job asks "is the part now in front of camera C good?", its result answers.

A job is run by the process that starts it (the ``inspect`` command, the bridge, your Python code):

1. **start** (:meth:`Inspector.start`): check the camera, take the camera's busy lock
   ``{prefix}:{camera}:job`` (one job per camera at a time, across processes; it expires), note
   the trigger time and the last entry id of the camera's score stream;
2. **run** (:meth:`Inspector.run`): read the score stream after that id and keep the scored frames
   captured at or after the trigger (``ts >= trigger_ts``): the first ``frames`` of them, or those
   captured within ``window_ms`` (the window is closed by the first frame captured after it, or by
   the timeout);
3. **result**: ``ng`` when any kept frame is anomalous, else ``ok``; the worst frame's score, id,
   threshold and model; its overlay JPEG (the ``raised`` event's image when that frame raised an
   alarm, else the frame itself from the frame stream); ``error`` with a ``reason`` when the camera
   is unknown, busy, or no scored frame came within the timeout. The result is XADDed to
   ``{prefix}:{camera}:results`` and the lock released. Every started job ends with a result
   there; a job refused at the start (bad request, unknown camera, busy) gets its ``error``
   result only as the return value (the caller hands it on: the bridge to its protocols).

Frames are matched by capture time (``ts``, the camera's clock) against the trigger time (this
process's clock): keep both in sync (NTP), as for ``--max-age``.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from dfm_stream import keys, replies
from dfm_stream.alarms import overlay_jpeg
from dfm_stream.connect import RedisClient
from dfm_stream.errors import InspectionError, WireError
from dfm_stream.replies import text as _s
from dfm_stream.wire import FIELD, EventMsg, FrameMsg, ResultMsg, ScoreMsg

log = logging.getLogger(__name__)

RESULTS_MAXLEN = 10_000
DEFAULT_TIMEOUT_S = 10.0
MAX_FRAMES = 1000
MAX_WINDOW_MS = 600_000
_EVENT_LOOKBACK = 500  # alarm entries searched for the worst frame's `raised` image
_READ_BLOCK_MS = 200
_EVENT_WAIT_S = 2.0  # longest wait for the image of a `raised` event still in the outbox

ERROR_REASONS = ("unknown_camera", "busy", "no_frame", "bad_request", "redis_error")
"""``reason`` of an ``error`` result."""


@dataclass(frozen=True)
class JobRequest:
    """What a caller asks: camera, its own ids, and the window (``frames`` or ``window_ms``)."""

    camera: str
    part_id: str
    meas_id: str = ""
    frames: int | None = None
    window_ms: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    source: str = "api"
    invalid: str | None = None
    """Set by a protocol that could not parse the request: why (the job is refused as ``bad_request``)."""

    def check(self) -> None:
        """Raise :class:`InspectionError` (reason ``bad_request``) when the request is not valid."""
        if self.invalid:
            raise InspectionError(self.invalid, "bad_request")
        if not keys.valid_name(self.camera):
            raise InspectionError(f"invalid camera id {self.camera!r}", "bad_request")
        if not isinstance(self.part_id, str) or not isinstance(self.meas_id, str):
            raise InspectionError("part_id and meas_id must be strings", "bad_request")
        if len(self.part_id) > 256 or len(self.meas_id) > 256:
            raise InspectionError("part_id and meas_id are at most 256 characters", "bad_request")
        if self.frames is not None and self.window_ms is not None:
            raise InspectionError("give frames or window_ms, not both", "bad_request")
        if self.frames is not None and not (_is_int(self.frames) and 1 <= self.frames <= MAX_FRAMES):
            raise InspectionError(f"frames must be an integer 1..{MAX_FRAMES}", "bad_request")
        if self.window_ms is not None and not (
            _is_int(self.window_ms) and 1 <= self.window_ms <= MAX_WINDOW_MS
        ):
            raise InspectionError(f"window_ms must be an integer 1..{MAX_WINDOW_MS}", "bad_request")
        if not isinstance(self.timeout_s, int | float) or not 0 < self.timeout_s <= 3600:
            raise InspectionError("timeout must be > 0 and <= 3600 s", "bad_request")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Job:
    """A started job: its id, request, trigger time and where its scores start."""

    job_id: str
    request: JobRequest
    trigger_ts: int
    after_id: str
    locked: bool = True


def new_job_id() -> str:
    """Return a fresh job id (32 hex digits)."""
    return uuid.uuid4().hex


class Inspector:
    """Starts and runs part inspection jobs against one Redis deployment."""

    def __init__(self, client: RedisClient, prefix: str = keys.DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix

    def inspect(self, request: JobRequest) -> ResultMsg:
        """Start a job and wait for its result (always a result: ``error`` when it could not run)."""
        started = self.start(request)
        if isinstance(started, ResultMsg):
            return started
        return self.run(started)

    def start(self, request: JobRequest, job_id: str | None = None) -> Job | ResultMsg:
        """Start a job now; return it, or the ``error`` result (not published) when it cannot start."""
        job_id = job_id or new_job_id()
        trigger_ts = time.time_ns()
        try:
            request.check()
            if not self._camera_known(request.camera):
                raise InspectionError(f"camera {request.camera!r} is not known", "unknown_camera")
            lock = keys.job_lock_key(request.camera, self.prefix)
            ttl_ms = int((request.timeout_s + (request.window_ms or 0) / 1000 + 30) * 1000)
            if not self.client.set(lock, job_id, nx=True, px=ttl_ms):
                raise InspectionError(f"camera {request.camera!r} is busy with another job", "busy")
            last = replies.xrevrange(self.client, keys.scores_key(request.camera, self.prefix), count=1)
        except InspectionError as e:
            return self._error(request, job_id, trigger_ts, e.reason, str(e))
        except Exception as e:  # Redis unreachable: still a result
            return self._error(request, job_id, trigger_ts, "redis_error", str(e))
        after_id = _s(last[0][0]) if last else "0-0"
        return Job(job_id, request, trigger_ts, after_id)

    def run(self, job: Job) -> ResultMsg:
        """Wait for the job's frames, publish its result, release the camera; return the result."""
        try:
            scores = self._collect(job)
            result = self._judge(job, scores)
        except Exception as e:  # never silence: a failure is an error result
            log.warning("job %s on %s failed: %s", job.job_id, job.request.camera, e)
            result = self._error(job.request, job.job_id, job.trigger_ts, "redis_error", str(e))
        self._publish(result)
        self._release(job)
        return result

    def _camera_known(self, camera: str) -> bool:
        if self.client.hexists(keys.cameras_key(self.prefix), camera):
            return True
        return bool(
            self.client.exists(keys.frames_key(camera, self.prefix), keys.scores_key(camera, self.prefix))
        )

    def _collect(self, job: Job) -> list[ScoreMsg]:
        """Return the scored frames of the job's window (may be empty: timeout)."""
        req = job.request
        key = keys.scores_key(req.camera, self.prefix)
        window_end = job.trigger_ts + req.window_ms * 1_000_000 if req.window_ms else None
        want = None if window_end else (req.frames or 1)
        deadline = time.monotonic() + req.timeout_s + (req.window_ms or 0) / 1000
        kept: list[ScoreMsg] = []
        last_id = job.after_id
        while time.monotonic() < deadline:
            for entry_id, fields in replies.xread_one(
                self.client, key, last_id, count=100, block=_READ_BLOCK_MS
            ):
                last_id = _s(entry_id)
                score = _score(fields)
                if score is None or score.status != "scored" or score.ts < job.trigger_ts:
                    continue
                if window_end is not None and score.ts > window_end:
                    return kept  # the first frame after the window closes it
                kept.append(score)
            if want is not None and len(kept) >= want:
                return sorted(kept, key=lambda s: s.ts)[:want]
        return kept

    def _judge(self, job: Job, scores: list[ScoreMsg]) -> ResultMsg:
        req = job.request
        if not scores:
            what = f"{req.window_ms} ms window" if req.window_ms else "job"
            reason = f"no scored frame of camera {req.camera!r} for this {what} within {req.timeout_s:g} s"
            return self._error(req, job.job_id, job.trigger_ts, "no_frame", reason)
        worst = max(scores, key=lambda s: s.score if s.score is not None else float("-inf"))
        ng = any(s.anomalous for s in scores)
        image, overlay = self._image(req.camera, worst.frame_id, worst.anomalous)
        return ResultMsg(
            result_id=job.job_id,
            job_id=job.job_id,
            camera=req.camera,
            meas_id=req.meas_id,
            part_id=req.part_id,
            state="ng" if ng else "ok",
            trigger_ts=job.trigger_ts,
            result_ts=time.time_ns(),
            frames=len(scores),
            frame_id=worst.frame_id,
            score=worst.score,
            threshold=worst.threshold,
            model=worst.model,
            image=image,
            image_overlay=overlay,
            want_frames=(req.frames or 1) if req.window_ms is None else None,
            window_ms=req.window_ms,
            source=req.source,
        )

    def _image(self, camera: str, frame_id: str, anomalous: bool) -> tuple[bytes | None, bool]:
        """Return the worst frame's JPEG and whether it carries the anomaly overlay."""
        # the worker writes a `raised` into the outbox with the score, then the event with its image:
        # when the outbox still holds it, the image is on its way (the outbox is read first, so an
        # event delivered meanwhile is found in the alarm stream)
        coming = anomalous and self._raise_in_outbox(camera, frame_id)
        deadline = time.monotonic() + (_EVENT_WAIT_S if coming else 0)
        while True:
            image = self._raised_image(frame_id)
            if image is not None:
                return image, True
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        return self._frame_image(camera, frame_id), False

    def _raise_in_outbox(self, camera: str, frame_id: str) -> bool:
        for _, fields in replies.xrange(self.client, keys.event_outbox_key(camera, self.prefix)):
            score = _score(fields)
            if fields.get(b"type") == b"raised" and score is not None and score.frame_id == frame_id:
                return True
        return False

    def _raised_image(self, frame_id: str) -> bytes | None:
        for _, fields in replies.xrevrange(self.client, keys.alarms_key(self.prefix), count=_EVENT_LOOKBACK):
            try:
                event = EventMsg.from_bytes(fields.get(FIELD.encode(), b""))
            except WireError:
                continue
            if event.type == "raised" and event.frame_id == frame_id and event.image:
                return event.image
        return None

    def _frame_image(self, camera: str, frame_id: str) -> bytes | None:
        try:
            from dfm_stream.frame_codec import decode_frame

            entry_id = frame_id.rpartition(":")[2]
            rows = replies.xrange(self.client, keys.frames_key(camera, self.prefix), entry_id, entry_id)
            if not rows:
                return None
            rgb = decode_frame(FrameMsg.from_bytes(rows[0][1][FIELD.encode()]))
            return overlay_jpeg(rgb, None)
        except WireError as e:
            log.info("no image for %s: %s", frame_id, e)
            return None

    def _error(self, req: JobRequest, job_id: str, trigger_ts: int, reason: str, detail: str) -> ResultMsg:
        return ResultMsg(
            result_id=job_id,
            job_id=job_id,
            camera=req.camera if isinstance(req.camera, str) else str(req.camera),
            meas_id=req.meas_id if isinstance(req.meas_id, str) else str(req.meas_id),
            part_id=req.part_id if isinstance(req.part_id, str) else str(req.part_id),
            state="error",
            trigger_ts=trigger_ts,
            result_ts=time.time_ns(),
            reason=f"{reason}: {detail}",
            want_frames=req.frames if _is_int(req.frames) else None,
            window_ms=req.window_ms if _is_int(req.window_ms) else None,
            source=req.source,
        )

    def _publish(self, result: ResultMsg) -> None:
        """XADD the result to its camera's results stream."""
        try:
            key = keys.results_key(result.camera, self.prefix)
            self.client.xadd(key, {FIELD: result.to_bytes()}, maxlen=RESULTS_MAXLEN, approximate=True)
        except Exception as e:  # the caller still gets the result
            log.warning("could not publish result %s: %s", result.result_id, e)

    def _release(self, job: Job) -> None:
        """Delete the camera's busy lock if it is still this job's."""
        lock = keys.job_lock_key(job.request.camera, self.prefix)
        try:
            self.client.eval(_RELEASE_LUA, 1, lock, job.job_id)
        except Exception as e:  # it expires anyway
            log.warning("could not release %s: %s", lock, e)


_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def _score(fields: dict[bytes, bytes]) -> ScoreMsg | None:
    try:
        return ScoreMsg.from_bytes(fields.get(FIELD.encode(), b""))
    except WireError:
        return None


def result_error_code(result: ResultMsg) -> str | None:
    """Return the reason code of an ``error`` result (``no_frame``, ``busy``...), else None."""
    if result.state != "error" or not result.reason:
        return None
    return result.reason.split(":", 1)[0]

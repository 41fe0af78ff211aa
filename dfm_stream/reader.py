"""Camera -> Redis: the reader loop.

One thread per camera (:class:`CameraLoop`), so a camera that is down never stops the others. Per
frame: fps cap (decimation, live sources) or real-time pacing (files, folders, synthetic), region
of interest crop (source pixels), resize, encode (:func:`dfm_stream.frame_codec.encode_frame`), then
``XADD {prefix}:{camera}:frames MAXLEN ~ N``. ``N`` defaults to about 10 s of frames
(``max(50, ceil(10 * fps))``), so a stream nobody reads stays bounded.

Faults, and what the reader does:

* camera fails to open, freezes (no frame within ``read_timeout``) or errors: ``camera_down``
  event, reconnect with capped exponential backoff and jitter; ``camera_up`` when frames flow again.
* Redis unreachable: cameras stay open; frames are dropped and counted
  (``reason="redis_unavailable"``); the write is retried with backoff and resumes by itself.
  Events that could not be written wait in a small queue and are sent when Redis is back.

Every frame gets the next ``seq`` of its camera once it passes the fps cap, so a gap in ``seq``
seen downstream means a frame lost after capture (Redis down, or trimmed by MAXLEN before anyone
read it); this process's ``dfm_reader_frames_dropped_total{reason}`` says which.
"""

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from dfm_stream import liveness
from dfm_stream.backoff import READER_SINK, Backoff
from dfm_stream.config import CameraConfig
from dfm_stream.connect import RedisClient
from dfm_stream.errors import SourceError, WireError
from dfm_stream.frame_codec import encode_frame
from dfm_stream.keys import DEFAULT_PREFIX, frames_key
from dfm_stream.metrics import ReaderMetrics, new_registry
from dfm_stream.reader_sink import RedisSink
from dfm_stream.redact import safe_url
from dfm_stream.sources import Frame, Source, SourceFinished, SourceOptions, make_source, source_kind
from dfm_stream.sources.capture import Capture, CaptureTimeoutError
from dfm_stream.wire import CameraState, EventMsg, EventType

log = logging.getLogger(__name__)

SourceFactory = Callable[[str, SourceOptions], Source]


class Decimator:
    """Keeps frames of a live source at no more than ``fps`` per second (0 keeps all)."""

    def __init__(self, fps: float) -> None:
        self.interval_ns = int(1e9 / fps) if fps > 0 else 0
        self._next = 0

    def keep(self, ts_ns: int) -> bool:
        """Return True when the frame captured at ``ts_ns`` is due."""
        if not self.interval_ns:
            return True
        slack = self.interval_ns // 10  # tolerate capture jitter
        if ts_ns + slack < self._next:
            return False
        self._next = max(self._next + self.interval_ns, ts_ns + self.interval_ns - slack)
        return True


def roi_problem(roi: tuple[int, int, int, int], width: int, height: int) -> str | None:
    """Return why ``roi`` does not fit a ``width`` x ``height`` frame, or None when it does.

    A region beyond the frame is a mistake in the camera's settings, not something to clip
    silently: the crop would not be the region the model was fitted on.
    """
    x, y, w, h = roi
    if x + w <= width and y + h <= height:
        return None
    return (
        f"roi {x},{y},{w},{h} does not fit the {width}x{height} frame (x + w must be <= {width},"
        f" y + h <= {height}): fix --roi or the camera's roi"
    )


def transform(
    image: np.ndarray, roi: tuple[int, int, int, int] | None, size: tuple[int, int] | None
) -> np.ndarray:
    """Crop ``roi`` (x, y, w, h in source pixels, inside the frame), then resize to ``size`` (w, h)."""
    if roi is not None:
        problem = roi_problem(roi, image.shape[1], image.shape[0])
        if problem:
            raise WireError(problem, "encode_error")
        x, y, w, h = roi
        image = image[y : y + h, x : x + w]
    if size is not None and (image.shape[1], image.shape[0]) != size:
        shrink = size[0] * size[1] < image.shape[0] * image.shape[1]
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.ascontiguousarray(image)


class _Outcome(Exception):  # noqa: N818 - internal control flow
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class CameraLoop:
    """One camera: open, read, publish; reconnect with backoff. Run :meth:`run` in a thread."""

    def __init__(
        self,
        cam: CameraConfig,
        sink: RedisSink,
        metrics: ReaderMetrics,
        stop: threading.Event,
        prefix: str = DEFAULT_PREFIX,
        max_frames: int | None = None,
        factory: SourceFactory = make_source,
    ) -> None:
        self.cam = cam
        self.sink = sink
        self.metrics = metrics
        self.stop = stop
        self.key = frames_key(cam.id, prefix)
        self.max_frames = max_frames
        self.factory = factory
        self.session = uuid.uuid4().hex
        self.seq = 0
        self.state = CameraState.STARTING
        self.started_ts = time.time_ns()
        self.maxlen = cam.auto_maxlen(cam.fps)
        self._since_ts = self.started_ts
        self._source_info: dict[str, Any] = {"kind": source_kind(cam.source)}
        self._delivered = False
        self.frames_delivered = 0  # frames the source gave (for the verdict at exit: :meth:`problem`)
        self.frames_written = 0  # frames written to Redis
        self.last_fault = ""  # the last reason the camera went down, "reason: message"
        self._fps_window = (time.monotonic(), 0)
        self._last_encode_log = 0.0
        self.on_overrun = self._count_overrun

    def _count_overrun(self) -> None:
        self.metrics.frames_captured.labels(self.cam.id).inc()
        self.metrics.frames_dropped.labels(self.cam.id, "overrun").inc()

    def run(self) -> None:
        """Capture until stopped, until a finite source ends, or until ``max_frames`` are handled."""
        cam = self.cam
        backoff = Backoff(cam.backoff_initial, cam.backoff_max)
        self.metrics.init_camera(cam.id)
        self._register()
        attempt = 0
        while not self.stop.is_set():
            if attempt:
                self.metrics.reconnects.labels(cam.id).inc()
            attempt += 1
            self._delivered = False
            try:
                self._session()
                break  # finished or stopped
            except _Outcome as fault:
                if self._delivered:
                    backoff.reset()
                delay = backoff.next()
                self.last_fault = f"{fault.reason}: {fault}"
                self._down(fault.reason, str(fault))
                log.warning("camera %s down (%s: %s); retrying in %.1f s", cam.id, fault.reason, fault, delay)
                backoff.wait(self.stop, delay)
        if self.state != CameraState.DOWN:
            self.metrics.camera_up.labels(cam.id).set(0)
        self.state = CameraState.STOPPED if self.stop.is_set() else CameraState.FINISHED
        self._register()
        log.info("camera %s %s after %d frames", cam.id, self.state, self.seq)

    def _session(self) -> None:
        cam = self.cam
        opts = SourceOptions(cam.loop, cam.fps, cam.open_timeout, cam.read_timeout)
        try:
            source = self.factory(cam.source, opts)
        except SourceError as e:
            raise _Outcome("bad_source", str(e)) from e
        capture = Capture(source, cam.id, on_overrun=self.on_overrun).start()
        try:
            try:
                if not capture.wait_open(cam.open_timeout, self.stop):
                    return
            except CaptureTimeoutError as e:
                raise _Outcome("open_timeout", str(e)) from e
            except SourceError as e:
                raise _Outcome("open_failed", str(e)) from e
            self._pump(capture, source)
        except SourceFinished:
            return
        except CaptureTimeoutError as e:
            raise _Outcome("frozen", str(e)) from e
        except SourceError as e:
            raise _Outcome("read_error", str(e)) from e
        except _Outcome:
            raise
        except Exception as e:  # the edge of the camera loop: log with traceback, count, reconnect
            log.exception("camera %s: unexpected error", cam.id)
            raise _Outcome("error", f"{type(e).__name__}: {e}") from e
        finally:
            capture.close()

    def _pump(self, capture: Capture, source: Source) -> None:
        cam = self.cam
        live = source.is_live
        rate = cam.fps if cam.fps > 0 else source.fps
        self.maxlen = cam.auto_maxlen(rate)
        self._source_info = source.describe()
        interval = 1.0 / rate if (not live and cam.pace and rate > 0) else 0.0
        decimator = Decimator(cam.fps if live else 0.0)
        due = time.monotonic()
        while not self.stop.is_set():
            if interval:
                now = time.monotonic()
                if due > now and self.stop.wait(due - now):
                    return
                due = max(due + interval, time.monotonic() - interval)
            frame = capture.get(cam.read_timeout, self.stop)
            if frame is None:
                return
            if not live:  # a paced source is "captured" when it is due, not when it was pre-read
                frame = frame._replace(ts=time.time_ns())
            self._captured()
            self.frames_delivered += 1
            if not self._delivered:
                self._delivered = True
                self._up()
            if not decimator.keep(frame.ts):
                self.metrics.frames_dropped.labels(cam.id, "decimated").inc()
                continue
            self._publish(frame)
            if self.max_frames is not None and self.seq >= self.max_frames:
                raise SourceFinished(f"camera {cam.id}: {self.max_frames} frames handled")

    def _captured(self) -> None:
        self.metrics.frames_captured.labels(self.cam.id).inc()
        start, count = self._fps_window
        now = time.monotonic()
        if now - start >= 1.0:
            self.metrics.capture_fps.labels(self.cam.id).set((count + 1) / (now - start))
            self._fps_window = (now, 0)
        else:
            self._fps_window = (start, count + 1)

    def _publish(self, frame: Frame) -> None:
        cam = self.cam
        seq = self.seq
        self.seq += 1
        t0 = time.perf_counter()
        try:
            image = transform(frame.image, cam.roi, cam.size)
            msg = encode_frame(image, cam.id, seq, self.session, cam.encoding, cam.jpeg_quality, frame.ts)
        except WireError as e:
            self.metrics.frames_dropped.labels(cam.id, "encode_error").inc()
            self.last_fault = f"frames not encoded: {e}"
            if time.monotonic() - self._last_encode_log > 10.0:
                self._last_encode_log = time.monotonic()
                log.error(
                    "camera %s: frame %d not encoded: %s (further errors logged every 10 s)", cam.id, seq, e
                )
            return
        self.metrics.encode_seconds.labels(cam.id).observe(time.perf_counter() - t0)
        if frame.extra:
            msg = type(msg)(**{**msg.__dict__, "extra": dict(frame.extra)})
        data = msg.to_bytes()
        reason = self.sink.write_frame(self.key, data, self.maxlen)
        if reason is None:
            self.frames_written += 1
            self.metrics.frames_published.labels(cam.id).inc()
            self.metrics.published_bytes.labels(cam.id).inc(len(data))
        else:
            self.metrics.frames_dropped.labels(cam.id, reason).inc()

    def _up(self) -> None:
        now = time.time_ns()
        self.metrics.camera_up.labels(self.cam.id).set(1)
        was = self.state
        self.state = CameraState.UP
        self._register()
        if was != CameraState.UP:
            log.info("camera %s up (%s)", self.cam.id, self._source_info.get("kind"))
            since = self._since_ts if was == CameraState.DOWN else None
            self.sink.emit(
                EventMsg(
                    type=EventType.CAMERA_UP,
                    camera=self.cam.id,
                    ts=now,
                    since_ts=since,
                    reason="frames flowing",
                )
            )
            self._since_ts = now

    def _down(self, reason: str, message: str) -> None:
        self.metrics.camera_up.labels(self.cam.id).set(0)
        if self.state == CameraState.DOWN:
            return
        now = time.time_ns()
        event = EventMsg(
            type=EventType.CAMERA_DOWN,
            camera=self.cam.id,
            ts=now,
            reason=reason,
            message=message,
            since_ts=self._since_ts,
        )
        self.state = CameraState.DOWN
        self._since_ts = now
        self._register()
        self.sink.emit(event)

    def problem(self) -> str | None:
        """Return why this camera sent nothing to Redis (no frame from the source, none written), or None."""
        cam = self.cam
        took = f"in {(time.time_ns() - self.started_ts) / 1e9:.0f} s"
        if not self.frames_delivered:
            why = self.last_fault or "it opened but gave no frame"
            return f"camera {cam.id}: source {safe_url(cam.source)} delivered no frame {took} ({why})"
        if not self.frames_written:
            why = self.sink.last_error or self.last_fault or "see the log"
            captured = f"{self.frames_delivered} frame(s) captured {took}"
            return f"camera {cam.id}: {captured}, none written to Redis ({why})"
        return None

    def describe(self) -> dict[str, Any]:
        """Return what the reader registers in ``{prefix}:cameras`` for this camera (no secrets)."""
        cam = self.cam
        return {
            "camera": cam.id,
            "source": self._source_info,
            "fps": cam.fps,
            "size": f"{cam.size[0]}x{cam.size[1]}" if cam.size else None,
            "roi": list(cam.roi) if cam.roi else None,
            "encoding": cam.encoding,
            "maxlen": self.maxlen,
            "model": cam.model or None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "session": self.session,
            "started_ts": self.started_ts,
            "state": self.state,
            "updated_ts": time.time_ns(),
        }

    def _register(self) -> None:
        self.sink.register(self.cam.id, self.describe())


class Reader:
    """Runs one :class:`CameraLoop` thread per camera; see the module docstring.

    Args:
        cameras: the cameras this process owns.
        client: a Redis client (binary replies), e.g. from :func:`dfm_stream.connect.connect`.
        stop: set it to stop every camera (SIGTERM does); a fresh event when None.
        max_frames: per camera, stop after this many frames passed the fps cap (tests, demos).
        durability: ``local`` or ``replicated`` (see :class:`~dfm_stream.reader_sink.RedisSink`).
    """

    def __init__(
        self,
        cameras: Sequence[CameraConfig],
        client: RedisClient,
        prefix: str = DEFAULT_PREFIX,
        metrics: ReaderMetrics | None = None,
        stop: threading.Event | None = None,
        max_frames: int | None = None,
        factory: SourceFactory = make_source,
        durability: str = "local",
    ) -> None:
        if not cameras:
            raise SourceError(
                "no cameras to read: give --camera and --source, or a --config with [[cameras]]"
            )
        self.stop = stop or threading.Event()
        self.metrics = metrics or ReaderMetrics.create(new_registry(process_metrics=False))
        first = cameras[0]
        self.sink = RedisSink(
            client,
            prefix,
            Backoff(
                min(READER_SINK.initial, first.backoff_initial), min(READER_SINK.maximum, first.backoff_max)
            ),
            durability,
        )
        self.loops = {
            c.id: CameraLoop(c, self.sink, self.metrics, self.stop, prefix, max_frames, factory)
            for c in cameras
        }
        self._threads: list[threading.Thread] = []

    def start(self) -> "Reader":
        """Start the camera threads."""
        for cam_id, loop in self.loops.items():
            t = threading.Thread(target=loop.run, name=f"camera-{cam_id}", daemon=True)
            t.start()
            self._threads.append(t)
        threading.Thread(target=self._heartbeats, name="camera-heartbeats", daemon=True).start()
        return self

    def _heartbeats(self) -> None:
        """Mark the cameras alive while this reader runs (discovering workers follow only those)."""
        while not self.stop.wait(liveness.HEARTBEAT_INTERVAL_S):
            self.sink.beat()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every camera finished (or ``stop``); return True when all threads ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            while t.is_alive():
                if self.stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                    break
                t.join(0.1)
        return not any(t.is_alive() for t in self._threads)

    def run(self) -> int:
        """Start, wait until stopped or all finite cameras are done, then shut down; return 0."""
        self.start()
        self.wait()
        self.close()
        return 0

    def problems(self) -> list[str]:
        """Return, per camera that sent nothing to Redis in this run, why (empty: every camera did)."""
        return [p for p in (loop.problem() for loop in self.loops.values()) if p]

    def close(self, timeout: float = 1.5) -> None:
        """Stop every camera and wait up to ``timeout`` seconds for the threads to release them."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            log.warning("threads still in a camera call at exit: %s", ", ".join(stuck))

    def ready(self) -> tuple[bool, str]:
        """Return ``(ready, detail)``: Redis reachable and every camera open (finished counts as ok)."""
        if not self.sink.ping():
            return False, "redis unreachable"
        down = [
            c for c, loop in self.loops.items() if loop.state not in (CameraState.UP, CameraState.FINISHED)
        ]
        if down:
            return False, "cameras not up: " + ", ".join(sorted(down))
        return True, "ok"

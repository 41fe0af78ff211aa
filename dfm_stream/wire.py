"""The messages that cross Redis, and their one codec (msgpack).

Every stream entry written by dfm-stream has exactly one field, ``msg``, whose value is a msgpack
map. This module is the only place that knows those maps; ``docs/wire-format.md`` describes the
same layout for people writing their own producers and consumers.

Compatibility rules:

* ``v`` is the integer *major* schema version (:data:`SCHEMA_VERSION`). Adding an optional field is
  a compatible change and keeps ``v``; a consumer rejects a message whose ``v`` is higher than the
  one it knows, with :class:`~dfm_stream.errors.UnsupportedVersionError`.
* Consumers ignore keys they do not know.
"""

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, overload

import msgpack

from dfm_stream.errors import UnsupportedVersionError, WireError

SCHEMA_VERSION = 1
"""Major version of the message schemas this build writes and understands."""

FIELD = "msg"
"""The one field of every stream entry; its value is the msgpack-encoded message."""

ENCODINGS = ("jpeg", "raw")
PIXEL_ORDERS = ("bgr", "rgb", "gray")


class EventType(enum.StrEnum):
    """The ``type`` of an event message (the wire value is the string)."""

    RAISED = "raised"
    CLEARED = "cleared"
    CAMERA_DOWN = "camera_down"
    CAMERA_UP = "camera_up"
    MODEL_LOAD_FAILED = "model_load_failed"
    MODEL_SWITCHED = "model_switched"
    ACKNOWLEDGED = "acknowledged"
    FALSE_ALARM = "false_alarm"


EVENT_TYPES = tuple(t.value for t in EventType)
"""The event types this build writes (a reader of events keeps types it does not know as strings)."""
REVIEW_TYPES = (EventType.ACKNOWLEDGED.value, EventType.FALSE_ALARM.value)
"""Event types an operator writes from the console about a ``raised`` alarm (its ``frame_id``)."""


class CameraState(enum.StrEnum):
    """The ``state`` a reader registers for its camera in ``{prefix}:cameras``."""

    STARTING = "starting"
    UP = "up"
    DOWN = "down"
    FINISHED = "finished"
    STOPPED = "stopped"


DEFAULT_MAX_PIXELS = 8192 * 8192
"""Largest w*h a consumer accepts unless configured otherwise (guards memory against absurd sizes)."""

FRAME_OVERHEAD_BYTES = 1 << 20
"""Room for the keys of a frame message besides its pixels (producers may add keys of their own)."""
MAX_FRAME_ITEMS = 65_536
"""Most elements one msgpack array or map of a frame message may hold (a frame needs a dozen)."""
DEADLETTER_PAYLOAD_BYTES = 65_536
"""Most bytes of a refused frame a dead letter keeps (its ``payload``: a prefix; ``size``: the whole)."""


def frame_bytes_cap(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Default largest ``msg`` of a frame entry: a raw 3-channel frame of ``max_pixels`` plus overhead."""
    return 3 * int(max_pixels) + FRAME_OVERHEAD_BYTES


def _unpack_map(data: bytes, what: str, max_items: int | None = None) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"{what}: expected bytes, got {type(data).__name__}", reason="bad_msgpack")
    limits = {"max_array_len": max_items, "max_map_len": max_items} if max_items else {}
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, **limits)
    except Exception as e:  # msgpack raises several unrelated types for corrupt input
        claimed = re.match(r"(\d+) exceeds max_(array|map)_len", str(e))
        if claimed and int(claimed.group(1)) <= len(data):  # there, not just claimed by a corrupt header
            raise WireError(f"{what}: a msgpack array or map is too long ({e})", reason="oversized") from e
        raise WireError(f"{what}: not valid msgpack ({e})", reason="bad_msgpack") from e
    if not isinstance(obj, dict):
        raise WireError(f"{what}: expected a msgpack map, got {type(obj).__name__}", reason="bad_message")
    _check_version(obj, what)
    return obj


def _check_version(obj: dict[str, Any], what: str) -> None:
    v = obj.get("v")
    if isinstance(v, str):  # tolerate "1" or "1.2" from hand-written producers
        try:
            v = int(v.split(".", 1)[0])
        except ValueError:
            v = None
    if isinstance(v, bool) or not isinstance(v, int):
        raise WireError(f"{what}: field 'v' (schema version) missing or not an integer", reason="bad_message")
    if v > SCHEMA_VERSION:
        raise UnsupportedVersionError(
            f"{what}: schema version v={v} is newer than this build understands (v<={SCHEMA_VERSION});"
            " upgrade dfm-stream on the consumer"
        )
    if v < 1:
        raise WireError(f"{what}: schema version v={v} is not valid (must be >= 1)", reason="bad_message")


def _get(obj: dict[str, Any], key: str, types: type | tuple[type, ...], what: str, default: Any = ...) -> Any:
    if key not in obj or obj[key] is None:
        if default is ...:
            raise WireError(f"{what}: required field {key!r} is missing", reason="bad_message")
        return default
    value = obj[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise WireError(f"{what}: field {key!r} must be {_type_names(types)}, got bool", reason="bad_message")
    if not isinstance(value, types):
        raise WireError(
            f"{what}: field {key!r} must be {_type_names(types)}, got {type(value).__name__}",
            reason="bad_message",
        )
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    if isinstance(types, tuple):
        return " or ".join(t.__name__ for t in types)
    return types.__name__


@overload
def _finite(value: float, key: str, what: str) -> float: ...
@overload
def _finite(value: float | None, key: str, what: str) -> float | None: ...
def _finite(value: float | None, key: str, what: str) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        raise WireError(f"{what}: field {key!r} is not a finite number ({value})", reason="bad_message")
    return value


@dataclass(frozen=True)
class FrameMsg:
    """One camera frame, as a reader writes it to ``{prefix}:{camera}:frames``."""

    camera: str
    seq: int
    ts: int
    enc: str
    w: int
    h: int
    c: int
    data: bytes
    session: str = ""
    pix: str = "bgr"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    WHAT: ClassVar[str] = "frame message"

    def to_bytes(self) -> bytes:
        """Encode as the msgpack map stored in the ``msg`` field."""
        body = {
            "v": SCHEMA_VERSION,
            "camera": self.camera,
            "seq": self.seq,
            "session": self.session,
            "ts": self.ts,
            "enc": self.enc,
            "w": self.w,
            "h": self.h,
            "c": self.c,
            "pix": self.pix,
            "data": self.data,
        }
        return msgpack.packb({**self.extra, **body}, use_bin_type=True)

    @classmethod
    def from_bytes(
        cls, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None
    ) -> "FrameMsg":
        """Decode and validate a frame message; raise :class:`WireError` with a reason if it is bad.

        ``max_bytes`` (default :func:`frame_bytes_cap` of ``max_pixels``): a longer message is
        refused unread (reason ``oversized``), and so is one with an array or map of more than
        :data:`MAX_FRAME_ITEMS` elements.
        """
        what = cls.WHAT
        cap = frame_bytes_cap(max_pixels) if max_bytes is None else max_bytes
        if isinstance(data, bytes | bytearray | memoryview) and len(data) > cap:
            raise WireError(f"{what}: {len(data)} bytes, more than the {cap}-byte cap", reason="oversized")
        obj = _unpack_map(data, what, MAX_FRAME_ITEMS)
        camera = _get(obj, "camera", str, what)
        seq = _get(obj, "seq", int, what)
        ts = _get(obj, "ts", int, what)
        enc = _get(obj, "enc", str, what)
        w, h, c = (_get(obj, k, int, what) for k in ("w", "h", "c"))
        payload = _get(obj, "data", bytes, what)
        session = _get(obj, "session", str, what, "")
        pix = _get(obj, "pix", str, what, "gray" if c == 1 else "bgr")
        if seq < 0 or ts < 0:
            raise WireError(f"{what}: 'seq' and 'ts' must be >= 0 (got {seq}, {ts})", reason="bad_message")
        if enc not in ENCODINGS:
            raise WireError(f"{what}: 'enc' must be one of {ENCODINGS}, got {enc!r}", reason="bad_message")
        if w <= 0 or h <= 0 or c not in (1, 3):
            raise WireError(
                f"{what}: bad shape w={w} h={h} c={c} (w, h > 0; c is 1 or 3)", reason="shape_mismatch"
            )
        if w * h > max_pixels:
            raise WireError(
                f"{what}: {w}x{h} frame exceeds the {max_pixels}-pixel cap of this consumer",
                reason="too_large",
            )
        if pix not in PIXEL_ORDERS:
            raise WireError(f"{what}: 'pix' must be one of {PIXEL_ORDERS}, got {pix!r}", reason="bad_message")
        if enc == "raw" and len(payload) != w * h * c:
            raise WireError(
                f"{what}: raw data has {len(payload)} bytes, expected w*h*c = {w * h * c}",
                reason="shape_mismatch",
            )
        known = {"v", "camera", "seq", "session", "ts", "enc", "w", "h", "c", "pix", "data"}
        extra = {k: v for k, v in obj.items() if k not in known}
        return cls(camera, seq, ts, enc, w, h, c, payload, session, pix, extra)


def make_frame_id(camera: str, entry_id: str) -> str:
    """Return the frame id used everywhere after the frame stream: ``<camera>:<stream entry id>``."""
    return f"{camera}:{entry_id}"


def split_frame_id(frame_id: str) -> tuple[str, str]:
    """Return ``(camera, entry_id)`` of a frame id made by :func:`make_frame_id`."""
    camera, sep, entry_id = frame_id.rpartition(":")
    if not sep or not camera or not entry_id:
        raise WireError(f"frame id {frame_id!r} is not '<camera>:<entry id>'", reason="bad_message")
    return camera, entry_id


class ScoreStatus(enum.StrEnum):
    """The ``status`` of a score message (the wire value is the string)."""

    SCORED = "scored"
    SKIPPED = "skipped"


SCORE_STATUSES = tuple(s.value for s in ScoreStatus)


def _status(value: str, what: str) -> ScoreStatus:
    if value not in SCORE_STATUSES:
        raise WireError(
            f"{what}: 'status' must be one of {SCORE_STATUSES}, got {value!r}", reason="bad_message"
        )
    return ScoreStatus(value)


@dataclass(frozen=True)
class ScoreMsg:
    """The result for one frame, as a worker writes it to ``{prefix}:{camera}:scores``.

    ``status`` is ``"scored"`` for a frame that went through the model, or ``"skipped"`` for a frame
    dropped at dequeue because it was older than ``--max-age`` (then ``score`` is None).
    """

    camera: str
    frame_id: str
    seq: int
    ts: int
    scored_ts: int
    score: float | None
    score_norm: float | None
    threshold: float | None
    anomalous: bool
    model: str
    latency_ms: float
    status: ScoreStatus = ScoreStatus.SCORED
    session: str = ""
    worker: str = ""

    WHAT: ClassVar[str] = "score message"

    def to_bytes(self) -> bytes:
        """Encode as the msgpack map stored in the ``msg`` field."""
        return msgpack.packb({"v": SCHEMA_VERSION, **self.__dict__}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "ScoreMsg":
        """Decode and validate a score message."""
        what = cls.WHAT
        obj = _unpack_map(data, what)
        num = (int, float)
        return cls(
            camera=_get(obj, "camera", str, what),
            frame_id=_get(obj, "frame_id", str, what),
            seq=_get(obj, "seq", int, what),
            ts=_get(obj, "ts", int, what),
            scored_ts=_get(obj, "scored_ts", int, what),
            score=_finite(_get(obj, "score", num, what, None), "score", what),
            score_norm=_finite(_get(obj, "score_norm", num, what, None), "score_norm", what),
            threshold=_finite(_get(obj, "threshold", num, what, None), "threshold", what),
            anomalous=_get(obj, "anomalous", bool, what),
            model=_get(obj, "model", str, what),
            latency_ms=_finite(_get(obj, "latency_ms", num, what), "latency_ms", what),
            status=_status(_get(obj, "status", str, what, "scored"), what),
            session=_get(obj, "session", str, what, ""),
            worker=_get(obj, "worker", str, what, ""),
        )


@dataclass(frozen=True)
class ShadowMsg:
    """One frame scored by a camera's shadow candidate, beside its live score (``{prefix}:{camera}:shadow``).

    ``model``/``score``/``threshold``/``anomalous`` are the candidate's; ``live_*`` are what the
    live model wrote to the score stream for the same frame. A shadow score never raises an alarm.
    """

    camera: str
    frame_id: str
    seq: int
    ts: int
    scored_ts: int
    model: str
    score: float
    threshold: float | None
    anomalous: bool
    live_model: str
    live_score: float
    live_threshold: float | None
    live_anomalous: bool
    worker: str = ""

    WHAT: ClassVar[str] = "shadow score message"

    def to_bytes(self) -> bytes:
        """Encode as the msgpack map stored in the ``msg`` field."""
        return msgpack.packb({"v": SCHEMA_VERSION, **self.__dict__}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "ShadowMsg":
        """Decode and validate a shadow score message."""
        what = cls.WHAT
        obj = _unpack_map(data, what)
        num = (int, float)
        return cls(
            camera=_get(obj, "camera", str, what),
            frame_id=_get(obj, "frame_id", str, what),
            seq=_get(obj, "seq", int, what),
            ts=_get(obj, "ts", int, what),
            scored_ts=_get(obj, "scored_ts", int, what),
            model=_get(obj, "model", str, what),
            score=_finite(_get(obj, "score", num, what), "score", what),
            threshold=_finite(_get(obj, "threshold", num, what, None), "threshold", what),
            anomalous=_get(obj, "anomalous", bool, what),
            live_model=_get(obj, "live_model", str, what),
            live_score=_finite(_get(obj, "live_score", num, what), "live_score", what),
            live_threshold=_finite(_get(obj, "live_threshold", num, what, None), "live_threshold", what),
            live_anomalous=_get(obj, "live_anomalous", bool, what),
            worker=_get(obj, "worker", str, what, ""),
        )


@dataclass(frozen=True)
class EventMsg:
    """An alarm or health event on ``{prefix}:alarms`` (also PUBLISHed on the channel of that name).

    ``type`` is one of :data:`EVENT_TYPES`. ``raised``/``cleared`` carry ``frame_id``, ``seq``,
    ``score``, ``threshold`` and ``model``; ``raised`` also carries ``image``, a small JPEG of the
    frame with the anomaly-map overlay (fre models). Health events carry ``reason``. The review
    events ``acknowledged``/``false_alarm`` (:data:`REVIEW_TYPES`, written by the console) carry the
    ``frame_id`` of the raised alarm, ``user`` and an optional ``comment``.
    """

    type: str
    camera: str
    ts: int
    frame_id: str | None = None
    seq: int | None = None
    score: float | None = None
    threshold: float | None = None
    model: str | None = None
    reason: str | None = None
    message: str | None = None
    image: bytes | None = None
    since_ts: int | None = None
    user: str | None = None
    comment: str | None = None

    WHAT: ClassVar[str] = "event message"

    def to_bytes(self) -> bytes:
        """Encode as the msgpack map stored in the ``msg`` field (fields that are None are left out)."""
        body = {k: v for k, v in self.__dict__.items() if v is not None}
        return msgpack.packb({"v": SCHEMA_VERSION, **body}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "EventMsg":
        """Decode and validate an event message."""
        what = cls.WHAT
        obj = _unpack_map(data, what)
        num = (int, float)
        return cls(
            type=_get(obj, "type", str, what),
            camera=_get(obj, "camera", str, what),
            ts=_get(obj, "ts", int, what),
            frame_id=_get(obj, "frame_id", str, what, None),
            seq=_get(obj, "seq", int, what, None),
            score=_finite(_get(obj, "score", num, what, None), "score", what),
            threshold=_finite(_get(obj, "threshold", num, what, None), "threshold", what),
            model=_get(obj, "model", str, what, None),
            reason=_get(obj, "reason", str, what, None),
            message=_get(obj, "message", str, what, None),
            image=_get(obj, "image", bytes, what, None),
            since_ts=_get(obj, "since_ts", int, what, None),
            user=_get(obj, "user", str, what, None),
            comment=_get(obj, "comment", str, what, None),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """Return the event as a JSON-friendly dict (the image as its byte count, not its bytes)."""
        out = {k: v for k, v in self.__dict__.items() if v is not None and k != "image"}
        if self.image is not None:
            out["image_bytes"] = len(self.image)
        return out


@dataclass(frozen=True)
class DeadLetterMsg:
    """Why a frame could not be scored; stored beside the original payload in ``{prefix}:deadletter``.

    The dead-letter entry has two fields: ``msg`` (this message) and ``payload`` (the first
    :data:`DEADLETTER_PAYLOAD_BYTES` of the original ``msg`` bytes of the frame entry, unchanged:
    the whole of a frame up to that size, so it can be inspected or replayed). ``size`` is the
    length of the original bytes (more than the ``payload``'s: it was cut); None in dead letters
    written before it existed.
    """

    camera: str
    frame_id: str
    reason: str
    error: str
    ts: int
    deliveries: int = 1
    worker: str = ""
    size: int | None = None

    WHAT: ClassVar[str] = "dead-letter message"

    def to_bytes(self) -> bytes:
        """Encode as the msgpack map stored in the ``msg`` field."""
        return msgpack.packb({"v": SCHEMA_VERSION, **self.__dict__}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "DeadLetterMsg":
        """Decode and validate a dead-letter message."""
        what = cls.WHAT
        obj = _unpack_map(data, what)
        return cls(
            camera=_get(obj, "camera", str, what),
            frame_id=_get(obj, "frame_id", str, what),
            reason=_get(obj, "reason", str, what),
            error=_get(obj, "error", str, what),
            ts=_get(obj, "ts", int, what),
            deliveries=_get(obj, "deliveries", int, what, 1),
            worker=_get(obj, "worker", str, what, ""),
            size=_get(obj, "size", int, what, None),
        )


RESULT_STATES = ("ok", "ng", "error")


@dataclass(frozen=True)
class ResultMsg:
    """The result of one part inspection (job), as written to ``{prefix}:{camera}:results``.

    ``state`` is ``ok``, ``ng`` (a frame of the window was anomalous) or ``error`` (then ``reason``
    says why and the score fields are None). ``result_id`` equals ``job_id``: one job, one result.
    """

    result_id: str
    job_id: str
    camera: str
    meas_id: str
    part_id: str
    state: str
    trigger_ts: int
    result_ts: int
    reason: str | None = None
    frames: int = 0
    frame_id: str | None = None
    score: float | None = None
    threshold: float | None = None
    model: str | None = None
    image: bytes | None = None
    image_overlay: bool = False
    want_frames: int | None = None
    window_ms: int | None = None
    source: str = "api"

    WHAT: ClassVar[str] = "result message"

    @property
    def latency_ms(self) -> float:
        """Trigger to result, in ms."""
        return max(0.0, (self.result_ts - self.trigger_ts) / 1e6)

    def to_bytes(self) -> bytes:
        """Encode as the msgpack map stored in the ``msg`` field (every key present, nil allowed)."""
        body = {"v": SCHEMA_VERSION, **self.__dict__, "latency_ms": self.latency_ms}
        return msgpack.packb(body, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "ResultMsg":
        """Decode and validate a result message."""
        what = cls.WHAT
        obj = _unpack_map(data, what)
        num = (int, float)
        state = _get(obj, "state", str, what)
        if state not in RESULT_STATES:
            raise WireError(f"{what}: 'state' must be one of {RESULT_STATES}, got {state!r}", "bad_message")
        return cls(
            result_id=_get(obj, "result_id", str, what),
            job_id=_get(obj, "job_id", str, what),
            camera=_get(obj, "camera", str, what),
            meas_id=_get(obj, "meas_id", str, what),
            part_id=_get(obj, "part_id", str, what),
            state=state,
            trigger_ts=_get(obj, "trigger_ts", int, what),
            result_ts=_get(obj, "result_ts", int, what),
            reason=_get(obj, "reason", str, what, None),
            frames=_get(obj, "frames", int, what, 0),
            frame_id=_get(obj, "frame_id", str, what, None),
            score=_finite(_get(obj, "score", num, what, None), "score", what),
            threshold=_finite(_get(obj, "threshold", num, what, None), "threshold", what),
            model=_get(obj, "model", str, what, None),
            image=_get(obj, "image", bytes, what, None),
            image_overlay=_get(obj, "image_overlay", bool, what, False),
            want_frames=_get(obj, "want_frames", int, what, None),
            window_ms=_get(obj, "window_ms", int, what, None),
            source=_get(obj, "source", str, what, "api"),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-friendly dict: the image as ``image_bytes`` (its size)."""
        out = {k: v for k, v in self.__dict__.items() if k != "image"}
        out["v"] = SCHEMA_VERSION
        out["latency_ms"] = round(self.latency_ms, 3)
        out["image_bytes"] = len(self.image) if self.image is not None else 0
        return out


@dataclass(frozen=True)
class AuditMsg:
    """One action of a console user, as written to ``{prefix}:audit`` (who, what, when, outcome)."""

    ts: int
    user: str
    role: str
    action: str
    target: str = ""
    detail: str = ""
    ok: bool = True

    WHAT: ClassVar[str] = "audit message"

    def to_bytes(self) -> bytes:
        """Encode as the msgpack map stored in the ``msg`` field."""
        return msgpack.packb({"v": SCHEMA_VERSION, **self.__dict__}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "AuditMsg":
        """Decode and validate an audit message."""
        what = cls.WHAT
        obj = _unpack_map(data, what)
        return cls(
            ts=_get(obj, "ts", int, what),
            user=_get(obj, "user", str, what),
            role=_get(obj, "role", str, what),
            action=_get(obj, "action", str, what),
            target=_get(obj, "target", str, what, ""),
            detail=_get(obj, "detail", str, what, ""),
            ok=_get(obj, "ok", bool, what, True),
        )


@dataclass(frozen=True)
class CandidateMsg:
    """A frame an operator marked a false alarm, kept in ``{prefix}:{camera}:candidates`` for the next fit.

    ``image`` is a JPEG: the frame itself when it was still in the frame stream (``source`` =
    ``"frame"``), else the raised event's picture (``source`` = ``"alarm_image"``, which may carry
    the anomaly-map overlay).
    """

    camera: str
    frame_id: str
    ts: int
    user: str
    source: str
    image: bytes

    WHAT: ClassVar[str] = "candidate message"

    def to_bytes(self) -> bytes:
        """Encode as the msgpack map stored in the ``msg`` field."""
        return msgpack.packb({"v": SCHEMA_VERSION, **self.__dict__}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "CandidateMsg":
        """Decode and validate a candidate message."""
        what = cls.WHAT
        obj = _unpack_map(data, what)
        return cls(
            camera=_get(obj, "camera", str, what),
            frame_id=_get(obj, "frame_id", str, what),
            ts=_get(obj, "ts", int, what),
            user=_get(obj, "user", str, what),
            source=_get(obj, "source", str, what),
            image=_get(obj, "image", bytes, what),
        )

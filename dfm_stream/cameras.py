"""The registered cameras as a site sees them, and removing the ones whose readers are gone.

A camera is *registered* by a field in ``{prefix}:cameras`` (its reader's JSON description) and
*alive* through its heartbeat in ``{prefix}:cameras:alive`` (:mod:`dfm_stream.liveness`). Readers
that stopped leave both behind; :func:`camera_statuses` says, per registered camera, whether it is
live, stale (and since when) or never seen, with its frame stream, the worker group's backlog and
the model it is assigned; :func:`remove_cameras` forgets cameras (and, with ``purge``, deletes
their per-camera keys). ``dfm-stream cameras`` is the command line of both.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from dfm_stream import keys, liveness, replies
from dfm_stream.consumer import LAG_COUNT_CAP, LAG_SCRIPT
from dfm_stream.errors import DfmStreamError

LIVE, STALE, NEVER_SEEN = "live", "stale", "never_seen"
"""A camera's state: its heartbeat is younger than ``liveness.ALIVE_TTL_S``, older, or absent."""


class CameraAdminError(DfmStreamError):
    """A camera to remove is unknown, or is live and may not be purged without ``force``."""


@dataclass
class CameraStatus:
    """One registered camera: registration, heartbeat, frame stream, worker group, model."""

    camera: str
    state: str
    last_seen_ts: float | None = None
    last_seen_age_s: float | None = None
    reader_state: str | None = None
    host: str | None = None
    pid: int | None = None
    source: str | None = None
    frames: int | None = None
    last_frame_ts: float | None = None
    last_frame_age_s: float | None = None
    pending: int | None = None
    lag: int | None = None
    model: str | None = None
    config_model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)


def _text(value: bytes | str) -> str:
    """Return a reply value as str; bytes that are not UTF-8 (names written by others) still list."""
    return replies.text(value, errors="replace")


def heartbeats(client: Any, prefix: str = keys.DEFAULT_PREFIX) -> dict[str, float]:
    """Return camera -> Unix time (s) of its last heartbeat."""
    return {
        _text(c): float(t) for c, t in client.zrange(keys.cameras_alive_key(prefix), 0, -1, withscores=True)
    }


def state_of(seen: float | None, now: float) -> str:
    """Return :data:`LIVE`, :data:`STALE` or :data:`NEVER_SEEN` for a heartbeat at ``seen``."""
    if seen is None:
        return NEVER_SEEN
    return LIVE if now - seen < liveness.ALIVE_TTL_S else STALE


def camera_statuses(
    client: Any, prefix: str = keys.DEFAULT_PREFIX, group: str = keys.DEFAULT_GROUP
) -> list[CameraStatus]:
    """Return the status of every camera registered in ``{prefix}:cameras``, sorted by id."""
    now = time.time()
    registered = {_text(c): _text(d) for c, d in client.hgetall(keys.cameras_key(prefix)).items()}
    beats = heartbeats(client, prefix)
    assigned = {_text(c): _text(m) for c, m in client.hgetall(keys.assignments_key(prefix)).items()}
    lag_script = client.register_script(LAG_SCRIPT)
    out = []
    for camera in sorted(registered):
        seen = beats.get(camera)
        status = CameraStatus(camera, state_of(seen, now), model=assigned.get(camera))
        if seen is not None:
            status.last_seen_ts, status.last_seen_age_s = seen, max(0.0, now - seen)
        _describe(status, registered[camera])
        if keys.valid_name(camera):
            _stream(client, status, prefix, group, lag_script, now)
        out.append(status)
    return out


def _describe(status: CameraStatus, raw: str) -> None:
    """Fill in what the reader registered (a description that is not JSON leaves them empty)."""
    try:
        desc = json.loads(raw)
    except ValueError:
        return
    if not isinstance(desc, dict):
        return
    source = desc.get("source")
    status.source = source.get("kind") if isinstance(source, dict) else None
    status.reader_state = desc.get("state") if isinstance(desc.get("state"), str) else None
    status.host = desc.get("host") if isinstance(desc.get("host"), str) else None
    status.pid = desc.get("pid") if isinstance(desc.get("pid"), int) else None
    status.config_model = desc.get("model") if isinstance(desc.get("model"), str) else None


def _stream(client: Any, status: CameraStatus, prefix: str, group: str, lag_script: Any, now: float) -> None:
    """Fill in the frame stream's length, its newest entry and the group's pending and lag."""
    key = keys.frames_key(status.camera, prefix)
    pipe = client.pipeline(transaction=False)
    pipe.xlen(key)
    pipe.xrevrange(key, "+", "-", count=1)
    length, newest = pipe.execute()
    status.frames = int(length)
    if newest:
        ms = int(_text(newest[0][0]).split("-", 1)[0])
        status.last_frame_ts = ms / 1000
        status.last_frame_age_s = max(0.0, now - ms / 1000)
    lag, pending = lag_script(keys=[key], args=[group, LAG_COUNT_CAP])
    if int(lag) >= 0:
        status.lag, status.pending = int(lag), int(pending)


def camera_keys(client: Any, camera: str, prefix: str = keys.DEFAULT_PREFIX) -> list[str]:
    """Return the existing keys of ``camera`` (``{prefix}:{CAM}:*``: frames, scores, alarm state...)."""
    if not keys.valid_name(camera):
        return []
    known = [
        keys.frames_key(camera, prefix),
        keys.scores_key(camera, prefix),
        keys.alarm_state_key(camera, prefix),
        keys.event_outbox_key(camera, prefix),
        keys.seq_key(camera, prefix),
    ]
    found = {_text(k) for k in client.scan_iter(match=_glob_escape(f"{prefix}:{{{camera}}}:") + "*")}
    return sorted(found | {k for k in known if client.exists(k)})


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


@dataclass
class Removal:
    """What :func:`remove_cameras` did to one camera."""

    camera: str
    was: str
    registered: bool
    deleted_keys: list[str]
    model: str | None


def remove_cameras(
    client: Any,
    cameras: list[str],
    prefix: str = keys.DEFAULT_PREFIX,
    purge: bool = False,
    force: bool = False,
) -> list[Removal]:
    """Forget ``cameras``: their ``{prefix}:cameras`` field and heartbeat; with ``purge``, their keys too.

    Every camera is checked before anything is removed: an unknown one (no registration, no
    heartbeat, and with ``purge`` no keys) raises :class:`CameraAdminError`, and so does purging a
    live camera unless ``force``. The model assignment is kept (``dfm-stream model unassign``).
    """
    now = time.time()
    registered = client.hmget(keys.cameras_key(prefix), cameras) if cameras else []
    beats = heartbeats(client, prefix)
    assigned = client.hmget(keys.assignments_key(prefix), cameras) if cameras else []
    plans = []
    for camera, reg, model in zip(cameras, registered, assigned, strict=True):
        found = camera_keys(client, camera, prefix) if purge else []
        was = state_of(beats.get(camera), now)
        if reg is None and camera not in beats and not found:
            raise CameraAdminError(f"no camera {camera!r} under prefix {prefix!r}: nothing to remove")
        if purge and was == LIVE and not force:
            age = now - beats[camera]
            raise CameraAdminError(
                f"camera {camera!r} is live (heartbeat {age:.0f} s ago): stop its reader before purging"
                " its streams, or add --force"
            )
        plans.append(Removal(camera, was, reg is not None, found, _text(model) if model else None))
    for plan in plans:
        client.hdel(keys.cameras_key(prefix), plan.camera)
        client.zrem(keys.cameras_alive_key(prefix), plan.camera)
        for key in plan.deleted_keys:
            client.delete(key)
    return plans

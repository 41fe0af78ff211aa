"""What the console reads from Redis: cameras, frames, score statistics, alarms, health, the registry.

Every function takes a binary-reply client and the key prefix, reads with bounded commands
(``COUNT`` on every range) and returns plain dicts the templates and the JSON endpoints use.
Messages are decoded with :mod:`dfm_stream.wire`; an entry that does not decode is skipped.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import redis

from dfm_stream import keys, replies
from dfm_stream.errors import RegistryError, WireError
from dfm_stream.promotion import Promotions
from dfm_stream.registry import ModelRegistry
from dfm_stream.replies import text
from dfm_stream.shadow import read_comparison
from dfm_stream.wire import FIELD, DeadLetterMsg, EventMsg, FrameMsg, ScoreMsg

if TYPE_CHECKING:
    from dfm_stream.connect import RedisClient

log = logging.getLogger(__name__)

STATS_SCORES = 300
"""Score entries read per camera for fps and latency p99 (the newest ones)."""
STATS_WINDOW_S = 10.0
"""fps is counted over the scores of this many seconds."""
UP_WITHIN_S = 10.0
"""A camera counts as up while its newest frame is at most this old."""
_F = FIELD.encode()


def entry_ms(entry_id: str) -> int:
    """Return the millisecond timestamp part of a stream entry id."""
    return int(entry_id.split("-", 1)[0])


def registered_cameras(client: RedisClient, prefix: str) -> dict[str, dict[str, Any]]:
    """Return camera id -> the JSON description in ``{prefix}:cameras`` (``{}`` when not JSON)."""
    out = {}
    for cam, raw in client.hgetall(keys.cameras_key(prefix)).items():
        name = text(cam)
        if not keys.valid_name(name):
            continue
        try:
            desc = json.loads(raw)
        except ValueError:
            desc = {}
        out[name] = desc if isinstance(desc, dict) else {}
    return out


def streamed_cameras(client: RedisClient, prefix: str) -> set[str]:
    """Return the cameras that have a frame or score stream (SCAN; for producers that do not register)."""
    found = set()
    head = f"{prefix}:{{"
    for key in client.scan_iter(match=f"{prefix}:{{*}}:*", count=500):
        name = text(key)
        cam, _, what = name[len(head) :].rpartition("}:")
        if what in ("frames", "scores") and keys.valid_name(cam):
            found.add(cam)
    return found


def recent_scores(client: RedisClient, prefix: str, camera: str, count: int) -> list[tuple[str, ScoreMsg]]:
    """Return up to ``count`` newest ``(entry id, score)`` of ``camera``, oldest first."""
    out = []
    for entry_id, fields in reversed(replies.xrevrange(client, keys.scores_key(camera, prefix), count=count)):
        try:
            out.append((text(entry_id), ScoreMsg.from_bytes(fields[_F])))
        except (KeyError, WireError):
            continue
    return out


def scores_after(client: RedisClient, prefix: str, camera: str, after: str, count: int = 2000) -> list[dict]:
    """Return ``camera``'s scores after entry id ``after`` as ``{id, t, score, threshold, anomalous}``."""
    rows = replies.xrange(client, keys.scores_key(camera, prefix), f"({after}", count=count)
    out = []
    for entry_id, fields in rows:
        try:
            msg = ScoreMsg.from_bytes(fields[_F])
        except (KeyError, WireError):
            continue
        if msg.score is None:
            continue
        eid = text(entry_id)
        point = {"id": eid, "t": entry_ms(eid), "score": msg.score, "threshold": msg.threshold}
        out.append({**point, "anomalous": msg.anomalous})
    return out


def score_stats(scores: list[tuple[str, ScoreMsg]], now_ms: int) -> dict[str, Any]:
    """Return fps, latency p99, the last score/threshold/model of a camera's recent scores."""
    if not scores:
        return {"fps": 0.0, "p99_ms": None, "score": None, "threshold": None, "model": "", "last_ms": None}
    window = [m for eid, m in scores if entry_ms(eid) >= now_ms - STATS_WINDOW_S * 1000]
    latencies = [m.latency_ms for _, m in scores]
    last_id, last = scores[-1]
    scored = [m for _, m in scores if m.score is not None]
    ref = scored[-1] if scored else last
    return {
        "fps": round(len(window) / STATS_WINDOW_S, 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "score": ref.score,
        "threshold": ref.threshold,
        "anomalous": ref.anomalous,
        "model": last.model,
        "last_ms": entry_ms(last_id),
        "last_id": last_id,
    }


_LAST_ID = (
    "local r = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)\n"
    "if r[1] then return r[1][1] end\nreturn false"
)
"""The id of a stream's newest entry, without sending its data (a frame can be tens of KiB)."""


def last_frame_ms(client: RedisClient, prefix: str, camera: str) -> int | None:
    """Return when the newest frame of ``camera`` was added (Unix ms), or None without frames."""
    last = client.eval(_LAST_ID, 1, keys.frames_key(camera, prefix))
    return entry_ms(text(last)) if last else None


def scores_since(
    client: RedisClient, prefix: str, camera: str, after: str, count: int = STATS_SCORES
) -> list[tuple[str, ScoreMsg]]:
    """Return up to ``count`` ``(entry id, score)`` of ``camera`` after entry id ``after``, oldest first.

    The first call (``after`` = ``""``) returns the newest ``count``; later ones only what is new.
    """
    if not after:
        return recent_scores(client, prefix, camera, count)
    out = []
    for entry_id, fields in replies.xrange(client, keys.scores_key(camera, prefix), f"({after}", count=count):
        try:
            out.append((text(entry_id), ScoreMsg.from_bytes(fields[_F])))
        except (KeyError, WireError):
            continue
    return out


def camera_state(
    client: RedisClient,
    prefix: str,
    camera: str,
    desc: dict[str, Any],
    scores: list[tuple[str, ScoreMsg]] | None = None,
) -> dict[str, Any]:
    """Return what a tile shows: up/down, fps, p99, last score vs threshold, alarm, model.

    A camera is up while frames keep arriving (the newest less than :data:`UP_WITHIN_S` old) and its
    reader, if it registered one, does not say otherwise; ``state`` says why (the reader's state,
    ``stale`` when frames stopped though the reader said up, ``no frames`` without a reader).
    ``scores`` are the camera's recent scores, oldest first, when the caller keeps them already.
    """
    now_ms = int(time.time() * 1000)
    if scores is None:
        scores = recent_scores(client, prefix, camera, STATS_SCORES)
    stats = score_stats(scores, now_ms)
    active = client.hget(keys.alarm_state_key(camera, prefix), "active")
    frame_ms = last_frame_ms(client, prefix, camera)
    fresh = frame_ms is not None and now_ms - frame_ms < UP_WITHIN_S * 1000
    reader_state = desc.get("state") if isinstance(desc.get("state"), str) else None
    if reader_state:
        up = reader_state == "up" and fresh
        state = "stale" if reader_state == "up" and not fresh else reader_state
    else:
        up, state = fresh, ("frames flowing" if fresh else "no frames")
    return {
        "camera": camera,
        "up": bool(up),
        "state": state,
        "alarm": active is not None and text(active) == "1",
        "last_frame_ms": frame_ms,
        **stats,
    }


def latest_frame_jpeg(client: RedisClient, prefix: str, camera: str) -> bytes | None:
    """Return the newest frame of ``camera`` as JPEG bytes (raw frames are encoded), or None."""
    rows = replies.xrevrange(client, keys.frames_key(camera, prefix), count=1)
    if not rows:
        return None
    return frame_jpeg(rows[0][1])


def frame_jpeg(fields: dict[bytes, bytes]) -> bytes | None:
    """Return the JPEG of one frame entry (raw pixels are encoded); None when it does not decode."""
    try:
        msg = FrameMsg.from_bytes(fields[_F])
    except (KeyError, WireError):
        return None
    if msg.enc == "jpeg":
        return msg.data
    image = np.frombuffer(msg.data, np.uint8).reshape(msg.h, msg.w, msg.c)
    if msg.pix == "rgb":
        image = image[:, :, ::-1]
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return buf.tobytes() if ok else None


def event_at(client: RedisClient, prefix: str, entry_id: str) -> EventMsg | None:
    """Return the event stored at ``entry_id`` in ``{prefix}:alarms``, or None."""
    try:
        rows = replies.xrange(client, keys.alarms_key(prefix), entry_id, entry_id, count=1)
    except redis.ResponseError:  # not a valid stream id
        return None
    try:
        return EventMsg.from_bytes(rows[0][1][_F]) if rows else None
    except (KeyError, WireError):
        return None


def alarm_events(
    client: RedisClient,
    prefix: str,
    camera: str = "",
    since_ms: int | None = None,
    until_ms: int | None = None,
    types: tuple[str, ...] = ("raised",),
    limit: int = 200,
    scan: int = 5000,
) -> list[tuple[str, EventMsg]]:
    """Return up to ``limit`` events of ``types`` (newest first), filtered by camera and time."""
    top = str(until_ms) if until_ms is not None else "+"
    bottom = str(since_ms) if since_ms is not None else "-"
    out = []
    for entry_id, fields in replies.xrevrange(client, keys.alarms_key(prefix), scan, end=top, start=bottom):
        try:
            event = EventMsg.from_bytes(fields[_F])
        except (KeyError, WireError):
            continue
        if event.type in types and (not camera or event.camera == camera):
            out.append((text(entry_id), event))
            if len(out) >= limit:
                break
    return out


def event_json(entry_id: str, event: EventMsg) -> dict[str, Any]:
    """Return an event as JSON for the pages (the image as a URL, not bytes)."""
    out = {"id": entry_id, **event.to_json_dict()}
    out.pop("image_bytes", None)
    out["has_image"] = event.image is not None
    return out


def workers(client: RedisClient, prefix: str) -> list[dict[str, Any]]:
    """Return the live workers (heartbeat keys) with the seconds their heartbeat has left."""
    out = []
    head = keys.worker_heartbeat_key("", prefix)
    for key in client.scan_iter(match=f"{head}*", count=500):
        name = text(key)[len(head) :]
        out.append({"name": name, "ttl_s": int(client.ttl(key))})
    return sorted(out, key=lambda w: w["name"])


def stream_lag(client: RedisClient, prefix: str, camera: str) -> dict[str, Any]:
    """Return length, consumer-group lag and pending count of ``camera``'s frame stream."""
    key = keys.frames_key(camera, prefix)
    try:
        length = int(client.xlen(key))
        groups = client.xinfo_groups(key)
    except redis.ResponseError:
        return {"camera": camera, "length": 0, "lag": None, "pending": None}
    group = next((g for g in groups if text(g["name"]) == keys.DEFAULT_GROUP), None)
    lag = group.get("lag") if group else None
    return {
        "camera": camera,
        "length": length,
        "lag": int(lag) if lag is not None else None,
        "pending": int(group["pending"]) if group else None,
    }


def dead_letters(client: RedisClient, prefix: str, count: int = 50) -> list[dict[str, Any]]:
    """Return the newest dead letters (without their payload), newest first."""
    out = []
    for entry_id, fields in replies.xrevrange(client, keys.deadletter_key(prefix), count=count):
        try:
            msg = DeadLetterMsg.from_bytes(fields[_F])
        except (KeyError, WireError):
            continue
        out.append({"id": text(entry_id), **msg.__dict__})
    return out


def registry_view(client: RedisClient, prefix: str) -> dict[str, Any]:
    """Return every model with its versions and current version, and the camera assignments."""
    reg = ModelRegistry(client, prefix)
    models = []
    for name in reg.names():
        try:
            models.append({"name": name, "current": reg.current(name), "versions": reg.versions(name)})
        except RegistryError as e:
            log.warning("console: model %s is unreadable: %s", name, e)
            models.append({"name": name, "current": None, "versions": [], "error": str(e)})
    assignments = {cam: str(ref) for cam, ref in sorted(reg.assignments().items())}
    return {"models": models, "assignments": assignments}


SHADOW_DISAGREEMENTS_SHOWN = 10
"""Latest disagreeing frames the camera page lists."""


def shadow_view(client: RedisClient, prefix: str, camera: str) -> dict[str, Any] | None:
    """Return ``camera``'s shadow candidate and its comparison (what ``model compare`` reads), or None.

    The comparison is :func:`dfm_stream.shadow.read_comparison`'s, for the candidate pinned now
    (:meth:`dfm_stream.promotion.Promotions.shadow_of`). ``previous`` is what ``model rollback
    --camera`` would restore ("" none recorded: nothing to roll back).
    """
    reg = ModelRegistry(client, prefix)
    candidate = Promotions(reg).shadow_of(camera)
    if candidate is None:
        return None
    result = read_comparison(client, camera, prefix)
    return {
        "candidate": str(candidate),
        "live": str(reg.assignments().get(camera) or result.live_model or "unassigned"),
        "frames": result.frames,
        "agreement": result.agreement,
        "agree": result.agree,
        "only_live": result.only_live,
        "only_shadow": result.only_shadow,
        "pearson": result.pearson,
        "spearman": result.spearman,
        "spearman_frames": result.spearman_frames,
        "disagreements": result.disagreements[:SHADOW_DISAGREEMENTS_SHOWN],
    }

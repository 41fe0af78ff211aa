"""What the console writes to Redis: reviews of alarms, candidate good frames, the audit stream.

* ``{prefix}:reviews`` (hash): frame id of a raised alarm -> JSON ``{"decision", "user",
  "comment", "ts", "camera", "alarm_id"}``; the latest review of an alarm wins.
* ``{prefix}:alarms``: each review is also published as an ``acknowledged`` / ``false_alarm``
  event (stream + channel), so every console and any other consumer sees it.
* ``{prefix}:{CAM}:candidates`` (stream, ``MAXLEN ~`` :data:`CANDIDATES_MAXLEN`): the JPEG of a
  frame marked false alarm, a candidate good sample for the next fit.
* ``{prefix}:audit`` (stream, ``MAXLEN ~`` :data:`AUDIT_MAXLEN`): who did what, when.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from dfm_stream import keys, replies
from dfm_stream.alarms import publish_event
from dfm_stream.console.queries import event_at, frame_jpeg
from dfm_stream.errors import ConsoleError
from dfm_stream.replies import text as _s
from dfm_stream.wire import FIELD, REVIEW_TYPES, AuditMsg, CandidateMsg, EventMsg, split_frame_id

if TYPE_CHECKING:
    from dfm_stream.connect import RedisClient

AUDIT_MAXLEN = 100_000
CANDIDATES_MAXLEN = 1_000
MAX_COMMENT = 500


def audit(
    client: RedisClient,
    prefix: str,
    user: str,
    role: str,
    action: str,
    target: str = "",
    detail: str = "",
    ok: bool = True,
) -> str:
    """Append one action to ``{prefix}:audit``; return its entry id."""
    msg = AuditMsg(time.time_ns(), user, role, action, target, detail[:MAX_COMMENT], ok)
    entry_id = client.xadd(
        keys.audit_key(prefix), {FIELD: msg.to_bytes()}, maxlen=AUDIT_MAXLEN, approximate=True
    )
    return _s(entry_id)


def reviews(client: RedisClient, prefix: str, frame_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Return frame id -> review for those of ``frame_ids`` that were reviewed."""
    if not frame_ids:
        return {}
    out = {}
    for frame_id, raw in zip(frame_ids, client.hmget(keys.reviews_key(prefix), frame_ids), strict=True):
        if raw is not None:
            try:
                out[frame_id] = json.loads(raw)
            except ValueError:
                continue
    return out


def review_alarm(
    client: RedisClient, prefix: str, alarm_id: str, decision: str, user: str, comment: str = ""
) -> dict[str, Any]:
    """Store and publish an operator's decision on the raised alarm at ``alarm_id`` in ``{prefix}:alarms``.

    A ``false_alarm`` also keeps the frame's JPEG in the camera's candidates stream. Returns the review.
    """
    if decision not in REVIEW_TYPES:
        raise ConsoleError(f"decision {decision!r} is not one of {', '.join(REVIEW_TYPES)}")
    event = event_at(client, prefix, alarm_id)
    if event is None or event.type != "raised" or not event.frame_id:
        raise ConsoleError(f"no raised alarm with id {alarm_id!r} in {keys.alarms_key(prefix)}")
    comment = comment.strip()[:MAX_COMMENT]
    now = time.time_ns()
    review = {
        "decision": decision,
        "user": user,
        "comment": comment,
        "ts": now,
        "camera": event.camera,
        "alarm_id": alarm_id,
    }
    if decision == "false_alarm":
        review["kept"] = keep_candidate(client, prefix, event, user)
    client.hset(keys.reviews_key(prefix), event.frame_id, json.dumps(review))
    published = EventMsg(
        type=decision,
        camera=event.camera,
        ts=now,
        frame_id=event.frame_id,
        seq=event.seq,
        score=event.score,
        threshold=event.threshold,
        model=event.model,
        user=user,
        comment=comment or None,
    )
    publish_event(client, published, prefix)
    return review


def keep_candidate(client: RedisClient, prefix: str, event: EventMsg, user: str) -> str:
    """Keep the JPEG of a false alarm's frame; return ``frame``, ``alarm_image`` or ``""`` (nothing kept).

    The frame itself is taken from the frame stream while it is still there (``MAXLEN`` keeps about
    10 s); later, the raised event's picture is kept instead.
    """
    camera, entry_id = split_frame_id(event.frame_id or "")
    rows = replies.xrange(client, keys.frames_key(camera, prefix), entry_id, entry_id, count=1)
    image = frame_jpeg(rows[0][1]) if rows else None
    source = "frame"
    if image is None:
        image, source = event.image, "alarm_image"
    if image is None:
        return ""
    msg = CandidateMsg(camera, event.frame_id or "", time.time_ns(), user, source, image)
    client.xadd(
        keys.candidates_key(camera, prefix),
        {FIELD: msg.to_bytes()},
        maxlen=CANDIDATES_MAXLEN,
        approximate=True,
    )
    return source

"""The dead-letter stream: frames that cannot be scored, kept with their original bytes and a reason.

Reasons: the :class:`~dfm_stream.errors.WireError` reasons of the frame codec (``bad_msgpack``,
``bad_message`` — also a missing ``msg`` field —, ``unsupported_version``, ``too_large``,
``shape_mismatch``, ``decode_error``, ``oversized``) and ``max_deliveries`` (a frame delivered more than
``--max-deliveries`` times, e.g. one that keeps crashing workers).

The entry is written first and the frame acknowledged after (two commands: the dead-letter stream
is in another cluster slot than the frame stream), so a crash in between gives a second dead-letter
entry for the same ``frame_id`` rather than a lost one.
"""

from __future__ import annotations

import logging
import time

from dfm_stream import keys
from dfm_stream.connect import RedisClient
from dfm_stream.consumer import StreamEntry
from dfm_stream.wire import FIELD, DeadLetterMsg, make_frame_id

log = logging.getLogger(__name__)

DEADLETTER_MAXLEN = 10_000


def send_to_deadletter(
    client: RedisClient,
    entry: StreamEntry,
    reason: str,
    error: str,
    group: str = keys.DEFAULT_GROUP,
    prefix: str = keys.DEFAULT_PREFIX,
    worker: str = "",
    maxlen: int = DEADLETTER_MAXLEN,
) -> DeadLetterMsg:
    """XADD ``entry`` (``msg``: why; ``payload``: original bytes) to the dead-letter stream, then XACK."""
    msg = DeadLetterMsg(
        camera=entry.camera,
        frame_id=make_frame_id(entry.camera, entry.entry_id),
        reason=reason,
        error=error[:2000],
        ts=time.time_ns(),
        deliveries=entry.deliveries,
        worker=worker,
    )
    payload = entry.payload if entry.payload is not None else entry.raw
    client.xadd(
        keys.deadletter_key(prefix),
        {FIELD: msg.to_bytes(), "payload": payload},
        maxlen=maxlen,
        approximate=True,
    )
    client.xack(keys.frames_key(entry.camera, prefix), group, entry.entry_id)
    log.warning("camera %s: frame %s dead-lettered (%s): %s", entry.camera, msg.frame_id, reason, error[:200])
    return msg

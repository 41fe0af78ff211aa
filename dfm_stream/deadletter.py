"""The dead-letter stream: frames that cannot be scored, kept with a reason and their first bytes.

A dead letter keeps at most :data:`~dfm_stream.wire.DEADLETTER_PAYLOAD_BYTES` of the original
``msg`` (a prefix, unchanged: a frame up to that size whole) and its full length as ``size``, so a
camera that writes huge entries costs the dead-letter stream a bounded amount per entry, and
``MAXLEN`` bounds its memory. An entry the read script refused (too large, see
:mod:`dfm_stream.read_script`) reaches the worker with that prefix only.

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
from dfm_stream.wire import DEADLETTER_PAYLOAD_BYTES, FIELD, DeadLetterMsg, make_frame_id

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
    """XADD ``entry`` (``msg``: why; ``payload``: its first bytes) to the dead-letter stream, then XACK."""
    msg = DeadLetterMsg(
        camera=entry.camera,
        frame_id=make_frame_id(entry.camera, entry.entry_id),
        reason=reason,
        error=error[:2000],
        ts=time.time_ns(),
        deliveries=entry.deliveries,
        worker=worker,
        size=entry.size,
    )
    original = entry.payload if entry.payload is not None else entry.raw
    client.xadd(
        keys.deadletter_key(prefix),
        {FIELD: msg.to_bytes(), "payload": original[:DEADLETTER_PAYLOAD_BYTES]},
        maxlen=maxlen,
        approximate=True,
    )
    client.xack(keys.frames_key(entry.camera, prefix), group, entry.entry_id)
    log.warning("camera %s: frame %s dead-lettered (%s): %s", entry.camera, msg.frame_id, reason, error[:200])
    return msg

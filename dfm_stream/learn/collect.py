"""Picking a camera's frames for enrolment out of Redis, without touching the workers' consumer group.

Everything here reads with ``XRANGE`` / ``XREVRANGE`` in pages of :data:`PAGE` entries: no
consumer group, no ``XACK``, no blocking call, so the workers never see it and it never waits for
them. Three sources, each yielding :class:`EnrolFrame` one at a time (memory: one page):

* :func:`good_live_frames`: the newest frames of ``{prefix}:{CAM}:frames`` whose score in
  ``{prefix}:{CAM}:scores`` says ``scored`` and not ``anomalous``. A frame's score is written after
  the frame, so its entry id is higher: both streams are read newest first, the scores only as far
  back as the frame being looked at. Frames with no score yet (in flight, or trimmed out of the
  score stream), skipped ones and anomalous ones are counted and left out.
* :func:`window_frames`: every frame whose entry id (the Redis server's clock when the reader
  wrote it) lies in an operator-vouched time window.
* :func:`false_alarm_frames`: the frames operators marked false alarm in the console
  (``{prefix}:{CAM}:candidates``). Only candidates that kept the frame itself are used: those that
  kept the raised event's picture (``source`` ``alarm_image``) may carry the anomaly-map overlay.

The frame stream is trimmed (``MAXLEN ~``, about 10 s of frames by default): fewer frames than
asked is normal, and :class:`Tally` says how many were looked at and why each was left out.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dfm_stream import keys, replies
from dfm_stream.errors import ConfigError, WireError
from dfm_stream.frame_codec import decode_frame
from dfm_stream.replies import text
from dfm_stream.wire import FIELD, CandidateMsg, FrameMsg, ScoreMsg, ScoreStatus, make_frame_id

if TYPE_CHECKING:
    import numpy as np

    from dfm_stream.connect import RedisClient

log = logging.getLogger(__name__)

PAGE = 100
"""Entries per XRANGE/XREVRANGE call: a page of frames is at most ~100 JPEGs in memory."""

_MSG = FIELD.encode()


@dataclass(frozen=True)
class EnrolFrame:
    """One selected frame: where it came from and its image, as the camera sent it."""

    frame_id: str
    entry_id: str
    ts: int
    """Capture time, Unix ns (from the frame message; the candidate's review time for a false alarm)."""
    source: str
    """``stream`` (the frame stream) or ``false_alarm`` (the console's candidates stream)."""
    image: np.ndarray | None = None
    """Decoded RGB uint8 HxWx3 for a stream frame (raw or JPEG); None when ``jpeg`` holds it."""
    jpeg: bytes | None = None
    """The JPEG as stored, for a false-alarm candidate."""
    reviewer: str = ""


@dataclass
class Tally:
    """What a selection looked at and why frames were left out (reason -> count)."""

    looked_at: int = 0
    kept: int = 0
    left_out: Counter[str] = field(default_factory=Counter)

    def leave_out(self, reason: str) -> None:
        """Count one frame left out for ``reason``."""
        self.left_out[reason] += 1

    def describe(self) -> str:
        """One line: ``kept K of L looked at (left out: anomalous 3, unscored 2)``."""
        reasons = ", ".join(f"{why} {n}" for why, n in sorted(self.left_out.items()))
        return f"kept {self.kept} of {self.looked_at} looked at" + (
            f" (left out: {reasons})" if reasons else ""
        )


def check_camera(client: RedisClient, camera: str, prefix: str, where: str) -> None:
    """Refuse a camera Redis has no frame, score or candidate stream for, naming the cameras it has."""
    try:
        stream_keys = [keys.frames_key(camera, prefix), keys.scores_key(camera, prefix)]
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if client.exists(*stream_keys, keys.candidates_key(camera, prefix)):
        return
    known = {text(name) for name in client.hkeys(keys.cameras_key(prefix))}
    for key in client.scan_iter(match=f"{prefix}:{{*}}:frames", count=500):
        name = text(key)[len(prefix) + 2 : -len("}:frames")]
        if keys.valid_name(name):
            known.add(name)
    listing = ", ".join(sorted(known)) or "none (no reader has written frames under this --prefix)"
    raise ConfigError(f"no camera {camera!r} in {where} (prefix {prefix!r}): cameras with frames: {listing}")


def _decode(camera: str, entry_id: str, fields: dict[bytes, bytes], tally: Tally) -> EnrolFrame | None:
    try:
        msg = FrameMsg.from_bytes(fields.get(_MSG, b""))
        image = decode_frame(msg)
    except WireError as e:
        log.warning("camera %s: frame %s left out: %s", camera, entry_id, e)
        tally.leave_out("undecodable")
        return None
    return EnrolFrame(make_frame_id(camera, entry_id), entry_id, msg.ts, "stream", image=image)


def _older(a: str, b: str) -> bool:
    """Tell whether stream id ``a`` is older than ``b``."""
    ma, _, sa = a.partition("-")
    mb, _, sb = b.partition("-")
    return (int(ma), int(sa or 0)) < (int(mb), int(sb or 0))


def _before(entry_id: str) -> str:
    """Return the exclusive bound just below ``entry_id`` for the next XREVRANGE page."""
    return f"({entry_id}"


class _ScoreIndex:
    """The score stream read newest first, as far back as the frames looked at so far need."""

    def __init__(self, client: RedisClient, key: str) -> None:
        self.client = client
        self.key = key
        self.cursor = "+"
        self.exhausted = False
        self.verdicts: dict[str, ScoreMsg | None] = {}

    def verdict(self, frame_id: str, entry_id: str) -> ScoreMsg | None:
        """Return the score of ``frame_id`` (None: no score, or an unreadable one)."""
        while not self.exhausted and (self.cursor == "+" or not _older(self.cursor, entry_id)):
            self._page()
        return self.verdicts.pop(frame_id, None)

    def _page(self) -> None:
        end = self.cursor if self.cursor == "+" else _before(self.cursor)
        rows = replies.xrevrange(self.client, self.key, count=PAGE, end=end)
        if not rows:
            self.exhausted = True
            return
        for _, fields in rows:
            try:
                score = ScoreMsg.from_bytes(fields.get(_MSG, b""))
            except WireError:
                continue
            self.verdicts[score.frame_id] = score
        self.cursor = text(rows[-1][0])


def good_live_frames(
    client: RedisClient, camera: str, prefix: str, want: int, tally: Tally
) -> Iterator[EnrolFrame]:
    """Yield up to ``want`` of the newest frames scored not anomalous, newest first."""
    scores = _ScoreIndex(client, keys.scores_key(camera, prefix))
    key = keys.frames_key(camera, prefix)
    end = "+"
    while tally.kept < want:
        rows = replies.xrevrange(client, key, count=PAGE, end=end)
        if not rows:
            return
        for raw_id, fields in rows:
            entry_id = text(raw_id)
            tally.looked_at += 1
            score = scores.verdict(make_frame_id(camera, entry_id), entry_id)
            if score is None:
                tally.leave_out("unscored")
            elif score.status is not ScoreStatus.SCORED:
                tally.leave_out("skipped by the worker")
            elif score.anomalous:
                tally.leave_out("anomalous")
            elif (frame := _decode(camera, entry_id, fields, tally)) is not None:
                tally.kept += 1
                yield frame
                if tally.kept >= want:
                    return
        end = _before(text(rows[-1][0]))


def window_frames(
    client: RedisClient, camera: str, prefix: str, start: str, end: str, want: int | None, tally: Tally
) -> Iterator[EnrolFrame]:
    """Yield the frames with entry ids in ``[start, end]`` (oldest first), at most ``want``."""
    key = keys.frames_key(camera, prefix)
    while want is None or tally.kept < want:
        rows = replies.xrange(client, key, start, end, count=PAGE)
        if not rows:
            return
        for raw_id, fields in rows:
            tally.looked_at += 1
            frame = _decode(camera, text(raw_id), fields, tally)
            if frame is not None:
                tally.kept += 1
                yield frame
                if want is not None and tally.kept >= want:
                    return
        start = f"({text(rows[-1][0])}"


def false_alarm_frames(
    client: RedisClient, camera: str, prefix: str, start: str, end: str, tally: Tally
) -> Iterator[EnrolFrame]:
    """Yield the frames marked false alarm whose review lies in ``[start, end]``, oldest first."""
    key = keys.candidates_key(camera, prefix)
    seen: set[str] = set()
    while True:
        rows = replies.xrange(client, key, start, end, count=PAGE)
        if not rows:
            return
        for _, fields in rows:
            tally.looked_at += 1
            try:
                msg = CandidateMsg.from_bytes(fields.get(_MSG, b""))
            except WireError:
                tally.leave_out("unreadable")
                continue
            if msg.source != "frame":
                tally.leave_out("only the alarm picture was kept")
            elif msg.frame_id in seen:
                tally.leave_out("marked twice")
            else:
                seen.add(msg.frame_id)
                entry_id = msg.frame_id.rpartition(":")[2]
                tally.kept += 1
                yield EnrolFrame(
                    msg.frame_id, entry_id, msg.ts, "false_alarm", jpeg=msg.image, reviewer=msg.user
                )
        start = f"({text(rows[-1][0])}"

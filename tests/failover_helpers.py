"""What the failover tests (Sentinel and Cluster) check after a primary was lost.

* :func:`record_accepted`: which frames an in-process reader counted as accepted, and when;
* :func:`replay_alarm`: the alarm state a camera's score stream implies, stepped frame by frame
  with the rules of :mod:`dfm_stream.alarms`, to compare with the state stored on the new primary;
* :func:`assert_scored_once`: every frame of the cameras has exactly one score, nothing pending.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
from chaos_helpers import group_pending, score_counts, stream_ids, undelivered
from redis.cluster import RedisCluster

from dfm_stream import keys
from dfm_stream.alarms import alarm_state
from dfm_stream.config import AlarmsConfig
from dfm_stream.reader import Reader
from dfm_stream.wire import FIELD, FrameMsg, ScoreMsg, ScoreStatus

Client = redis.Redis | RedisCluster


def record_accepted(reader: Reader, cameras: list[str], times: list[tuple[str, int]]) -> dict[str, list[int]]:
    """Collect per camera the seq of every frame the reader counted as accepted (``times``: camera, when)."""
    accepted: dict[str, list[int]] = {c: [] for c in cameras}
    write = reader.sink.write_frame

    def recording(key: str, data: bytes, maxlen: int) -> str | None:
        reason = write(key, data, maxlen)
        if reason is None:
            msg = FrameMsg.from_bytes(data)
            accepted[msg.camera].append(msg.seq)
            times.append((msg.camera, time.time_ns()))
        return reason

    reader.sink.write_frame = recording  # type: ignore[method-assign]
    return accepted


def all_scores(client: Client, camera: str) -> list[ScoreMsg]:
    """Every score message of ``camera``, in stream (publication) order."""
    return [ScoreMsg.from_bytes(f[FIELD.encode()]) for _, f in client.xrange(keys.scores_key(camera))]


def frame_seqs(client: Client, camera: str) -> set[int]:
    """The ``seq`` of every frame in ``camera``'s stream."""
    return {FrameMsg.from_bytes(f[FIELD.encode()]).seq for _, f in client.xrange(keys.frames_key(camera))}


@dataclass
class AlarmReplay:
    """The alarm state machine's fields that do not depend on time (no cooldown), and what it did."""

    active: bool = False
    window: str = ""
    normal_run: int = 0
    raised: int = 0
    active_before: bool = False
    """Whether the alarm was active at the last score published before the ``until_ns`` given."""


def replay_alarm(scores: list[ScoreMsg], until_ns: int, rules: AlarmsConfig | None = None) -> AlarmReplay:
    """Step the alarm rules (cooldown 0) over ``scores`` in order, as the publish script did."""
    rules = rules or AlarmsConfig()
    state = AlarmReplay()
    for score in scores:
        if score.status != ScoreStatus.SCORED:
            continue  # skipped frames do not step the machine
        bit = "1" if score.anomalous else "0"
        state.window = (state.window + bit)[-rules.n :]
        state.normal_run = 0 if bit == "1" else state.normal_run + 1
        if not state.active and bit == "1" and state.window.count("1") >= rules.k:
            state.active, state.raised = True, state.raised + 1
        elif state.active and state.normal_run >= rules.clear_after:
            state.active = False
        if score.scored_ts <= until_ns:
            state.active_before = state.active
    return state


def assert_alarm_carried_over(client: Client, camera: str, kill_ns: int) -> AlarmReplay:
    """The stored alarm state of ``camera`` is the one its surviving scores imply, across the failover."""
    replay = replay_alarm(all_scores(client, camera), kill_ns)
    stored = alarm_state(client, camera)
    got = (stored.get("active") == "1", stored.get("window", ""), int(stored.get("normal_run", "0")))
    want = (replay.active, replay.window, replay.normal_run)
    assert got == want, f"camera {camera}: alarm state {got} after the failover, its scores say {want}"
    return replay


def assert_scored_once(client: Client, cameras: list[str]) -> int:
    """Every frame in each stream has exactly one score, nothing pending or undelivered; the frame count."""
    total = 0
    for cam in cameras:
        ids, counts = stream_ids(client, cam), score_counts(client, cam)  # type: ignore[arg-type]
        duplicated = {f: n for f, n in counts.items() if n > 1}
        assert not duplicated, f"camera {cam}: frames scored more than once: {duplicated}"
        assert set(ids) <= set(counts), f"camera {cam}: {len(set(ids) - set(counts))} frames without a score"
        assert set(counts) <= set(ids), f"camera {cam}: scores of frames not in the stream"
        assert group_pending(client, cam) == 0 and undelivered(client, cam) == 0  # type: ignore[arg-type]
        total += len(ids)
    return total


def all_scored(client: Client, cameras: list[str]) -> bool:
    """True once every frame has a score and nothing is pending or undelivered."""
    for cam in cameras:
        ids = stream_ids(client, cam)  # type: ignore[arg-type]
        if not ids or not set(ids) <= set(score_counts(client, cam)):  # type: ignore[arg-type]
            return False
        if group_pending(client, cam) or undelivered(client, cam):  # type: ignore[arg-type]
            return False
    return True

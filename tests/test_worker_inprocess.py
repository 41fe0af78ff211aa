"""The worker loop in-process (burst mode): scores, stale skips, poison frames, trimmed gaps."""

import time

import msgpack
import numpy as np
from worker_helpers import frame_ids, pending, push_frame, push_frames, run_worker, scores

from dfm_stream import keys
from dfm_stream.frame_codec import encode_frame
from dfm_stream.wire import FIELD, DeadLetterMsg


def test_burst_worker_scores_every_frame_exactly_once(redis_client, redis_url, artifact):
    frames = artifact.good[:3] + artifact.defect[:2] + artifact.good[3:8]
    push_frames(redis_client, "cam1", frames)
    push_frames(redis_client, "cam2", artifact.good[:3])
    stats = run_worker(redis_url, artifact.path, cameras=["cam1", "cam2"])
    for camera in ("cam1", "cam2"):
        got = scores(redis_client, camera)
        assert sorted(s.frame_id for s in got) == frame_ids(redis_client, camera)
        assert pending(redis_client, camera) == 0
    cam1 = sorted(scores(redis_client, "cam1"), key=lambda s: s.seq)
    assert [s.anomalous for s in cam1] == [False] * 3 + [True] * 2 + [False] * 5
    assert all(s.model.startswith("tiny@") and s.threshold == artifact.threshold for s in cam1)
    assert stats.scored == 13 and stats.duplicates == 0
    assert stats.events == [f"raised:cam1:{cam1[3].frame_id}", f"cleared:cam1:{cam1[9].frame_id}"]


def test_stale_frames_are_skipped_and_acked_when_max_age_is_set(redis_client, redis_url, artifact):
    old = time.time_ns() - 60 * 10**9
    push_frame(redis_client, "cam1", artifact.good[0], 0, ts=old)
    push_frame(redis_client, "cam1", artifact.good[1], 1)
    stats = run_worker(redis_url, artifact.path, cameras=["cam1"], max_age_s=30)
    got = {s.seq: s for s in scores(redis_client, "cam1")}
    assert got[0].status == "skipped" and got[0].score is None
    assert got[1].status == "scored" and got[1].score is not None
    assert stats.skipped == 1 and pending(redis_client, "cam1") == 0


def test_poison_frames_go_to_the_dead_letter_stream_with_a_reason(redis_client, redis_url, artifact):
    key = keys.frames_key("cam1")
    good = encode_frame(artifact.good[0], "cam1", 0, "s1")
    corrupt = encode_frame(artifact.good[1], "cam1", 2, "s1")
    corrupt = type(corrupt)(**{**corrupt.__dict__, "data": corrupt.data[:200] + b"\x00" * 50})
    huge = msgpack.packb(
        {**{k: v for k, v in good.__dict__.items() if k != "extra"}, "v": 1, "w": 100000, "h": 100000}
    )
    redis_client.xadd(key, {FIELD: good.to_bytes()})
    redis_client.xadd(key, {FIELD: b"\xc1garbage"})
    redis_client.xadd(key, {FIELD: corrupt.to_bytes()})
    redis_client.xadd(key, {FIELD: huge})
    redis_client.xadd(key, {"other": b"no msg field"})
    push_frame(redis_client, "cam1", artifact.good[2], 5)
    stats = run_worker(redis_url, artifact.path, cameras=["cam1"])
    dead = [
        (DeadLetterMsg.from_bytes(f[b"msg"]), f[b"payload"])
        for _, f in redis_client.xrange(keys.deadletter_key())
    ]
    assert sorted(d.reason for d, _ in dead) == ["bad_message", "bad_msgpack", "decode_error", "too_large"]
    assert any(p == b"\xc1garbage" for _, p in dead)
    assert sorted(s.seq for s in scores(redis_client, "cam1")) == [0, 5]
    assert stats.deadlettered == 4 and pending(redis_client, "cam1") == 0


def test_trimmed_gaps_are_counted_as_dropped(redis_client, redis_url, artifact):
    push_frames(redis_client, "cam1", artifact.good[:2])
    run_worker(redis_url, artifact.path, cameras=["cam1"])
    for seq in range(2, 8):  # exact MAXLEN 2: seqs 2..5 are trimmed before any worker reads them
        push_frame(redis_client, "cam1", artifact.good[seq % 8], seq, maxlen=2)
    stats = run_worker(redis_url, artifact.path, cameras=["cam1"])
    assert stats.trimmed == 4
    assert sorted(s.seq for s in scores(redis_client, "cam1")) == [0, 1, 6, 7]


def test_max_frames_stops_after_that_many(redis_client, redis_url, artifact):
    push_frames(redis_client, "cam1", artifact.good[:6])
    stats = run_worker(redis_url, artifact.path, cameras=["cam1"], burst=False, max_frames=3)
    assert stats.read == 3 and len(scores(redis_client, "cam1")) == 3
    assert pending(redis_client, "cam1") == 0
    assert np.all([s.status == "scored" for s in scores(redis_client, "cam1")])

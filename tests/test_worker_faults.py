"""Fault isolation in the worker: Redis errors while handing a batch on, Redis at ``maxmemory``.

Real ``redis-server``, real ``dfm-stream work`` processes where the fault is the process's.
"""

import time

import pytest
import redis
from support import wait_until
from worker_helpers import GROUP, frame_ids, pending, push_frame, push_frames, scores

from dfm_stream import keys
from dfm_stream.frame_codec import encode_frame
from dfm_stream.wire import FIELD, DeadLetterMsg


def worker_args(redis_url, artifact, *extra):
    model = ["--model", str(artifact.path), "--device", "cpu", "--metrics-port", "-1"]
    return ["work", "--redis", redis_url, *model, *extra]


def test_a_new_worker_scores_accepted_frames_while_redis_is_at_maxmemory(
    redis_client, redis_url, artifact, procs
):
    push_frames(redis_client, "c1", artifact.good[:5])
    redis_client.xgroup_create(keys.frames_key("c1"), GROUP, id="0")  # made by an earlier worker
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            redis_client.set("probe", b"1")  # the pressure is real: denyoom writes are refused
        # c2 has no stream yet: its group cannot be created now, which must not stop c1
        worker = procs.dfm(*worker_args(redis_url, artifact, "--cameras", "c1,c2", "--burst"), name="w")
        wait_until(lambda: worker.poll() is not None, 90, what="the burst worker to finish under maxmemory")
    finally:
        redis_client.config_set("maxmemory", 0)
    log = procs.log(worker)
    assert worker.returncode == 0, log
    assert sorted(s.frame_id for s in scores(redis_client, "c1")) == frame_ids(redis_client, "c1")
    assert pending(redis_client, "c1") == 0
    assert "cannot create consumer group" in log and "could not refresh the heartbeat" in log


def push_corrupt_jpeg(client, camera, image, seq):
    """XADD a frame whose JPEG header is fine but whose data is not: it fails at decode, in the hand-off."""
    msg = encode_frame(image, camera, seq, "s1")
    msg = type(msg)(**{**msg.__dict__, "data": msg.data[:200] + b"\x00" * 50})
    return client.xadd(keys.frames_key(camera), {FIELD: msg.to_bytes()}).decode()


def test_frames_of_a_batch_whose_hand_off_hit_a_redis_error_are_scored_once_it_clears(
    redis_client, redis_url, artifact, procs
):
    """A Redis error while dead-lettering a corrupt frame of a batch: its good frames are not stuck."""
    push_frames(redis_client, "c1", artifact.good[:2])
    corrupt = push_corrupt_jpeg(redis_client, "c1", artifact.good[2], 2)
    push_frame(redis_client, "c1", artifact.good[3], 3)
    redis_client.xgroup_create(keys.frames_key("c1"), GROUP, id="0")
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", 1)  # the dead letter's XADD is refused, reading is not
    args = ["--cameras", "c1", "--batch-size", "4", "--claim-idle", "1", "--max-deliveries", "20"]
    worker = procs.dfm(*worker_args(redis_url, artifact, *args), name="w")
    try:
        wait_until(lambda: "OutOfMemoryError" in procs.log(worker), 90, what="the refused dead letter")
    finally:
        redis_client.config_set("maxmemory", 0)
    wait_until(lambda: len(scores(redis_client, "c1")) == 3, 60, what="the batch's good frames scored")
    wait_until(lambda: pending(redis_client, "c1") == 0, 30, what="nothing pending")
    assert worker.poll() is None, "the worker was not restarted: " + procs.log(worker)
    assert procs.stop(worker) == 0
    good = [i for i in frame_ids(redis_client, "c1") if i != f"c1:{corrupt}"]
    assert sorted(s.frame_id for s in scores(redis_client, "c1")) == good
    dead = [DeadLetterMsg.from_bytes(f[b"msg"]) for _, f in redis_client.xrange(keys.deadletter_key())]
    assert [(d.frame_id, d.reason) for d in dead] == [(f"c1:{corrupt}", "decode_error")]


def test_stale_frames_taken_before_a_refused_dead_letter_are_skipped_once_it_clears(
    redis_client, redis_url, artifact, procs
):
    """A Redis error while dead-lettering an unparsable entry: the stale frame read with it is not stuck."""
    stale = push_frame(redis_client, "c1", artifact.good[0], 0, ts=time.time_ns() - 600 * 10**9)
    garbage = redis_client.xadd(keys.frames_key("c1"), {FIELD: b"\xc1garbage"}).decode()
    redis_client.xgroup_create(keys.frames_key("c1"), GROUP, id="0")
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", 1)
    args = ["--cameras", "c1", "--max-age", "30", "--claim-idle", "1", "--max-deliveries", "20"]
    worker = procs.dfm(*worker_args(redis_url, artifact, *args), name="w")
    try:
        wait_until(lambda: "OutOfMemoryError" in procs.log(worker), 90, what="the refused dead letter")
    finally:
        redis_client.config_set("maxmemory", 0)
    wait_until(lambda: scores(redis_client, "c1"), 60, what="the stale frame's skipped score")
    wait_until(lambda: pending(redis_client, "c1") == 0, 30, what="nothing pending")
    assert procs.stop(worker) == 0
    assert [(s.frame_id, s.status) for s in scores(redis_client, "c1")] == [(f"c1:{stale}", "skipped")]
    dead = [DeadLetterMsg.from_bytes(f[b"msg"]) for _, f in redis_client.xrange(keys.deadletter_key())]
    assert [(d.frame_id, d.reason) for d in dead] == [(f"c1:{garbage}", "bad_msgpack")]

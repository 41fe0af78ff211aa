"""Fault isolation of the consumer side (#14): one camera's bad entries never stall Redis or the others.

* a padded entry (a 14-million-element array in its ``msg``) is read without Redis ever answering
  ``BUSY`` to another client, and the worker dead-letters it as ``oversized``;
* idle polls read no entry into the script;
* a ``seq`` wrap or an impossible jump on one camera is counted as a seq anomaly, never as
  ``trimmed`` and never as an error that leaves every camera's frames pending;
* a consumer group destroyed and created again starts after the camera's last scored frame.
"""

import struct
import time

import msgpack
import numpy as np
import redis
from chaos_helpers import score_counts, scrape, undelivered, wait_metrics_port
from support import wait_until
from worker_helpers import pending, push_frame, push_frames

from dfm_stream import keys
from dfm_stream.consumer import StreamConsumer
from dfm_stream.deadletter import send_to_deadletter
from dfm_stream.wire import DEADLETTER_PAYLOAD_BYTES, FIELD, DeadLetterMsg, FrameMsg

IMG = np.full((16, 16, 3), 128, np.uint8)
PAD_ITEMS = 14_000_000


def padded_frame(camera: str, seq: int = 0, pad_last: bool = False) -> bytes:
    """A valid raw 16x16 frame message whose first (or last) key holds an array of 14 million zeros."""
    body = {"v": 1, "camera": camera, "seq": seq, "session": "s", "ts": time.time_ns(), "enc": "raw"}
    body.update({"w": 16, "h": 16, "c": 3, "data": IMG.tobytes()})
    rest = msgpack.packb(body, use_bin_type=True)
    assert rest[0] == 0x80 + len(body)  # fixmap header; one more key goes in front
    pad = b"\xdd" + struct.pack(">I", PAD_ITEMS) + b"\x00" * PAD_ITEMS
    if pad_last:  # after seq and session: the scan must go on to find it
        return bytes([0x80 + len(body) + 1]) + rest[1:] + msgpack.packb("pad") + pad
    return bytes([0x80 + len(body) + 1]) + msgpack.packb("pad") + pad + rest[1:]


def worker_args(redis_url, artifact, cameras, *extra):
    model = ["--model", str(artifact.path), "--device", "cpu"]
    return ["work", "--redis", redis_url, *model, "--cameras", cameras, *extra]


def deadletters(client):
    return [DeadLetterMsg.from_bytes(f[FIELD.encode()]) for _, f in client.xrange(keys.deadletter_key())]


def test_a_padded_entry_never_makes_redis_answer_busy_and_is_dead_lettered(
    redis_client, redis_url, artifact, procs
):
    redis_client.config_set("busy-reply-threshold", 1000)  # the default 5 s would hide a 3 s freeze
    bad_id = redis_client.xadd(keys.frames_key("bad"), {FIELD: padded_frame("bad")}).decode()
    good_ids = push_frames(redis_client, "good", artifact.good[:3])
    worker = procs.dfm(*worker_args(redis_url, artifact, "bad,good", "--burst", "--metrics-port", "-1"))
    honest = redis.Redis.from_url(redis_url)
    busy, answered = [], 0
    try:
        while worker.poll() is None:  # an honest camera and a health check, while the worker reads
            try:
                honest.ping()
                honest.xadd(keys.frames_key("honest"), {FIELD: b"x"}, maxlen=10, approximate=False)
                answered += 1
            except redis.ResponseError as e:
                busy.append(str(e))
            time.sleep(0.01)
    finally:
        honest.close()
    assert procs.stop(worker) == 0, procs.log(worker)
    assert busy == [], f"Redis answered {len(busy)} commands with an error: {busy[:3]}"
    assert answered > 0
    letters = deadletters(redis_client)
    assert [(d.frame_id, d.reason) for d in letters] == [(f"bad:{bad_id}", "oversized")]
    padded = padded_frame("bad")
    assert letters[0].size == len(padded)  # the dead letter keeps a bounded prefix and the real size
    assert redis_client.xrange(keys.deadletter_key())[0][1][b"payload"] == padded[:DEADLETTER_PAYLOAD_BYTES]
    assert score_counts(redis_client, "good") == {f"good:{i}": 1 for i in good_ids}
    assert score_counts(redis_client, "bad") == {}
    assert pending(redis_client, "bad") == pending(redis_client, "good") == 0


def test_an_entry_above_max_frame_bytes_is_dead_lettered_unscanned(redis_client):
    consumer = StreamConsumer(redis_client, name="a", max_frame_bytes=1000)
    consumer.add_cameras(["c1"])
    for seq, side in ((0, 16), (5, 32), (6, 16)):  # raw 16x16 (768 bytes) is under the cap, 32x32 over it
        msg = FrameMsg("c1", seq, 1, "raw", side, side, 3, bytes(side * side * 3), session="s")
        redis_client.xadd(keys.frames_key("c1"), {FIELD: msg.to_bytes()})
    result = consumer.read(10)
    assert len(result.entries) == 3
    assert result.trimmed == {"c1": 5}  # the oversized entry plays no part in the accounting


def test_oversized_entries_reach_the_consumer_cut_to_a_prefix_with_their_reason_and_size(redis_client):
    consumer = StreamConsumer(redis_client, name="a", max_frame_bytes=2_000_000)
    consumer.add_cameras(["c1"])
    key = keys.frames_key("c1")
    honest = FrameMsg("c1", 0, 1, "raw", 16, 16, 3, IMG.tobytes(), session="s").to_bytes()
    big = FrameMsg("c1", 4, 1, "raw", 1000, 1000, 3, bytes(3_000_000), session="s").to_bytes()
    pad_first, pad_last = padded_frame("c1", 1), padded_frame("c1", 2, pad_last=True)
    sent = {
        redis_client.xadd(key, {FIELD: data}).decode(): (data, reason)
        for data, reason in (
            (honest, None),
            (pad_first, "oversized"),
            (pad_last, "oversized"),
            (big, "oversized"),
        )
    }
    sent[redis_client.xadd(key, {"image": bytes(3_000_000)}).decode()] = (
        b"image=" + bytes(3_000_000),
        "bad_message",
    )
    result = consumer.read(10)
    assert [e.entry_id for e in result.entries] == list(sent)
    for entry in result.entries:
        original, reason = sent[entry.entry_id]
        if reason is None:
            assert entry.refused is None and entry.payload == original
            continue
        assert entry.refused is not None and entry.refused.reason == reason, entry.refused
        assert entry.payload is None, "an oversized entry's payload never reaches the worker"
        assert entry.raw == original[:DEADLETTER_PAYLOAD_BYTES]
        assert entry.size == len(original)
    assert result.trimmed == {}  # refused entries play no part in the accounting

    letter = send_to_deadletter(
        redis_client, result.entries[1], "oversized", "padded", prefix=keys.DEFAULT_PREFIX
    )
    stored = redis_client.xrange(keys.deadletter_key())[-1][1]
    assert DeadLetterMsg.from_bytes(stored[FIELD.encode()]) == letter
    assert letter.size == len(pad_first)
    assert stored[b"payload"] == pad_first[:DEADLETTER_PAYLOAD_BYTES]


def test_idle_polls_read_no_entry_into_the_script(redis_client):
    consumer = StreamConsumer(redis_client, name="a")
    consumer.add_cameras(["c1", "c2"])
    for seq in range(3):
        push_frame(redis_client, "c1", IMG, seq)
    assert len(consumer.read(10).entries) == 3
    redis_client.config_resetstat()
    for _ in range(3):
        result = consumer.read(10)
        assert result.entries == [] and result.drained == {"c1", "c2"}
    stats = redis_client.info("commandstats")
    assert not {"cmdstat_xrange", "cmdstat_xrevrange", "cmdstat_xinfo|stream"} & set(stats)
    assert consumer.wait(50) is False  # nothing newer than what was delivered
    push_frame(redis_client, "c2", IMG, 0)
    assert consumer.wait(5000) is True
    assert len(consumer.read(10).entries) == 1


def test_a_seq_wrap_or_jump_is_an_anomaly_never_a_negative_or_huge_gap(redis_client):
    consumer = StreamConsumer(redis_client, name="a")
    consumer.add_cameras(["wrap", "ok"])
    for seq in (0, 2**64 - 1, 0):
        push_frame(redis_client, "wrap", IMG, seq)
    for seq in range(3):
        push_frame(redis_client, "ok", IMG, seq)
    result = consumer.read(10)
    assert len(result.entries) == 6
    assert result.trimmed == {}
    assert result.seq_anomalies == {"wrap": 1}
    # counting restarted at the second 0: an impossible forward jump, then an honest gap after it
    for seq in (1, 10**12, 10**12 + 3, 5):
        push_frame(redis_client, "wrap", IMG, seq)
    result = consumer.read(10)
    assert result.trimmed == {"wrap": 2}
    assert result.seq_anomalies == {"wrap": 2}  # the jump to 10**12, and going back to 5


def test_a_seq_wrap_on_one_camera_delays_no_camera(redis_client, redis_url, artifact, procs):
    for seq in (0, 2**64 - 1, 0):
        push_frame(redis_client, "wrap", artifact.good[0], seq)
    ok_ids = push_frames(redis_client, "ok", artifact.good[:3])
    args = worker_args(redis_url, artifact, "wrap,ok", "--claim-idle", "600", "--metrics-port", "0")
    worker = procs.dfm(*args, "--batch-size", "8")
    port = wait_metrics_port(procs, worker)
    wait_until(
        lambda: len(score_counts(redis_client, "wrap")) == 3 and len(score_counts(redis_client, "ok")) == 3,
        60,
        what="every frame of both cameras scored (not left pending for --claim-idle)",
    )
    assert scrape(port, "dfm_worker_seq_anomalies_total", camera="wrap") == 1
    assert scrape(port, "dfm_worker_frames_dropped_total", reason="trimmed") == 0
    assert scrape(port, "dfm_worker_loop_errors_total") == 0
    assert procs.stop(worker) == 0
    assert score_counts(redis_client, "ok") == {f"ok:{i}": 1 for i in ok_ids}


def test_a_destroyed_group_starts_again_after_the_last_scored_frame(redis_client, redis_url, artifact, procs):
    first = push_frames(redis_client, "cam1", artifact.good[:5])
    worker = procs.dfm(*worker_args(redis_url, artifact, "cam1", "--metrics-port", "-1"))
    wait_until(lambda: len(score_counts(redis_client, "cam1")) == 5, 90, what="the first frames scored")
    assert redis_client.xgroup_destroy(keys.frames_key("cam1"), keys.DEFAULT_GROUP) == 1
    later = push_frames(redis_client, "cam1", artifact.good[5:8], start_seq=5)

    def settled():
        try:
            return undelivered(redis_client, "cam1") == 0 and pending(redis_client, "cam1") == 0
        except redis.ResponseError:  # the group is not there yet
            return False

    wait_until(lambda: len(score_counts(redis_client, "cam1")) >= 8 and settled(), 60, what="later frames")
    assert procs.stop(worker) == 0
    assert score_counts(redis_client, "cam1") == {f"cam1:{i}": 1 for i in first + later}


def test_a_group_created_again_starts_after_the_last_scored_frame_unless_the_stream_is_new(redis_client):
    ids = [push_frame(redis_client, "c1", IMG, seq) for seq in range(4)]
    redis_client.hset(keys.seq_key("c1"), "scored", ids[1])  # as the publish script leaves it
    consumer = StreamConsumer(redis_client, name="a")
    consumer.add_cameras(["c1"])
    assert [e.entry_id for e in consumer.read(10).entries] == ids[2:]
    # the stream deleted and written again (ids older than the last score): everything is new
    redis_client.delete(keys.frames_key("c1"))
    msg = FrameMsg("c1", 0, 1, "raw", 16, 16, 3, IMG.tobytes(), session="s2").to_bytes()
    again = [
        redis_client.xadd(keys.frames_key("c1"), {FIELD: msg}, id=f"1-{i}").decode() for i in range(1, 3)
    ]
    other = StreamConsumer(redis_client, name="b")
    other.add_cameras(["c1"])
    assert [e.entry_id for e in other.read(10).entries] == again

"""The consumer side of the frame streams: group creation, exact trimmed-gap accounting, reclaim."""

import msgpack
import numpy as np
from worker_helpers import push_frame

from dfm_stream import keys
from dfm_stream.consumer import StreamConsumer

IMG = np.full((16, 16, 3), 128, np.uint8)


def test_group_created_at_zero_delivers_frames_pushed_before_any_worker(redis_client):
    ids = [push_frame(redis_client, "c1", IMG, seq) for seq in range(3)]
    consumer = StreamConsumer(redis_client, name="a")
    assert consumer.add_cameras(["c1"]) == ["c1"]
    assert consumer.add_cameras(["c1"]) == []  # idempotent
    StreamConsumer(redis_client, name="b").add_cameras(["c1"])  # BUSYGROUP is fine
    result = consumer.read(10)
    assert [e.entry_id for e in result.entries] == ids
    assert result.trimmed == {}
    assert consumer.read(10).entries == []


def test_trimmed_frames_are_counted_exactly_across_consumers(redis_client):
    a = StreamConsumer(redis_client, name="a")
    b = StreamConsumer(redis_client, name="b")
    a.add_cameras(["c1"])
    b.add_cameras(["c1"])
    for seq in range(3):
        push_frame(redis_client, "c1", IMG, seq)
    assert len(a.read(10).entries) == 3
    for seq in range(3, 10):  # exact MAXLEN 3: seqs 3..6 are trimmed before anyone reads them
        push_frame(redis_client, "c1", IMG, seq, maxlen=3)
    first = b.read(1)
    rest = a.read(10)
    assert len(first.entries) + len(rest.entries) == 3
    assert first.trimmed == {"c1": 4}
    assert rest.trimmed == {}
    # consecutive frames read alternately by two consumers never look like gaps
    for seq in range(10, 16):
        push_frame(redis_client, "c1", IMG, seq)
    assert sum(c.read(1).trimmed.get("c1", 0) for c in (a, b, a, b, a, b)) == 0
    # a new reader session starts its own count
    push_frame(redis_client, "c1", IMG, 100, session="s2")
    assert b.read(5).trimmed == {}


def test_reclaim_takes_idle_entries_with_delivery_counts(redis_client):
    dead = StreamConsumer(redis_client, name="dead")
    live = StreamConsumer(redis_client, name="live")
    dead.add_cameras(["c1"])
    live.add_cameras(["c1"])
    ids = [push_frame(redis_client, "c1", IMG, seq) for seq in range(4)]
    assert len(dead.read(10).entries) == 4
    redis_client.xdel(keys.frames_key("c1"), ids[0])  # trimmed while pending
    result = live.reclaim(min_idle_ms=0)
    assert sorted(e.entry_id for e in result.entries) == sorted(ids[1:])
    assert all(e.deliveries == 2 for e in result.entries)
    assert result.deleted == {"c1": [ids[0]]}
    again = live.reclaim(min_idle_ms=0, exclude={f"c1:{ids[1]}"})
    assert sorted(e.entry_id for e in again.entries) == sorted(ids[2:])
    assert {e.deliveries for e in again.entries} == {3}
    assert live.group_stats()["c1"][1] == 3


def test_nested_keys_before_seq_do_not_look_like_trimmed_frames(redis_client):
    consumer = StreamConsumer(redis_client, name="a")
    consumer.add_cameras(["c1"])
    extras = [
        {},
        {"meta": {"line": 7, "tags": ["a", {"b": 1}]}},  # map and nested array before seq
        {"roi": [1, 2, 3, 4]},
        {"ext": msgpack.ExtType(5, b"abcdefgh"), "blob": msgpack.ExtType(9, b"x" * 300)},
    ]
    for seq, extra in enumerate(extras):
        body = {**extra, "v": 1, "camera": "c1", "seq": seq, "session": "s", "ts": 1, "enc": "raw"}
        body.update({"w": 16, "h": 16, "c": 3, "data": IMG.tobytes()})
        redis_client.xadd(keys.frames_key("c1"), {"msg": msgpack.packb(body, use_bin_type=True)})
    read = [consumer.read(1) for _ in extras]
    assert [len(r.entries) for r in read] == [1, 1, 1, 1]
    assert all(r.trimmed == {} for r in read)
    push_frame(redis_client, "c1", IMG, 6, session="s")  # seqs 4 and 5 never arrived
    assert consumer.read(1).trimmed == {"c1": 2}


def test_reclaim_leaves_trimmed_frames_in_flight_to_their_publish(redis_client):
    busy = StreamConsumer(redis_client, name="busy")
    other = StreamConsumer(redis_client, name="other")
    busy.add_cameras(["c1"])
    other.add_cameras(["c1"])
    ids = [push_frame(redis_client, "c1", IMG, seq) for seq in range(3)]
    assert len(busy.read(10).entries) == 3
    redis_client.xdel(keys.frames_key("c1"), ids[0], ids[1])  # trimmed while the worker still scores them
    own = busy.reclaim(min_idle_ms=0, exclude={f"c1:{i}" for i in ids})
    assert own.entries == [] and own.deleted == {}
    theirs = other.reclaim(min_idle_ms=60_000)  # not idle long enough: not touched, trimmed or not
    assert theirs.entries == [] and theirs.deleted == {}
    assert busy.ack("c1", ids) == 3  # so the publish still acknowledges (and scores) every frame


def test_group_stats_counts_the_entries_not_yet_delivered(redis_client):
    consumer = StreamConsumer(redis_client, name="a")
    consumer.add_cameras(["c1"])
    assert consumer.group_stats() == {"c1": (0, 0)}
    ids = [push_frame(redis_client, "c1", IMG, seq) for seq in range(5)]
    assert consumer.group_stats() == {"c1": (5, 0)}
    assert len(consumer.read(2).entries) == 2
    assert consumer.group_stats() == {"c1": (3, 2)}
    redis_client.xdel(keys.frames_key("c1"), *ids[:3])  # the last delivered entry is gone
    assert consumer.group_stats() == {"c1": (2, 2)}
    for seq in range(5, 15):  # everything the group has not read is trimmed away but 3 entries
        push_frame(redis_client, "c1", IMG, seq, maxlen=3)
    assert consumer.group_stats()["c1"][0] == 3
    while consumer.read(10).entries:
        pass
    assert consumer.group_stats()["c1"][0] == 0

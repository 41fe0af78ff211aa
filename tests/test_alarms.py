"""The alarm state machine in Redis (k of n, clear_after, cooldown), via the publish script."""

import contextlib

import numpy as np
import pytest
import redis

from dfm_stream import keys
from dfm_stream.alarms import alarm_state, overlay_jpeg
from dfm_stream.config import AlarmsConfig
from dfm_stream.errors import ConfigError
from dfm_stream.publisher import Publisher, ScoredItem
from dfm_stream.wire import FIELD, EventMsg, ScoreMsg

IMG = np.zeros((8, 8, 3), np.uint8)


def feed(client, publisher, camera, bits):
    """Add one frame per bit to the stream, deliver it, publish its score; return the events' types."""
    frames = keys.frames_key(camera)
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP after the first call
        client.xgroup_create(frames, keys.DEFAULT_GROUP, id="0", mkstream=True)
    items = []
    for bit in bits:
        entry_id = client.xadd(frames, {FIELD: b"x"}).decode()
        client.xreadgroup(keys.DEFAULT_GROUP, "t", {frames: ">"}, count=1)
        msg = ScoreMsg(camera, f"{camera}:{entry_id}", 0, 0, 0, 1.0, None, 0.5, bit == "1", "m@1", 0.0)
        items.append(ScoredItem(msg, entry_id, bit))
    return [e.type for e in publisher.publish(items).events]


def test_one_of_one_raises_and_clears_after_five_normal(redis_client):
    pub = Publisher(redis_client, alarm=AlarmsConfig())
    assert feed(redis_client, pub, "c1", "0011") == ["raised"]
    assert feed(redis_client, pub, "c1", "0000") == []
    assert feed(redis_client, pub, "c1", "1") == []  # still active: the anomaly keeps coming
    assert feed(redis_client, pub, "c1", "0000") == []
    assert feed(redis_client, pub, "c1", "0") == ["cleared"]
    assert alarm_state(redis_client, "c1")["active"] == "0"
    events = [EventMsg.from_bytes(f[b"msg"]) for _, f in redis_client.xrange(keys.alarms_key())]
    assert [e.type for e in events] == ["raised", "cleared"]
    assert events[1].since_ts and events[1].frame_id.startswith("c1:")


def test_k_of_n_needs_enough_anomalies_in_the_window(redis_client):
    pub = Publisher(redis_client, alarm=AlarmsConfig(k=2, n=3, clear_after=2))
    assert feed(redis_client, pub, "c1", "1001001") == []
    assert feed(redis_client, pub, "c1", "01") == ["raised"]
    assert feed(redis_client, pub, "c1", "00") == ["cleared"]


def test_cooldown_blocks_a_new_raise_right_after_a_clear(redis_client):
    pub = Publisher(redis_client, alarm=AlarmsConfig(clear_after=1, cooldown_s=60))
    assert feed(redis_client, pub, "c1", "1") == ["raised"]
    assert feed(redis_client, pub, "c1", "0") == ["cleared"]
    assert feed(redis_client, pub, "c1", "1111") == []
    no_cooldown = Publisher(redis_client, alarm=AlarmsConfig(clear_after=1))
    assert feed(redis_client, no_cooldown, "c2", "1010") == ["raised", "cleared", "raised", "cleared"]


def test_state_survives_a_new_worker_instance(redis_client):
    assert feed(redis_client, Publisher(redis_client), "c1", "1") == ["raised"]
    restarted = Publisher(redis_client)  # another worker, same Redis
    assert feed(redis_client, restarted, "c1", "1") == []
    assert feed(redis_client, restarted, "c1", "00000") == ["cleared"]


def test_already_acked_frames_do_not_step_the_alarm_or_publish(redis_client):
    pub = Publisher(redis_client)
    frames = keys.frames_key("c1")
    redis_client.xgroup_create(frames, keys.DEFAULT_GROUP, id="0", mkstream=True)
    entry_id = redis_client.xadd(frames, {FIELD: b"x"}).decode()
    redis_client.xreadgroup(keys.DEFAULT_GROUP, "t", {frames: ">"})
    item = ScoredItem(
        ScoreMsg("c1", f"c1:{entry_id}", 0, 0, 0, 1.0, None, 0.5, True, "m@1", 0.0), entry_id, "1"
    )
    assert pub.publish([item]).published == [f"c1:{entry_id}"]
    again = pub.publish([item])
    assert again.published == [] and again.duplicates == [f"c1:{entry_id}"]
    assert redis_client.xlen(keys.scores_key("c1")) == 1


def test_overlay_jpeg_fits_the_size_bound():
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
    data = overlay_jpeg(noisy, rng.random((16, 16)).astype(np.float32), max_bytes=64 * 1024)
    assert data[:2] == b"\xff\xd8" and len(data) <= 64 * 1024
    assert overlay_jpeg(IMG, None)[:2] == b"\xff\xd8"


def test_bad_alarm_settings_are_refused():
    with pytest.raises(ConfigError, match="k=3, n=2"):
        AlarmsConfig(k=3, n=2)

"""Alarm events survive a worker that dies between its publish script and the event (the outbox)."""

from worker_helpers import GROUP, push_frames, run_worker, scores

from dfm_stream import keys
from dfm_stream.config import AlarmsConfig
from dfm_stream.consumer import StreamEntry
from dfm_stream.metrics import WorkerMetrics, new_registry
from dfm_stream.publisher import PUBLISH_SCRIPT, Publisher, frame_score
from dfm_stream.wire import FIELD, EventMsg, FrameMsg


def alarm_events(client) -> list[EventMsg]:
    return [EventMsg.from_bytes(f[FIELD.encode()]) for _, f in client.xrange(keys.alarms_key())]


def test_delivered_events_do_not_stay_in_the_outbox(redis_client, redis_url, artifact):
    push_frames(redis_client, "cam1", artifact.good[:2] + artifact.defect[:1] + artifact.good[2:8])
    stats = run_worker(redis_url, artifact.path, cameras=["cam1"])
    assert [e.type for e in alarm_events(redis_client)] == ["raised", "cleared"]
    assert alarm_events(redis_client)[0].image, "the live worker sends the picture"
    assert redis_client.xlen(keys.event_outbox_key("cam1")) == 0
    assert stats.events_recovered == 0


def run_the_publish_script_and_die(client, camera: str, threshold: float) -> None:
    """Do exactly what a worker does up to the event, then stop (as if SIGKILLed right there):
    read the camera's one frame, and publish an anomalous score of 9.5 from model tiny@1."""
    client.xgroup_create(keys.frames_key(camera), GROUP, id="0", mkstream=True)
    [[_, [(entry_id, fields)]]] = client.xreadgroup(GROUP, "doomed", {keys.frames_key(camera): ">"}, count=1)
    entry = StreamEntry(camera, entry_id.decode(), fields[FIELD.encode()])
    frame = FrameMsg.from_bytes(entry.payload)
    msg = frame_score(entry, frame, "doomed", "tiny@1", 9.5, threshold, score_norm=0.9, anomalous=True)
    keys_ = [
        keys.frames_key(camera),
        keys.scores_key(camera),
        keys.alarm_state_key(camera),
        keys.event_outbox_key(camera),
        keys.seq_key(camera),
    ]
    args = [GROUP, 10_000, *AlarmsConfig().script_args(), entry_id, msg.to_bytes(), "1"]
    published, transitions, active = client.eval(PUBLISH_SCRIPT, len(keys_), *keys_, *args)
    assert published == [entry_id] and active == 1 and transitions[0][0] == b"raised"


def test_an_event_left_by_a_dead_worker_is_delivered_once_by_another(redis_client, redis_url, artifact):
    push_frames(redis_client, "cam1", artifact.defect[:1])
    run_the_publish_script_and_die(redis_client, "cam1", artifact.threshold)
    assert alarm_events(redis_client) == []
    assert redis_client.xlen(keys.event_outbox_key("cam1")) == 1
    assert len(scores(redis_client, "cam1")) == 1  # the score and the alarm state are in Redis

    # A young entry is left alone: its worker may still be delivering it.
    assert Publisher(redis_client).deliver_stale_events(["cam1"], min_age_s=60) == 0
    stats = run_worker(redis_url, artifact.path, cameras=["cam1"], outbox_deliver_after_s=0.0)
    assert stats.events_recovered == 1
    [event] = alarm_events(redis_client)
    frame_id = scores(redis_client, "cam1")[0].frame_id
    assert (event.type, event.camera, event.frame_id, event.score) == ("raised", "cam1", frame_id, 9.5)
    assert event.threshold == artifact.threshold and event.model == "tiny@1" and event.image is None
    assert redis_client.xlen(keys.event_outbox_key("cam1")) == 0
    # delivered once: a later pass finds nothing
    assert Publisher(redis_client).deliver_stale_events(["cam1"], min_age_s=0) == 0
    assert len(alarm_events(redis_client)) == 1


def test_an_unreadable_outbox_entry_is_dropped_with_an_error(redis_client, caplog):
    redis_client.xadd(keys.event_outbox_key("cam9"), {"type": "raised", "msg": b"\xc1garbage"})
    assert Publisher(redis_client).deliver_stale_events(["cam9"], min_age_s=0) == 0
    assert redis_client.xlen(keys.event_outbox_key("cam9")) == 0
    assert "unreadable outbox entry dropped" in caplog.text


def test_recovered_events_are_counted_per_camera(redis_client, artifact):
    push_frames(redis_client, "cam2", artifact.defect[:1])
    run_the_publish_script_and_die(redis_client, "cam2", artifact.threshold)
    registry = new_registry()
    metrics = WorkerMetrics.create(registry)
    metrics.init_camera("cam2")
    assert registry.get_sample_value("dfm_worker_alarm_events_recovered_total", {"camera": "cam2"}) == 0
    assert Publisher(redis_client, metrics=metrics).deliver_stale_events(["cam2"], min_age_s=0) == 1
    assert registry.get_sample_value("dfm_worker_alarm_events_recovered_total", {"camera": "cam2"}) == 1

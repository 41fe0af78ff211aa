"""Part inspections: a job judges the frames captured after its trigger and always ends in a result."""

import json

import cv2
import msgpack
import numpy as np
from inspection_helpers import warm_up, when_job_started, worker_thread
from worker_helpers import push_frame, push_frames

from dfm_stream import keys
from dfm_stream.cli import main
from dfm_stream.inspection import Inspector, Job, JobRequest, result_error_code
from dfm_stream.wire import FIELD, ResultMsg

CAM = "line1"


def published(client, camera: str = CAM) -> list[ResultMsg]:
    return [ResultMsg.from_bytes(f[FIELD.encode()]) for _, f in client.xrange(keys.results_key(camera))]


def is_jpeg(data: bytes | None) -> bool:
    return data is not None and cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None


def test_a_defective_part_is_ng_with_the_worst_frame_and_its_overlay(redis_client, redis_url, artifact):
    with worker_thread(redis_url, artifact.path, [CAM]):
        warm_up(redis_client, CAM, artifact.good[0])
        inspector = Inspector(redis_client)
        job = inspector.start(JobRequest(CAM, part_id="P-17", meas_id="M-1", frames=3, timeout_s=120))
        assert isinstance(job, Job)
        ids = push_frames(redis_client, CAM, [artifact.good[1], artifact.defect[0], artifact.good[2]], 1)
        result = inspector.run(job)
    assert (result.state, result.part_id, result.meas_id, result.frames) == ("ng", "P-17", "M-1", 3)
    assert result.frame_id == f"{CAM}:{ids[1]}"
    assert result.score > result.threshold == artifact.threshold
    assert result.model.startswith("tiny@") and result.reason is None
    assert result.image_overlay and is_jpeg(result.image)  # the raised event's overlay
    assert result.result_ts >= result.trigger_ts == job.trigger_ts
    assert published(redis_client) == [result]
    assert not redis_client.exists(keys.job_lock_key(CAM))


def test_a_good_part_is_ok_and_frames_before_the_trigger_do_not_count(redis_client, redis_url, artifact):
    with worker_thread(redis_url, artifact.path, [CAM]):
        warm_up(redis_client, CAM, artifact.defect[0])  # anomalous, but captured before the trigger
        inspector = Inspector(redis_client)
        job = inspector.start(JobRequest(CAM, part_id="P-1", frames=2, timeout_s=120))
        ids = push_frames(redis_client, CAM, artifact.good[:2], 1)
        result = inspector.run(job)
    assert (result.state, result.frames, result.want_frames) == ("ok", 2, 2)
    assert result.frame_id in {f"{CAM}:{i}" for i in ids}
    assert result.score <= result.threshold
    assert not result.image_overlay and is_jpeg(result.image)  # the frame itself: no alarm, no map


def test_a_window_judges_the_frames_captured_within_it(redis_client, redis_url, artifact):
    with worker_thread(redis_url, artifact.path, [CAM]):
        warm_up(redis_client, CAM, artifact.good[0])
        inspector = Inspector(redis_client)
        job = inspector.start(JobRequest(CAM, part_id="P-2", window_ms=1000, timeout_s=120))
        t = job.trigger_ts
        push_frame(redis_client, CAM, artifact.good[1], 1, ts=t + 100_000_000)
        push_frame(redis_client, CAM, artifact.good[2], 2, ts=t + 900_000_000)
        push_frame(redis_client, CAM, artifact.defect[0], 3, ts=t + 1_500_000_000)  # after the window
        result = inspector.run(job)
    assert (result.state, result.frames, result.window_ms, result.want_frames) == ("ok", 2, 1000, None)


def test_jobs_that_cannot_complete_end_in_an_error_result(redis_client, redis_url, artifact):
    push_frame(redis_client, CAM, artifact.good[0], 0)  # the camera exists; no worker scores it
    inspector = Inspector(redis_client)
    unknown = inspector.inspect(JobRequest("nowhere", part_id="P"))
    bad = inspector.inspect(JobRequest(CAM, part_id="P", frames=0))
    first = inspector.start(JobRequest(CAM, part_id="P1", meas_id="A", timeout_s=0.5))
    busy = inspector.inspect(JobRequest(CAM, part_id="P2", meas_id="B"))
    timed_out = inspector.run(first)
    codes = [result_error_code(r) for r in (unknown, bad, busy, timed_out)]
    assert codes == ["unknown_camera", "bad_request", "busy", "no_frame"]
    assert all(r.state == "error" and r.score is None and r.image is None for r in (unknown, bad, busy))
    assert (busy.meas_id, timed_out.meas_id) == ("B", "A")
    assert [r.result_id for r in published(redis_client)] == [first.job_id]  # refusals: returned only
    assert not redis_client.exists(keys.results_key("nowhere"))
    assert inspector.inspect(JobRequest(CAM, part_id="P3", timeout_s=0.2)).reason.startswith("no_frame")


def test_the_inspect_command_prints_the_result_as_json(redis_client, redis_url, artifact, capsys, tmp_path):
    with worker_thread(redis_url, artifact.path, [CAM]):
        warm_up(redis_client, CAM, artifact.good[0])
        pusher = when_job_started(
            redis_client, CAM, lambda: push_frame(redis_client, CAM, artifact.defect[1], 1)
        )
        capsys.readouterr()
        args = ["inspect", "--redis", redis_url, "--camera", CAM, "--part", "P-9", "--meas", "M-9"]
        code = main([*args, "--timeout", "120", "--image", str(tmp_path / "worst.jpg")])
        pusher.join(10)
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (out["state"], out["part_id"], out["meas_id"], out["source"]) == ("ng", "P-9", "M-9", "cli")
    assert out["image_bytes"] > 0 and is_jpeg((tmp_path / "worst.jpg").read_bytes())
    assert main(["results", "--redis", redis_url, "--camera", CAM]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["result_id"] == out["result_id"]
    assert main(["inspect", "--redis", redis_url, "--camera", CAM, "--part", "P", "--timeout", "0.2"]) == 1
    assert json.loads(capsys.readouterr().out)["reason"].startswith("no_frame")


def test_the_result_message_has_the_keys_docs_wire_format_lists(redis_client, artifact):
    from test_wire_format_doc import documented_keys

    push_frame(redis_client, CAM, artifact.good[0], 0)
    Inspector(redis_client).inspect(JobRequest(CAM, part_id="P", timeout_s=0.1))
    (entry,) = redis_client.xrange(keys.results_key(CAM))
    body = msgpack.unpackb(entry[1][b"msg"], raw=False)
    assert set(body) == documented_keys("## Result message")
    assert body["v"] == 1 and body["state"] == "error" and body["image"] is None

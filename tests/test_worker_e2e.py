"""End to end: a reader on a video with defective stretches -> a worker -> scores and alarms."""

import cv2
import numpy as np
from worker_helpers import SIZE, frame_ids, pending

from dfm_stream import keys
from dfm_stream.synthetic_parts import render_part
from dfm_stream.wire import FIELD, EventMsg, ScoreMsg

DEFECTIVE = set(range(8, 11)) | set(range(20, 23))


def write_video(path, artifact):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (SIZE, SIZE))
    assert writer.isOpened()
    rng = np.random.default_rng(3)
    for i in range(30):
        writer.write(
            artifact.defect[i % len(artifact.defect)] if i in DEFECTIVE else render_part(rng, SIZE)[0]
        )
    writer.release()


def test_defective_stretches_raise_and_clear_alarms_end_to_end(
    redis_client, redis_url, artifact, procs, tmp_path
):
    video = tmp_path / "line.avi"
    write_video(video, artifact)
    reader = procs.dfm(
        "read",
        "--redis",
        redis_url,
        "--camera",
        "cam1",
        "--source",
        str(video),
        "--no-pace",
        "--metrics-port",
        "-1",
        name="reader",
    )
    assert reader.wait(60) == 0, procs.log(reader)
    assert redis_client.xlen(keys.frames_key("cam1")) == 30
    worker = procs.dfm(
        "work",
        "--redis",
        redis_url,
        "--model",
        str(artifact.path),
        "--device",
        "cpu",
        "--burst",
        "--metrics-port",
        "-1",
        name="worker",
    )
    assert worker.wait(90) == 0, procs.log(worker)
    got = sorted(
        (ScoreMsg.from_bytes(f[FIELD.encode()]) for _, f in redis_client.xrange(keys.scores_key("cam1"))),
        key=lambda s: s.seq,
    )
    assert sorted(s.frame_id for s in got) == frame_ids(redis_client, "cam1")
    assert pending(redis_client, "cam1") == 0
    seq0 = got[0].seq
    anomalous = {s.seq - seq0 for s in got if s.anomalous}
    assert anomalous == DEFECTIVE
    events = [EventMsg.from_bytes(f[FIELD.encode()]) for _, f in redis_client.xrange(keys.alarms_key())]
    alarms = [(e.type, e.seq - seq0) for e in events if e.type in ("raised", "cleared")]
    assert alarms == [("raised", 8), ("cleared", 15), ("raised", 20), ("cleared", 27)]
    assert all(e.image for e in events if e.type == "raised")

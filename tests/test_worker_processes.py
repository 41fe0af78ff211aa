"""Real worker processes: sharing the work, SIGKILL and reclaim, SIGTERM with a batch in flight."""

import signal
from collections import Counter

from support import wait_until
from worker_helpers import frame_ids, pending, push_frames, scores

CAMS = ["c1", "c2", "c3", "c4"]


def worker_args(redis_url, artifact, *extra):
    return [
        "work",
        "--redis",
        redis_url,
        "--model",
        str(artifact.path),
        "--device",
        "cpu",
        "--metrics-port",
        "-1",
        *extra,
    ]


def heartbeats(client):
    return len(client.keys("dfm:worker:*"))


def test_two_workers_on_four_cameras_share_the_work(redis_client, redis_url, artifact, procs):
    args = worker_args(
        redis_url, artifact, "--cameras", ",".join(CAMS), "--batch-size", "2", "--max-wait-ms", "1"
    )
    workers = [procs.dfm(*args, name=f"w{i}") for i in range(2)]
    wait_until(lambda: heartbeats(redis_client) == 2, 60, what="both workers running")
    total = 0
    for _ in range(30):  # rounds until both workers scored something (usually the first)
        for cam in CAMS:
            push_frames(redis_client, cam, artifact.good[:4], start_seq=total)
        total += 4
        wait_until(
            lambda n=total: sum(len(scores(redis_client, c)) for c in CAMS) >= n * len(CAMS),
            90,
            what="scored",
        )
        if len({s.worker for c in CAMS for s in scores(redis_client, c)}) == 2:
            break
    for w in workers:
        assert procs.stop(w) == 0
    by_worker = Counter()
    for cam in CAMS:
        got = scores(redis_client, cam)
        assert sorted(s.frame_id for s in got) == frame_ids(redis_client, cam)  # each frame once
        by_worker.update(s.worker for s in got)
        assert pending(redis_client, cam) == 0
    assert len(by_worker) == 2, f"one worker did everything: {by_worker}"


def test_frames_of_a_sigkilled_worker_are_reclaimed(redis_client, redis_url, artifact, procs):
    doomed = procs.dfm(
        *worker_args(redis_url, artifact, "--cameras", "c1", "--batch-size", "50", "--max-wait-ms", "600000"),
        name="doomed",
    )
    push_frames(redis_client, "c1", artifact.good[:6])
    wait_until(lambda: pending(redis_client, "c1") == 6, 60, what="the first worker holding 6 frames")
    procs.stop(doomed, signal.SIGKILL)
    push_frames(redis_client, "c1", artifact.good[:4], start_seq=6)
    rescuer = procs.dfm(
        *worker_args(redis_url, artifact, "--cameras", "c1", "--claim-idle", "1", "--burst"), name="rescuer"
    )
    assert rescuer.wait(90) == 0, procs.log(rescuer)
    got = scores(redis_client, "c1")
    ids = Counter(s.frame_id for s in got)
    assert sorted(ids) == frame_ids(redis_client, "c1")
    assert max(ids.values()) == 1
    assert pending(redis_client, "c1") == 0
    assert "reclaimed 6 idle frames" in procs.log(rescuer)


def test_sigterm_publishes_and_acks_the_batch_in_flight(redis_client, redis_url, artifact, procs):
    worker = procs.dfm(
        *worker_args(redis_url, artifact, "--cameras", "c1", "--batch-size", "50", "--max-wait-ms", "600000"),
        name="w",
    )
    push_frames(redis_client, "c1", artifact.good[:5])
    wait_until(lambda: pending(redis_client, "c1") == 5, 60, what="a batch in flight")
    assert scores(redis_client, "c1") == []
    assert procs.stop(worker, signal.SIGTERM) == 0
    assert len(scores(redis_client, "c1")) == 5
    assert pending(redis_client, "c1") == 0

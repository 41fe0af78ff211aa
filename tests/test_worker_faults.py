"""Fault isolation in the worker: Redis errors while handing a batch on, Redis at ``maxmemory``.

Real ``redis-server``, real ``dfm-stream work`` processes where the fault is the process's.
"""

import pytest
import redis
from conftest import wait_until
from worker_helpers import GROUP, artifact, frame_ids, pending, push_frames, scores

from dfm_stream import keys

__all__ = ["artifact"]


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

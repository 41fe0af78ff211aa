"""A worker given its model as a file builds it at start and is ready then, before any frame arrives.

Real ``dfm-stream work`` processes on the tiny artifact and a real redis-server: ``/readyz`` turns
ready with no frame in any stream (it used to wait for a camera's first frames, which then waited
for the build), the build is logged before any frame exists, and frames pushed afterwards are
scored by the model that was built. With cameras discovered, the worker used to stay unready
until a camera appeared, and that camera's first frames then waited for the build.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis
from chaos_helpers import http_get, wait_metrics_port
from support import Processes, wait_until
from worker_helpers import Artifact, push_frames, scores

from dfm_stream import keys


def _ready(port: int) -> dict:
    return json.loads(http_get(port, "/readyz"))


def _check_ready_before_frames(procs: Processes, worker: object, client: redis.Redis, camera: str) -> None:
    port = wait_metrics_port(procs, worker)
    state = wait_until(lambda: (s := _ready(port))["ready"] and s, 120, what="/readyz ready")
    assert "tiny@" in state["detail"], state  # type: ignore[index]
    assert client.xlen(keys.frames_key(camera)) == 0  # no frame was ever sent
    log = procs.log(worker)
    assert "model tiny@" in log and " built from " in log, log
    assert "backbone at 64x64 runs on" in log  # the backbone runner exists already


def _check_frames_scored(
    procs: Processes, worker: object, client: redis.Redis, artifact: Artifact, camera: str
) -> None:
    push_frames(client, camera, artifact.good[:3])
    wait_until(lambda: len(scores(client, camera)) == 3, 60, what="3 scores")
    assert {s.model.split("@")[0] for s in scores(client, camera)} == {"tiny"}
    assert procs.stop(worker) == 0, procs.log(worker)


def test_work_model_file_is_ready_once_built_before_any_frame(
    procs: Processes, redis_url: str, redis_client: redis.Redis, artifact: Artifact
) -> None:
    """Cameras discovered: ready with no camera at all (it used to wait for a camera, then build)."""
    worker = procs.dfm(
        *("work", "--redis", redis_url, "--model", str(artifact.path), "--device", "cpu"),
        *("--metrics-port", "0"),
        name="worker",
    )
    _check_ready_before_frames(procs, worker, redis_client, "c1")
    state = _ready(wait_metrics_port(procs, worker))
    assert "no camera with frames yet" in state["detail"], state
    redis_client.hset(keys.cameras_key(), "c1", json.dumps({"camera": "c1"}))  # a producer of its own
    redis_client.zadd(keys.cameras_alive_key(), {"c1": time.time()})
    _check_frames_scored(procs, worker, redis_client, artifact, "c1")


def test_work_config_model_file_is_ready_once_built_before_any_frame(
    procs: Processes, redis_url: str, redis_client: redis.Redis, artifact: Artifact, tmp_path: Path
) -> None:
    config = tmp_path / "cams.toml"
    config.write_text(
        f'[redis]\nurl = "{redis_url}"\n\n'
        f'[[cameras]]\nid = "c2"\nsource = "synthetic:"\nmodel = "{artifact.path}"\n'
    )
    worker = procs.dfm(
        *("work", "--config", str(config), "--device", "cpu", "--metrics-port", "0"), name="worker"
    )
    _check_ready_before_frames(procs, worker, redis_client, "c2")
    _check_frames_scored(procs, worker, redis_client, artifact, "c2")


def test_worker_without_a_file_model_is_not_ready_without_cameras(procs: Processes, redis_url: str) -> None:
    """The registry gives no model until a camera is assigned one: not ready, and it says why."""
    worker = procs.dfm(
        *("work", "--redis", redis_url, "--device", "cpu", "--cameras", "c3", "--metrics-port", "0"),
        name="worker",
    )
    port = wait_metrics_port(procs, worker)
    wait_until(lambda: "connected to Redis" in procs.log(worker), 120, what="the worker running")
    state = _ready(port)
    assert state["ready"] is False and "no model" in state["detail"], state
    assert procs.stop(worker) == 0, procs.log(worker)

"""Camera ids and discovery: a worker follows only cameras it was given or that a live reader registered.

Real ``redis-server``, ``dfm-stream read`` and ``dfm-stream work`` processes. Names written into
``dfm:cameras`` by anyone without a reader heartbeat cost the worker nothing (no stream, no group),
discovered cameras are bounded by ``--max-cameras``, and each refusal is logged once.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from registry_helpers import tiny_artifact
from support import Processes, wait_until

from dfm_stream import keys
from dfm_stream.frame_codec import encode_frame
from dfm_stream.wire import FIELD

ALIVE = "dfm:cameras:alive"  # the documented heartbeat key (docs/wire-format.md)
WORKER_START_S = 120  # torch import + first model load on a busy 2-core machine


@pytest.mark.parametrize(
    ("name", "valid"),
    [("cam1", True), ("cam1\n", False), ("a" * 64, True), ("a" * 65, False), ("a" * 64 + "\n", False)],
)
def test_valid_name_matches_the_whole_id_up_to_64_characters(name: str, valid: bool) -> None:
    assert keys.valid_name(name) is valid


def _write(client: redis.Redis, camera: str, n: int) -> None:
    for seq in range(n):
        msg = encode_frame(np.full((64, 64, 3), 120, np.uint8), camera, seq, "s1")
        client.xadd(keys.frames_key(camera), {FIELD: msg.to_bytes()})


def _register(client: redis.Redis, camera: str, alive: bool) -> None:
    client.hset(keys.cameras_key(), camera, '{"source": {"kind": "external"}}')
    if alive:
        client.zadd(ALIVE, {camera: time.time()})


def _model(tmp_path: Path) -> str:
    path = tmp_path / "m.safetensors"
    path.write_bytes(tiny_artifact("layer1", seed=0))
    return str(path)


def _worker(procs: Processes, redis_url: str, model: str, *args: str) -> subprocess.Popen[bytes]:
    return procs.dfm(
        "work", "--redis", redis_url, "--model", model, "--device", "cpu", "--metrics-port", "-1",
        "--max-wait-ms", "20", *args, name="worker",
    )  # fmt: skip


def _wait_scored(procs: Processes, worker: subprocess.Popen[bytes], client: redis.Redis, camera: str) -> None:
    def done() -> bool:
        if worker.poll() is not None:
            pytest.fail(f"the worker exited early:\n{procs.log(worker)[-3000:]}")
        return client.xlen(keys.scores_key(camera)) > 0

    wait_until(done, WORKER_START_S, what=f"scores of {camera}")


def test_a_discovering_worker_follows_only_live_registered_cameras_up_to_its_bound(
    procs: Processes, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    pipe = redis_client.pipeline(transaction=False)
    for i in range(300):  # registered by someone, no reader behind them
        pipe.hset(keys.cameras_key(), f"fake{i}", "{}")
    pipe.execute()
    for camera in ("live1", "live2", "live3"):
        _register(redis_client, camera, alive=True)
    _register(redis_client, "bad\n", alive=True)  # an id that must never become a key
    for camera in ("live1", "live2", "live3", "fake7"):
        _write(redis_client, camera, 2)
    worker = _worker(procs, redis_url, _model(tmp_path), "--max-cameras", "2")
    _wait_scored(procs, worker, redis_client, "live1")
    _wait_scored(procs, worker, redis_client, "live2")

    _register(redis_client, "live0", alive=True)  # refused too: proves a later discovery pass ran
    wait_until(lambda: "'live0'" in procs.log(worker), 30, what="the refusal of live0")
    assert procs.stop(worker, signal.SIGTERM) == 0, procs.log(worker)[-3000:]
    log = procs.log(worker)
    assert log.count("'live3'") == 1, log[-3000:]
    assert log.count("'bad\\n'") == 1, log[-3000:]
    assert "--max-cameras" in log and "not a valid camera id" in log
    streams = {k.decode() for k in redis_client.scan_iter(match="dfm:{*}:frames", count=1000)}
    assert streams == {keys.frames_key(c) for c in ("live1", "live2", "live3", "fake7")}
    for camera in ("live3", "fake7"):  # never read: no consumer group, no score
        assert redis_client.xinfo_groups(keys.frames_key(camera)) == []
        assert redis_client.xlen(keys.scores_key(camera)) == 0


def test_a_reader_keeps_its_camera_alive_and_a_discovering_worker_scores_it(
    procs: Processes, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    reader = procs.dfm(
        "read", "--redis", redis_url, "--camera", "rcam", "--source", "synthetic:size=64x64",
        "--fps", "5", "--metrics-port", "-1", name="reader",
    )  # fmt: skip
    wait_until(lambda: redis_client.zscore(ALIVE, "rcam"), 60, what="the reader's heartbeat")
    assert redis_client.hexists(keys.cameras_key(), "rcam")
    worker = _worker(procs, redis_url, _model(tmp_path))
    _wait_scored(procs, worker, redis_client, "rcam")
    assert procs.stop(reader, signal.SIGTERM) == 0, procs.log(reader)[-3000:]
    assert procs.stop(worker, signal.SIGTERM) == 0, procs.log(worker)[-3000:]

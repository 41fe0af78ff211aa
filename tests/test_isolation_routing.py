"""Fault isolation of model routing: one camera's broken or missing model never stops the others.

Real ``redis-server`` and real ``dfm-stream work`` processes routed by the registry. Checked: a
broken assignment (unparseable, or a model whose keys are gone) and a config model that is not in
the registry are each reported once (log line, ``model_load_failed`` event), the other cameras keep
scoring, the broken camera's frames wait and are scored once it is fixed; ``model unassign`` is
followed by a running worker; frames of a camera without a model never burn deliveries.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import redis
from registry_helpers import tiny_artifact
from support import Processes, wait_until

from dfm_stream import keys
from dfm_stream.frame_codec import encode_frame
from dfm_stream.registry import ModelRef, ModelRegistry
from dfm_stream.wire import FIELD, EventMsg, ScoreMsg

WORKER_START_S = 120  # torch import + first model load on a busy 2-core machine
GROUP = keys.DEFAULT_GROUP


def _write(client: redis.Redis, camera: str, n: int, start: int = 0) -> list[str]:
    rng = np.random.default_rng(start)
    ids = []
    for seq in range(start, start + n):
        msg = encode_frame(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), camera, seq, "s1")
        ids.append(client.xadd(keys.frames_key(camera), {FIELD: msg.to_bytes()}).decode())
    return ids


def _scores(client: redis.Redis, camera: str) -> list[ScoreMsg]:
    return [ScoreMsg.from_bytes(f[FIELD.encode()]) for _, f in client.xrange(keys.scores_key(camera))]


def _wait_scored(
    procs: Processes, worker: subprocess.Popen[bytes], client: redis.Redis, camera: str, n: int
) -> None:
    def done() -> bool:
        if worker.poll() is not None:
            pytest.fail(f"the worker exited early:\n{procs.log(worker)[-3000:]}")
        return client.xlen(keys.scores_key(camera)) >= n

    wait_until(done, WORKER_START_S, what=f"{n} scores of {camera}")


def _load_failures(client: redis.Redis) -> list[EventMsg]:
    events = (EventMsg.from_bytes(f[FIELD.encode()]) for _, f in client.xrange(keys.alarms_key()))
    return [e for e in events if e.type == "model_load_failed"]


def _worker(procs: Processes, redis_url: str, *args: str) -> subprocess.Popen[bytes]:
    return procs.dfm(
        "work", "--redis", redis_url, "--batch-size", "16", "--max-wait-ms", "20", "--device", "cpu",
        "--metrics-port", "-1", *args, name="worker",
    )  # fmt: skip


def _delete_model(client: redis.Redis, name: str) -> None:
    client.delete(keys.model_versions_key(name), keys.model_current_key(name), keys.model_chunks_key(name, 1))
    client.srem(keys.models_key(), name)


def test_broken_assignments_are_reported_once_and_do_not_stop_the_other_cameras(
    procs: Processes, redis_url: str, redis_client: redis.Redis
) -> None:
    registry = ModelRegistry(redis_client)
    registry.push("m", tiny_artifact("layer1", seed=0))
    registry.push("gone", tiny_artifact("layer1", seed=1))
    registry.assign("cam1", ModelRef("m"))
    registry.assign("cam3", ModelRef("gone"))
    _delete_model(redis_client, "gone")  # its keys vanish while a camera is assigned to it
    redis_client.hset(keys.assignments_key(), "cam2", "not a @ reference")
    for camera in ("cam1", "cam2", "cam3"):
        _write(redis_client, camera, 4)
    worker = _worker(procs, redis_url, "--cameras", "cam1,cam2,cam3")
    _wait_scored(procs, worker, redis_client, "cam1", 4)
    wait_until(lambda: len(_load_failures(redis_client)) >= 2, 30, what="two model_load_failed events")
    for round_ in range(1, 4):  # many loop iterations later, still said once
        _write(redis_client, "cam1", 4, start=4 * round_)
        _wait_scored(procs, worker, redis_client, "cam1", 4 * (round_ + 1))
    log = procs.log(worker)
    assert log.count("camera cam2: no usable model") == 1, log[-3000:]
    assert log.count("camera cam3: no usable model") == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    failures = _load_failures(redis_client)
    assert sorted((e.camera, e.reason) for e in failures) == [("cam2", "unresolved"), ("cam3", "unresolved")]
    for camera in ("cam2", "cam3"):  # their frames wait, untouched
        assert redis_client.xlen(keys.scores_key(camera)) == 0
        assert redis_client.xlen(keys.frames_key(camera)) == 4
    assert redis_client.xlen(keys.deadletter_key()) == 0

    redis_client.hset(keys.assignments_key(), "cam2", "m")  # fixed behind the registry's back: retried
    _wait_scored(procs, worker, redis_client, "cam2", 4)
    registry.push("gone", tiny_artifact("layer1", seed=1))  # the model is back
    _wait_scored(procs, worker, redis_client, "cam3", 4)
    assert {s.model for s in _scores(redis_client, "cam2")} == {"m@1"}
    assert {s.model for s in _scores(redis_client, "cam3")} == {"gone@1"}
    assert procs.stop(worker, signal.SIGTERM) == 0, procs.log(worker)[-3000:]


def test_config_models_missing_from_the_registry_wait_quietly_until_pushed(
    procs: Processes, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    registry = ModelRegistry(redis_client)
    registry.push("m", tiny_artifact("layer1", seed=0))
    config = tmp_path / "cameras.toml"
    config.write_text(
        '[[cameras]]\nid = "line1"\nsource = "0"\n\n'  # the worker default: bolts (not pushed)
        '[[cameras]]\nid = "line2"\nsource = "0"\nmodel = "bolts@3"\n\n'
        '[[cameras]]\nid = "line3"\nsource = "0"\nmodel = "m"\n\n'
        '[worker]\nmodel = "bolts"\n'
    )
    for camera in ("line1", "line2", "line3"):
        _write(redis_client, camera, 4)
    worker = _worker(procs, redis_url, "--config", str(config))
    _wait_scored(procs, worker, redis_client, "line3", 4)
    wait_until(lambda: len(_load_failures(redis_client)) >= 2, 30, what="two model_load_failed events")
    for round_ in range(1, 3):
        _write(redis_client, "line3", 4, start=4 * round_)
        _wait_scored(procs, worker, redis_client, "line3", 4 * (round_ + 1))
    log = procs.log(worker)
    assert "Traceback" not in log and "RegistryError" not in log, log[-3000:]
    assert log.count("camera line1: no usable model") == 1, log[-3000:]
    assert log.count("camera line2: no usable model") == 1, log[-3000:]
    failures = sorted((e.camera, e.model) for e in _load_failures(redis_client))
    assert failures == [("line1", "bolts"), ("line2", "bolts@3")]
    assert redis_client.xlen(keys.deadletter_key()) == 0

    for seed in range(3):  # bolts@1..3: both cameras get their model and their waiting frames scored
        registry.push("bolts", tiny_artifact("layer1", seed=seed))
    _wait_scored(procs, worker, redis_client, "line1", 4)
    _wait_scored(procs, worker, redis_client, "line2", 4)
    assert {s.model for s in _scores(redis_client, "line1")} <= {"bolts@1", "bolts@2", "bolts@3"}
    assert {s.model for s in _scores(redis_client, "line2")} == {"bolts@3"}
    assert procs.stop(worker, signal.SIGTERM) == 0, procs.log(worker)[-3000:]


def test_a_running_worker_follows_unassign(
    procs: Processes, redis_url: str, redis_client: redis.Redis
) -> None:
    registry = ModelRegistry(redis_client)
    registry.push("m", tiny_artifact("layer1", seed=0))
    registry.assign("cam1", ModelRef("m"))
    registry.assign("cam2", ModelRef("m"))
    worker = _worker(procs, redis_url, "--cameras", "cam1,cam2")
    _write(redis_client, "cam1", 3)
    _wait_scored(procs, worker, redis_client, "cam1", 3)

    registry.unassign("cam1")
    registry.push("m2", tiny_artifact("layer1", seed=1))
    registry.assign("cam2", ModelRef("m2"))  # once the worker says so, it has seen the unassign too
    wait_until(lambda: "camera cam2 is scored by m2@1" in procs.log(worker), 60, what="the switch of cam2")
    _write(redis_client, "cam1", 3, start=3)
    _write(redis_client, "cam2", 3)
    _wait_scored(procs, worker, redis_client, "cam2", 3)  # the worker read on past cam1's new frames
    assert procs.stop(worker, signal.SIGTERM) == 0, procs.log(worker)[-3000:]
    assert redis_client.xlen(keys.scores_key("cam1")) == 3, "cam1 is not scored after unassign"
    assert "camera cam1 is no longer scored" in procs.log(worker)
    group = next(g for g in redis_client.xinfo_groups(keys.frames_key("cam1")) if g["name"] == GROUP.encode())
    assert group["pending"] == 0  # the new frames were not even read: they wait for a model


def test_frames_of_a_camera_without_a_model_are_not_reclaimed_or_dead_lettered(
    procs: Processes, redis_url: str, redis_client: redis.Redis
) -> None:
    registry = ModelRegistry(redis_client)
    registry.push("m", tiny_artifact("layer1", seed=0))
    registry.assign("cam1", ModelRef("m"))  # cam2 has no model
    for camera in ("cam1", "cam2"):  # a worker read them and died: pending, delivered once
        redis_client.xgroup_create(keys.frames_key(camera), GROUP, id="0", mkstream=True)
        _write(redis_client, camera, 3)
        redis_client.xreadgroup(GROUP, "dead", {keys.frames_key(camera): ">"})
    worker = _worker(
        procs, redis_url, "--cameras", "cam1,cam2", "--claim-idle", "0.2", "--max-deliveries", "2"
    )
    _wait_scored(procs, worker, redis_client, "cam1", 3)
    for round_ in range(1, 4):  # each needs one more reclaim pass: more passes than max-deliveries
        with redis_client.pipeline(transaction=True) as pipe:  # written and taken by "dead" at once
            msg = encode_frame(np.zeros((64, 64, 3), np.uint8), "cam1", 2 + round_, "s1")
            pipe.xadd(keys.frames_key("cam1"), {FIELD: msg.to_bytes()})
            pipe.xreadgroup(GROUP, "dead", {keys.frames_key("cam1"): ">"})
            pipe.execute()
        _wait_scored(procs, worker, redis_client, "cam1", 3 + round_)
    assert redis_client.xlen(keys.deadletter_key()) == 0, "a good frame was dead-lettered"
    rows = redis_client.xpending_range(keys.frames_key("cam2"), GROUP, "-", "+", 10)
    assert [(r["consumer"], r["times_delivered"]) for r in rows] == [(b"dead", 1)] * 3

    registry.assign("cam2", ModelRef("m"))  # now they are reclaimed and scored
    _wait_scored(procs, worker, redis_client, "cam2", 3)
    assert procs.stop(worker, signal.SIGTERM) == 0, procs.log(worker)[-3000:]
    assert redis_client.xlen(keys.deadletter_key()) == 0

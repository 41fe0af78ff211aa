"""Hot reload: a running ``dfm-stream work`` follows the registry (push, rollback, assign) without loss.

The worker is a real subprocess routed by the registry (no ``--model``). Frames are written while
models are switched; the checks are that every frame is scored exactly once, that each score
names a version and really carries that version's score, that versions never interleave (a
switch happens at a batch boundary), and that every frame written after the worker acknowledged
a switch (its "camera X is scored by M" log line) is scored by the new version.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import redis
from registry_helpers import tiny_artifact
from support import Processes, wait_until

from dfm_stream import keys
from dfm_stream.artifact import load_artifact
from dfm_stream.frame_codec import decode_frame, encode_frame
from dfm_stream.inference import Engine
from dfm_stream.registry import ModelRef, ModelRegistry
from dfm_stream.wire import FIELD, EventMsg, FrameMsg, ScoreMsg

BATCH = 4
STREAM_INTERVAL_S = 0.01  # the camera's frame period while a switch happens (100 fps)
WORKER_START_S = 120  # torch import + first model load on a busy 2-core machine


@dataclass
class Feed:
    """Writes frames of one camera and remembers what it wrote (frame id -> message)."""

    client: redis.Redis
    camera: str
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    sent: dict[str, FrameMsg] = field(default_factory=dict)
    seq: int = 0

    def write(self, n: int) -> list[str]:
        """XADD ``n`` random 64 px frames; return their frame ids."""
        ids = []
        for _ in range(n):
            image = self.rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            msg = encode_frame(image, self.camera, self.seq, "s1")
            entry = self.client.xadd(keys.frames_key(self.camera), {FIELD: msg.to_bytes()}).decode()
            frame_id = f"{self.camera}:{entry}"
            self.sent[frame_id] = msg
            ids.append(frame_id)
            self.seq += 1
        return ids

    @contextlib.contextmanager
    def streaming(self, interval_s: float = STREAM_INTERVAL_S) -> Iterator[None]:
        """Write a frame every ``interval_s`` in a background thread while the block runs."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval_s):
                self.write(1)

        thread = threading.Thread(target=loop, name="camera")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(10)

    def wait_sent(self, n: int, what: str) -> None:
        """Wait until ``n`` frames in all have been written (by :meth:`streaming`)."""
        wait_until(lambda: len(self.sent) >= n, 30, what=what)


def _scores(client: redis.Redis, camera: str) -> list[ScoreMsg]:
    return [ScoreMsg.from_bytes(f[FIELD.encode()]) for _, f in client.xrange(keys.scores_key(camera))]


def _scored_by_frame(client: redis.Redis, camera: str, expected: int) -> dict[str, ScoreMsg]:
    """Wait until ``expected`` scores exist; return frame id -> score (failing on any duplicate)."""
    wait_until(
        lambda: client.xlen(keys.scores_key(camera)) >= expected, 60, what=f"{expected} scores of {camera}"
    )
    scores = _scores(client, camera)
    by_frame = {s.frame_id: s for s in scores}
    assert len(by_frame) == len(scores), "a frame was scored twice"
    return by_frame


def _wait_ack(procs: Processes, worker: subprocess.Popen[bytes], camera: str, label: str, count: int) -> None:
    """Wait for the worker's ``count``-th "camera CAMERA is scored by LABEL" log line."""
    line = f"camera {camera} is scored by {label}\n"

    def acked() -> bool:
        if worker.poll() is not None:
            pytest.fail(f"the worker exited early:\n{procs.log(worker)[-3000:]}")
        return procs.log(worker).count(line) >= count

    wait_until(acked, WORKER_START_S, what=f"the worker to switch {camera} to {label}")


def _check_scores_match_versions(
    registry: ModelRegistry, feed: Feed, scores: dict[str, ScoreMsg], labels: set[str]
) -> None:
    """Each score is what the version it names gives for that frame, closer than any other version's."""
    engine = Engine("cpu", "fp32")
    images = {fid: decode_frame(msg) for fid, msg in feed.sent.items()}
    order = sorted(images)
    expected: dict[str, dict[str, float]] = {fid: {} for fid in order}
    for label in labels:
        ref = ModelRef.parse(label)
        fitted = load_artifact(registry.get_bytes(ref.name, ref.version))
        model = engine.prepare(fitted.model)
        batch = engine.to_tensor([images[f] for f in order], fitted.info.image_size)
        for fid, value in zip(order, engine.score(model, batch).scores, strict=True):
            expected[fid][label] = float(value)
    for fid, score in scores.items():
        assert score.status == "scored" and score.score is not None
        named = expected[fid][score.model]
        assert score.score == pytest.approx(named, rel=1e-3), (fid, score.model, score.score, expected[fid])
        closest = min(expected[fid], key=lambda label: abs(expected[fid][label] - score.score))
        assert closest == score.model, (fid, score.model, score.score, expected[fid])


def _collapse(labels: list[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        if not out or out[-1] != label:
            out.append(label)
    return out


def _start_worker(procs: Processes, redis_url: str, cameras: str) -> subprocess.Popen[bytes]:
    return procs.dfm(
        "work",
        "--redis",
        redis_url,
        "--cameras",
        cameras,
        "--batch-size",
        str(BATCH),
        "--max-wait-ms",
        "20",
        "--device",
        "cpu",
        "--metrics-port",
        "-1",
        name="worker",
    )


def test_switches_during_a_stream_score_every_frame_once_by_the_assigned_version(
    procs: Processes, redis_url: str, redis_client: redis.Redis
) -> None:
    registry = ModelRegistry(redis_client)
    registry.push("m", tiny_artifact("layer1", seed=0))
    registry.assign("cam1", ModelRef("m"))
    worker = _start_worker(procs, redis_url, "cam1")
    _wait_ack(procs, worker, "cam1", "m@1", 1)
    feed = Feed(redis_client, "cam1")
    after_ack: dict[str, str] = {fid: "m@1" for fid in feed.write(6)}
    _scored_by_frame(redis_client, "cam1", len(feed.sent))

    switches = [
        (lambda: registry.push("m", tiny_artifact("layer1", seed=1)), "m@2", 1),
        (lambda: registry.push("m", tiny_artifact("layer1", seed=2)), "m@3", 1),
        (lambda: registry.rollback("m"), "m@2", 2),
        (lambda: registry.assign("cam1", ModelRef("m", 1)), "m@1", 2),
    ]
    for switch, label, count in switches:
        with feed.streaming():  # frames keep coming while the switch happens: old or new version
            feed.wait_sent(len(feed.sent) + 2 * BATCH, "frames before the switch")
            switch()
            feed.wait_sent(len(feed.sent) + BATCH, "frames after the switch")
        _wait_ack(procs, worker, "cam1", label, count)
        after_ack.update({fid: label for fid in feed.write(6)})
        _scored_by_frame(redis_client, "cam1", len(feed.sent))  # scored before the next switch

    scores = _scored_by_frame(redis_client, "cam1", len(feed.sent))
    assert set(scores) == set(feed.sent), "every frame written is scored, and nothing else"
    in_order = [scores[fid].model for fid in sorted(scores, key=lambda f: feed.sent[f].seq)]
    assert _collapse(in_order) == ["m@1", "m@2", "m@3", "m@2", "m@1"], in_order
    switches = [
        (e.model, e.message)
        for e in (EventMsg.from_bytes(f[FIELD.encode()]) for _, f in redis_client.xrange(keys.alarms_key()))
        if e.type == "model_switched" and e.camera == "cam1"
    ]
    assert switches == [
        ("m@2", "switched from m@1"),
        ("m@3", "switched from m@2"),
        ("m@2", "switched from m@3"),
        ("m@1", "switched from m@2"),
    ]
    for fid, label in after_ack.items():
        assert scores[fid].model == label, f"{fid} was written after the switch to {label} was acknowledged"
    _check_scores_match_versions(registry, feed, scores, {"m@1", "m@2", "m@3"})
    assert procs.stop(worker, signal.SIGTERM) == 0, procs.log(worker)[-3000:]
    assert redis_client.xpending(keys.frames_key("cam1"), keys.DEFAULT_GROUP)["pending"] == 0


def test_each_camera_keeps_its_assigned_working_model(
    procs: Processes, redis_url: str, redis_client: redis.Redis
) -> None:
    """Pins hold; a version that fails to load leaves the camera on its working one; unpin -> current."""
    registry = ModelRegistry(redis_client, chunk_size=200_000)
    registry.push("bottle", tiny_artifact("layer1", seed=0))
    registry.push("cable", tiny_artifact("layer2", seed=3))
    registry.push("cable", tiny_artifact("layer2", seed=4))  # current: cable@2
    registry.assign("cam1", ModelRef("bottle"))
    registry.assign("cam2", ModelRef("cable", 1))  # pinned: the newer current must not reach it
    worker = _start_worker(procs, redis_url, "cam1,cam2")
    _wait_ack(procs, worker, "cam1", "bottle@1", 1)
    _wait_ack(procs, worker, "cam2", "cable@1", 1)
    feed1, feed2 = Feed(redis_client, "cam1"), Feed(redis_client, "cam2", rng=np.random.default_rng(1))
    feed1.write(5)
    feed2.write(5)
    scores1 = _scored_by_frame(redis_client, "cam1", 5)
    scores2 = _scored_by_frame(redis_client, "cam2", 5)
    assert {s.model for s in scores1.values()} == {"bottle@1"}
    assert {s.model for s in scores2.values()} == {"cable@1"}

    # bottle@2 passes the push, then its stored bytes rot: the worker keeps bottle@1 and says so
    registry.assign("cam1", ModelRef("bottle", 1))
    registry.push("bottle", tiny_artifact("layer1", seed=5))
    chunks = keys.model_chunks_key("bottle", 2)
    redis_client.lset(chunks, 0, b"rotten" + redis_client.lindex(chunks, 0)[6:])
    registry.assign("cam1", ModelRef("bottle", 2))

    def failure_event() -> EventMsg | None:
        for _, fields in redis_client.xrange(keys.alarms_key()):
            event = EventMsg.from_bytes(fields[FIELD.encode()])
            if event.type == "model_load_failed":
                return event
        return None

    event = wait_until(failure_event, 60, what="a model_load_failed event")
    assert isinstance(event, EventMsg)
    assert (event.camera, event.model) == ("cam1", "bottle@2")
    assert "checksum" in (event.message or "")
    assert "cannot load model bottle@2" in procs.log(worker)
    feed1.write(5)
    scores1 = _scored_by_frame(redis_client, "cam1", 10)
    assert {s.model for s in scores1.values()} == {"bottle@1"}, "the camera keeps its working model"

    # unpinning cam2 moves it to cable's current version; cam1 is untouched
    registry.assign("cam2", ModelRef("cable"))
    _wait_ack(procs, worker, "cam2", "cable@2", 1)
    late = set(feed2.write(5))
    scores2 = _scored_by_frame(redis_client, "cam2", 10)
    assert {scores2[f].model for f in late} == {"cable@2"}
    _check_scores_match_versions(registry, feed2, scores2, {"cable@1", "cable@2"})
    _check_scores_match_versions(registry, feed1, scores1, {"bottle@1"})
    assert procs.stop(worker, signal.SIGTERM) == 0, procs.log(worker)[-3000:]

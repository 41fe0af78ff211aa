"""Shadow scoring and promotion with a real ``dfm-stream work`` process and real CLI commands.

A camera runs on m@1; ``model shadow`` makes the worker score its frames with m@2 too (a refit of
the same backbone, so the backbone is built once), publishing to ``dfm:{cam1}:shadow`` without
alarms; ``model compare`` prints the comparison; ``model promote`` switches the camera to m@2 at a
batch boundary with every frame scored once, and ``model rollback --camera`` returns it to m@1.
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import redis
from registry_helpers import tiny_artifact
from support import Processes, wait_until
from test_hot_reload import BATCH, Feed, _collapse, _scored_by_frame, _start_worker, _wait_ack

from dfm_stream import keys
from dfm_stream.artifact import load_artifact
from dfm_stream.frame_codec import decode_frame, encode_frame
from dfm_stream.inference import Engine
from dfm_stream.registry import ModelRef, ModelRegistry
from dfm_stream.wire import FIELD, EventMsg, ShadowMsg

CLI_TIMEOUT_S = 120
N_FRAMES = 40


def _median_threshold(artifact: bytes) -> float:
    """The median score of the artifact's model over 32 random 64 px JPEG frames like the feed's."""
    engine = Engine("cpu", "fp32")
    fitted = load_artifact(artifact)
    rng = np.random.default_rng(123)
    images = [
        decode_frame(encode_frame(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "x", i, "s"))
        for i in range(32)
    ]
    batch = engine.to_tensor(images, fitted.info.image_size)
    return float(np.median(engine.score(engine.prepare(fitted.model), batch).scores))


def _shadow_msgs(client: redis.Redis, camera: str) -> list[ShadowMsg]:
    return [ShadowMsg.from_bytes(f[FIELD.encode()]) for _, f in client.xrange(keys.shadow_key(camera))]


def _events(client: redis.Redis) -> list[EventMsg]:
    return [EventMsg.from_bytes(f[FIELD.encode()]) for _, f in client.xrange(keys.alarms_key())]


def test_shadow_compare_promote_and_rollback_score_every_frame_once(
    procs: Processes, redis_url: str, redis_client: redis.Redis
) -> None:
    registry = ModelRegistry(redis_client)
    t1 = _median_threshold(tiny_artifact("layer1", seed=0))
    t2 = _median_threshold(tiny_artifact("layer1", seed=0, data_seed=7))
    registry.push("m", tiny_artifact("layer1", seed=0, threshold=t1))
    registry.push("m", tiny_artifact("layer1", seed=0, threshold=t2, data_seed=7))  # same backbone, new fit
    registry.assign("cam1", ModelRef("m", 1))
    worker = _start_worker(procs, redis_url, "cam1")
    _wait_ack(procs, worker, "cam1", "m@1", 1)

    out = procs.run_dfm(
        "model",
        "shadow",
        "--redis",
        redis_url,
        "--camera",
        "cam1",
        "--model",
        "m@2",
        name="shadow",
        timeout=CLI_TIMEOUT_S,
    )
    assert "camera cam1 is shadowed by m@2" in out
    wait_until(lambda: "camera cam1 is shadowed by m@2" in procs.log(worker), 60, what="the worker to shadow")
    feed = Feed(redis_client, "cam1")
    feed.write(N_FRAMES)
    scores = _scored_by_frame(redis_client, "cam1", N_FRAMES)
    wait_until(lambda: redis_client.xlen(keys.shadow_key("cam1")) >= N_FRAMES, 60, what="shadow scores")

    # every frame scored live by m@1 and in the shadow by m@2, with the live score beside it
    shadows = {m.frame_id: m for m in _shadow_msgs(redis_client, "cam1")}
    assert set(shadows) == set(feed.sent) == set(scores)
    assert {s.model for s in scores.values()} == {"m@1"}
    for fid, m in shadows.items():
        assert (m.model, m.live_model) == ("m@2", "m@1")
        assert m.live_score == pytest.approx(scores[fid].score, rel=1e-9)
        assert m.live_anomalous == scores[fid].anomalous
        assert m.anomalous == (m.score > t2)
    only_live = {f for f, m in shadows.items() if m.live_anomalous and not m.anomalous}
    only_shadow = {f for f, m in shadows.items() if m.anomalous and not m.live_anomalous}
    assert only_live or only_shadow, "the test data should make the two versions disagree somewhere"
    assert all(e.model != "m@2" for e in _events(redis_client)), "a shadow score raised an event"

    # the shared backbone was built once: one runner for both versions
    log = procs.log(worker)
    assert log.count("backbone at 64x64 runs on") == 1, log[-3000:]
    assert "backbone shared with a loaded version" in log

    out = procs.run_dfm(
        "model",
        "compare",
        "--redis",
        redis_url,
        "--camera",
        "cam1",
        "--json",
        name="compare",
        timeout=CLI_TIMEOUT_S,
    )
    report = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert report["frames"] == N_FRAMES
    assert report["agree"] == N_FRAMES - len(only_live) - len(only_shadow)
    assert (report["only_live"], report["only_shadow"]) == (len(only_live), len(only_shadow))
    listed = {d["frame_id"]: d["flagged_by"] for d in report["disagreements"]}
    assert listed == {**dict.fromkeys(only_live, "live"), **dict.fromkeys(only_shadow, "shadow")}
    live = np.array([shadows[f].live_score for f in sorted(shadows)])
    cand = np.array([shadows[f].score for f in sorted(shadows)])
    assert report["pearson"] == pytest.approx(float(np.corrcoef(live, cand)[0, 1]), abs=1e-6)
    assert -1.0 <= report["spearman"] <= 1.0 and report["spearman_frames"] == N_FRAMES
    text = procs.run_dfm(
        "model",
        "compare",
        "--redis",
        redis_url,
        "--camera",
        "cam1",
        name="compare-text",
        timeout=CLI_TIMEOUT_S,
    )
    assert f"frames compared            {N_FRAMES}" in text
    for fid in only_live | only_shadow:
        assert fid in text

    # promote while frames stream: one switch at a batch boundary, every frame scored once
    with feed.streaming():
        feed.wait_sent(len(feed.sent) + 2 * BATCH, "frames before the promotion")
        procs.run_dfm(
            "model",
            "promote",
            "--redis",
            redis_url,
            "--camera",
            "cam1",
            name="promote",
            timeout=CLI_TIMEOUT_S,
        )
        feed.wait_sent(len(feed.sent) + BATCH, "frames after the promotion")
    _wait_ack(procs, worker, "cam1", "m@2", 1)
    wait_until(lambda: "shadow scoring by m@2 stopped" in procs.log(worker), 60, what="the shadow to stop")
    after_promote = set(feed.write(6))
    scores = _scored_by_frame(redis_client, "cam1", len(feed.sent))
    assert {scores[f].model for f in after_promote} == {"m@2"}
    assert registry.resolve("cam1") == ModelRef("m", 2)
    assert redis_client.hget(keys.shadows_key(), "cam1") is None

    # rollback --camera: back to m@1, and the frames after it are scored by m@1
    procs.run_dfm(
        "model", "rollback", "--redis", redis_url, "--camera", "cam1", name="rollback", timeout=CLI_TIMEOUT_S
    )
    _wait_ack(procs, worker, "cam1", "m@1", 2)
    after_rollback = set(feed.write(6))
    scores = _scored_by_frame(redis_client, "cam1", len(feed.sent))
    assert {scores[f].model for f in after_rollback} == {"m@1"}
    assert set(scores) == set(feed.sent), "every frame written is scored, and nothing else"
    in_order = [scores[fid].model for fid in sorted(scores, key=lambda f: feed.sent[f].seq)]
    assert _collapse(in_order) == ["m@1", "m@2", "m@1"], in_order
    assert procs.log(worker).count("backbone at 64x64 runs on") == 1
    assert procs.stop(worker, signal.SIGTERM) == 0, procs.log(worker)[-3000:]
    assert redis_client.xpending(keys.frames_key("cam1"), keys.DEFAULT_GROUP)["pending"] == 0

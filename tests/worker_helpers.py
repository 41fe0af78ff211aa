"""Helpers shared by the worker tests: fitting the tiny artifact, frame pushing, stream reading.

Plain functions only: the session fixture ``artifact`` (built by :func:`fit_artifact`) is in
``artifact_fixtures.py`` and reaches tests by injection, never by import.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis
import torch

from dfm_stream import keys
from dfm_stream.artifact import ArtifactInfo, save_artifact
from dfm_stream.config import AlarmsConfig
from dfm_stream.frame_codec import encode_frame
from dfm_stream.images import preprocess
from dfm_stream.inference import Engine
from dfm_stream.model import Dfm
from dfm_stream.routing import ModelRouter
from dfm_stream.synthetic_parts import render_part
from dfm_stream.wire import FIELD, ScoreMsg
from dfm_stream.worker import Worker, WorkerSettings, WorkerStats

SIZE = 64
GROUP = keys.DEFAULT_GROUP


@dataclass
class Artifact:
    """A fitted tiny model on disk, with sample frames it separates."""

    path: Path
    threshold: float
    good: list[np.ndarray]
    defect: list[np.ndarray]


def fit_artifact(directory: Path) -> Artifact:
    """Fit resnet18/layer2 (random weights, 64 px) on good synthetic parts; threshold between good and bad.

    The artifact is saved as ``directory/tiny.safetensors``.
    """
    rng = np.random.default_rng(7)
    train = [render_part(rng, SIZE)[0] for _ in range(24)]
    good = [render_part(rng, SIZE)[0] for _ in range(8)]
    defect = [render_part(rng, SIZE, "scratch" if i % 2 else "spot")[0] for i in range(8)]
    torch.manual_seed(0)
    trainer = Dfm(
        backbone="resnet18", layer="layer2", pre_trained=False, pooling_kernel_size=2, pca_level=0.9
    )
    model = trainer.fit([preprocess(train[:12], (SIZE, SIZE)), preprocess(train[12:], (SIZE, SIZE))])
    with torch.no_grad():
        good_scores = model(preprocess(good, (SIZE, SIZE))).pred_score.tolist()
        bad_scores = model(preprocess(defect, (SIZE, SIZE))).pred_score.tolist()
    hi_good = max(good_scores)
    keep = [img for img, s in zip(defect, bad_scores, strict=True) if s > hi_good * 1.15]
    assert len(keep) >= 3, f"the tiny model does not separate the parts: {good_scores} vs {bad_scores}"
    lo_bad = min(s for s in bad_scores if s > hi_good * 1.15)
    threshold = (hi_good + lo_bad) / 2
    info = dataclasses.replace(
        ArtifactInfo.for_model(model, (SIZE, SIZE), len(train)),
        threshold=threshold,
        score_min=min(good_scores),
        score_max=max(bad_scores),
    )
    path = directory / "tiny.safetensors"
    save_artifact(path, model, info)
    return Artifact(path, threshold, good, keep)


def push_frame(
    client: redis.Redis,
    camera: str,
    image: np.ndarray,
    seq: int,
    session: str = "s1",
    ts: int | None = None,
    maxlen: int | None = None,
) -> str:
    """XADD one encoded frame to ``camera``'s frame stream; return the entry id."""
    msg = encode_frame(image, camera, seq, session, ts=ts)
    kwargs = {"maxlen": maxlen, "approximate": False} if maxlen else {}
    return client.xadd(keys.frames_key(camera), {FIELD: msg.to_bytes()}, **kwargs).decode()


def push_frames(client: redis.Redis, camera: str, images: list[np.ndarray], start_seq: int = 0) -> list[str]:
    """Push ``images`` with consecutive seqs; return the entry ids."""
    return [push_frame(client, camera, img, start_seq + i) for i, img in enumerate(images)]


def scores(client: redis.Redis, camera: str) -> list[ScoreMsg]:
    """Return every score message of ``camera``."""
    return [ScoreMsg.from_bytes(f[FIELD.encode()]) for _, f in client.xrange(keys.scores_key(camera))]


def frame_ids(client: redis.Redis, camera: str) -> list[str]:
    """Return the frame ids of every entry still in ``camera``'s frame stream."""
    return [f"{camera}:{i.decode()}" for i, _ in client.xrange(keys.frames_key(camera))]


def pending(client: redis.Redis, camera: str) -> int:
    """Return the number of unacknowledged entries of the worker group on ``camera`` (0: no group yet)."""
    try:
        return int(client.xpending(keys.frames_key(camera), GROUP)["pending"])
    except redis.ResponseError:
        return 0


def make_worker(redis_url: str, artifact_path: Path, **overrides: object) -> Worker:
    """An in-process worker (CPU, fp32) on ``artifact_path`` with test-friendly settings."""
    client = redis.Redis.from_url(redis_url)
    settings = WorkerSettings(burst=True, batch_size=4, max_wait_ms=5, claim_idle_s=30, alarm=AlarmsConfig())
    settings = dataclasses.replace(settings, **overrides)
    router = ModelRouter(Engine("cpu", "fp32"), client, model_file=str(artifact_path))
    return Worker(client, router, settings)


def run_worker(redis_url: str, artifact_path: Path, timeout: float = 60, **overrides: object) -> WorkerStats:
    """Run an in-process burst worker to completion (fails the test if it takes longer than ``timeout``)."""
    worker = make_worker(redis_url, artifact_path, **overrides)
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    t0 = time.monotonic()
    try:
        stats = worker.run(stop)
    finally:
        timer.cancel()
        worker.client.close()
    assert time.monotonic() - t0 < timeout, "the burst worker did not finish by itself"
    return stats

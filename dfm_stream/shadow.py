"""Shadow scoring: a camera's candidate model scores the same frames as its live one, never alarms.

The worker's model thread hands each scored batch here (:meth:`ShadowScorer.score`). For every
camera of the batch with a shadow candidate (:meth:`dfm_stream.routing.ModelRouter.shadow_for`,
set by ``dfm-stream model shadow``), the candidate scores that camera's frames of the batch: when
it shares the live model's backbone (same weights, same input size; :mod:`dfm_stream.runners`),
from the backbone features the live model just computed, so the extra cost is the PCA / Gaussian
step; otherwise its own backbone runs on the same decoded images. Results go, off the model
thread (:class:`ShadowPublisher`: a bounded queue, dropped and counted when Redis lags), to

* ``{prefix}:{CAM}:shadow``: one :class:`~dfm_stream.wire.ShadowMsg` per frame (``MAXLEN ~``);
* ``{prefix}:{CAM}:shadow:stats``: running sums (frames, flag agreement, the sums of a Pearson
  correlation of live and candidate scores), summed over every worker;
* ``{prefix}:{CAM}:shadow:disagree``: the latest frames that only one of the two flagged.

:func:`read_comparison` turns them into what ``dfm-stream model compare`` prints (Spearman over
the latest stream entries). A frame redelivered to another worker after a crash may be compared
twice: the comparison is advisory, the live scores keep their exactly-once guarantee.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from dfm_stream import keys, replies
from dfm_stream.replies import text as _text
from dfm_stream.wire import FIELD, ShadowMsg

if TYPE_CHECKING:
    import torch

    from dfm_stream.connect import RedisClient
    from dfm_stream.inference import DecodedFrame, Engine
    from dfm_stream.routing import ModelRouter
    from dfm_stream.runners import LoadedModel

log = logging.getLogger(__name__)

DEFAULT_SHADOW_MAXLEN = 10_000
"""Approximate length cap of each camera's shadow stream (also the Spearman window of ``compare``)."""

DISAGREEMENTS_KEPT = 1_000
"""Frames kept in a camera's disagreement list (newest first); the counts cover every frame."""

QUEUE_BATCHES = 64
"""Batches of shadow results waiting for Redis before new ones are dropped (and counted)."""

_SUMS = ("sx", "sy", "sxx", "syy", "sxy")


@dataclass(frozen=True, kw_only=True)
class ShadowMetrics:
    """Per camera and candidate: frames compared, agreement, disagreements, score correlation."""

    frames: Counter
    agreements: Counter
    disagreements: Counter
    correlation: Gauge
    dropped: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ShadowMetrics:
        """Register the shadow metrics on ``registry``."""
        labels = ["camera", "model"]
        return cls(
            frames=Counter(
                "dfm_shadow_frames", "Frames scored by the shadow candidate too.", labels, registry=registry
            ),
            agreements=Counter(
                "dfm_shadow_agreements",
                "Frames where candidate and live model agree on the anomalous flag.",
                labels,
                registry=registry,
            ),
            disagreements=Counter(
                "dfm_shadow_disagreements",
                "Frames only one of the two flagged anomalous (flagged_by: live or shadow).",
                [*labels, "flagged_by"],
                registry=registry,
            ),
            correlation=Gauge(
                "dfm_shadow_score_correlation",
                "Pearson correlation of candidate and live scores over the frames this worker compared.",
                labels,
                registry=registry,
            ),
            dropped=Counter(
                "dfm_shadow_dropped",
                "Shadow results not written because Redis lagged (the live scores are not affected).",
                ["camera"],
                registry=registry,
            ),
        )


@dataclass
class _Sums:
    n: int = 0
    values: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_SUMS, 0.0))

    def add(self, x: float, y: float) -> None:
        self.n += 1
        for name, value in zip(_SUMS, (x, y, x * x, y * y, x * y), strict=True):
            self.values[name] += value


def pearson(n: float, sums: dict[str, float]) -> float | None:
    """Return Pearson's r from the running sums ``sx, sy, sxx, syy, sxy`` of ``n`` pairs (None: undefined)."""
    if n < 2:
        return None
    cov = sums["sxy"] - sums["sx"] * sums["sy"] / n
    var_x = sums["sxx"] - sums["sx"] ** 2 / n
    var_y = sums["syy"] - sums["sy"] ** 2 / n
    if var_x <= 0 or var_y <= 0:
        return None
    return max(-1.0, min(1.0, cov / math.sqrt(var_x * var_y)))


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]  # ties share their mean rank


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Return Spearman's rank correlation of ``x`` and ``y`` (None: fewer than 2 pairs or a constant)."""
    if len(x) < 2:
        return None
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


class ShadowPublisher:
    """Writes shadow results to Redis from its own thread, so the model thread never waits on Redis."""

    def __init__(
        self,
        client: RedisClient,
        prefix: str,
        metrics: ShadowMetrics | None = None,
        maxlen: int = DEFAULT_SHADOW_MAXLEN,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.metrics = metrics
        self.maxlen = maxlen
        self._queue: queue.Queue[list[ShadowMsg] | None] = queue.Queue(maxsize=QUEUE_BATCHES)
        self._thread: threading.Thread | None = None

    def submit(self, messages: list[ShadowMsg]) -> None:
        """Queue one camera's messages of a batch; drop and count them when the queue is full."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shadow-publisher", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(messages)
        except queue.Full:
            log.warning("shadow results of camera %s dropped: Redis lags", messages[0].camera)
            if self.metrics is not None:
                self.metrics.dropped.labels(messages[0].camera).inc(len(messages))

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(10)

    def _run(self) -> None:
        while (messages := self._queue.get()) is not None:
            try:
                self.write(messages)
            except Exception:  # advisory data: logged and dropped, never retried into the live path
                log.exception(
                    "could not write %d shadow results of camera %s", len(messages), messages[0].camera
                )
                if self.metrics is not None:
                    self.metrics.dropped.labels(messages[0].camera).inc(len(messages))

    def write(self, messages: list[ShadowMsg]) -> None:
        """Write one camera's messages, comparison sums and disagreements in one round trip."""
        camera = messages[0].camera
        stats = keys.shadow_stats_key(camera, self.prefix)
        disagree = keys.shadow_disagreements_key(camera, self.prefix)
        sums = _Sums()
        agree = only_live = only_shadow = 0
        pipe = self.client.pipeline(transaction=False)
        for m in messages:
            pipe.xadd(
                keys.shadow_key(camera, self.prefix),
                {FIELD: m.to_bytes()},
                maxlen=self.maxlen,
                approximate=True,
            )
            sums.add(m.live_score, m.score)
            if m.anomalous == m.live_anomalous:
                agree += 1
                continue
            only_live += m.live_anomalous
            only_shadow += m.anomalous
            flagged_by = "live" if m.live_anomalous else "shadow"
            pipe.lpush(
                disagree, json.dumps({"frame_id": m.frame_id, "flagged_by": flagged_by, "model": m.model})
            )
        last = messages[-1]
        pipe.hset(stats, mapping={"model": last.model, "live_model": last.live_model})
        pipe.hincrby(stats, "frames", sums.n)
        pipe.hincrby(stats, "agree", agree)
        pipe.hincrby(stats, "only_live", only_live)
        pipe.hincrby(stats, "only_shadow", only_shadow)
        for name, value in sums.values.items():
            pipe.hincrbyfloat(stats, name, value)
        pipe.ltrim(disagree, 0, DISAGREEMENTS_KEPT - 1)
        pipe.execute()


class ShadowScorer:
    """Scores each batch's frames of shadowed cameras with their candidate (called by the model thread)."""

    def __init__(
        self,
        router: ModelRouter,
        engine: Engine,
        publisher: ShadowPublisher,
        worker: str,
        metrics: ShadowMetrics | None = None,
    ) -> None:
        self.router = router
        self.engine = engine
        self.publisher = publisher
        self.worker = worker
        self.metrics = metrics
        self._sums: dict[tuple[str, str], _Sums] = {}

    @classmethod
    def create(
        cls, client: RedisClient, router: ModelRouter, prefix: str, worker: str, metrics: ShadowMetrics | None
    ) -> ShadowScorer:
        """Return a scorer for ``router``'s cameras, with its publisher on ``client``."""
        return cls(router, router.engine, ShadowPublisher(client, prefix, metrics), worker, metrics)

    def score(
        self,
        live: LoadedModel,
        frames: list[DecodedFrame],
        tensor: torch.Tensor,
        features: torch.Tensor,
        live_scores: Sequence[float] | np.ndarray,
    ) -> int:
        """Score the shadowed cameras' frames of a batch the live model scored; return how many.

        Never raises: a failing candidate is logged and counted, the live results are untouched.
        """
        by_camera: dict[str, list[int]] = {}
        for i, frame in enumerate(frames):
            by_camera.setdefault(frame.entry.camera, []).append(i)
        done = 0
        for camera, rows in by_camera.items():
            candidate = self.router.shadow_for(camera)
            if candidate is None or candidate.label == live.label:
                continue
            try:
                scores = self._candidate_scores(live, candidate, frames, rows, tensor, features)
            except Exception:
                log.exception("shadow candidate %s failed on camera %s", candidate.label, camera)
                continue
            self._publish(
                camera, live, candidate, [frames[i] for i in rows], [live_scores[i] for i in rows], scores
            )
            done += len(rows)
        return done

    def _candidate_scores(
        self,
        live: LoadedModel,
        candidate: LoadedModel,
        frames: list[DecodedFrame],
        rows: list[int],
        tensor: torch.Tensor,
        features: torch.Tensor,
    ) -> np.ndarray:
        model = candidate.fitted.model
        size = tuple(candidate.fitted.info.image_size)
        all_rows = len(rows) == len(frames)
        if size == tuple(live.fitted.info.image_size):
            if model.feature_extractor is live.fitted.model.feature_extractor:
                shared = features if all_rows else features[rows]
                return self.engine.score_features(model, shared, want_maps=False).scores
            batch = tensor if all_rows else tensor[rows]
        else:
            batch = self.engine.to_tensor([frames[i].image for i in rows], candidate.fitted.info.image_size)
        return self.engine.score(model, batch, want_maps=False).scores

    def _publish(
        self,
        camera: str,
        live: LoadedModel,
        candidate: LoadedModel,
        frames: list[DecodedFrame],
        live_scores: list[float],
        scores: np.ndarray,
    ) -> None:
        now = time.time_ns()
        live_threshold = live.fitted.info.threshold
        threshold = candidate.fitted.info.threshold
        messages = []
        for frame, live_value, score in zip(frames, live_scores, scores, strict=True):
            value, live_score = float(score), float(live_value)  # numpy scalars do not pack
            messages.append(
                ShadowMsg(
                    camera=camera,
                    frame_id=f"{camera}:{frame.entry.entry_id}",
                    seq=frame.msg.seq,
                    ts=frame.msg.ts,
                    scored_ts=now,
                    model=candidate.label,
                    score=value,
                    threshold=threshold,
                    anomalous=threshold is not None and value > threshold,
                    live_model=live.label,
                    live_score=live_score,
                    live_threshold=live_threshold,
                    live_anomalous=live_threshold is not None and live_score > live_threshold,
                    worker=self.worker,
                )
            )
        self._count(camera, candidate.label, messages)
        self.publisher.submit(messages)

    def _count(self, camera: str, model: str, messages: list[ShadowMsg]) -> None:
        if self.metrics is None:
            return
        sums = self._sums.setdefault((camera, model), _Sums())
        for m in messages:
            sums.add(m.live_score, m.score)
            if m.anomalous == m.live_anomalous:
                self.metrics.agreements.labels(camera, model).inc()
            else:
                flagged_by = "live" if m.live_anomalous else "shadow"
                self.metrics.disagreements.labels(camera, model, flagged_by).inc()
        self.metrics.frames.labels(camera, model).inc(len(messages))
        r = pearson(sums.n, sums.values)
        if r is not None:
            self.metrics.correlation.labels(camera, model).set(r)


@dataclass(frozen=True)
class Comparison:
    """What ``dfm-stream model compare`` prints for one camera."""

    camera: str
    model: str | None
    live_model: str | None
    frames: int
    agree: int
    only_live: int
    only_shadow: int
    pearson: float | None
    spearman: float | None
    spearman_frames: int
    disagreements: list[dict[str, str]]
    """The latest frames only one flagged, newest first: ``{"frame_id", "flagged_by", "model"}``."""

    @property
    def agreement(self) -> float | None:
        """Fraction of compared frames where both gave the same anomalous flag."""
        return self.agree / self.frames if self.frames else None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {**self.__dict__, "agreement": self.agreement}


def read_comparison(
    client: RedisClient, camera: str, prefix: str = keys.DEFAULT_PREFIX, window: int = DEFAULT_SHADOW_MAXLEN
) -> Comparison:
    """Read ``camera``'s comparison: totals over every compared frame, Spearman over the latest ``window``."""
    raw = {
        _text(k): _text(v) for k, v in replies.hgetall(client, keys.shadow_stats_key(camera, prefix)).items()
    }
    frames = int(raw.get("frames", 0))
    model = raw.get("model")
    pairs: list[tuple[float, float]] = []
    for _, fields in replies.xrevrange(client, keys.shadow_key(camera, prefix), count=window):
        msg = ShadowMsg.from_bytes(fields[FIELD.encode()])
        if model is None or msg.model == model:
            pairs.append((msg.live_score, msg.score))
    listed = [
        json.loads(_text(v)) for v in client.lrange(keys.shadow_disagreements_key(camera, prefix), 0, -1)
    ]
    return Comparison(
        camera=camera,
        model=model,
        live_model=raw.get("live_model"),
        frames=frames,
        agree=int(raw.get("agree", 0)),
        only_live=int(raw.get("only_live", 0)),
        only_shadow=int(raw.get("only_shadow", 0)),
        pearson=pearson(frames, {name: float(raw.get(name, 0.0)) for name in _SUMS}),
        spearman=spearman([p[0] for p in pairs], [p[1] for p in pairs]),
        spearman_frames=len(pairs),
        disagreements=[d for d in listed if model is None or d.get("model") == model],
    )

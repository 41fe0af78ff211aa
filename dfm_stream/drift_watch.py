"""The worker side of drift watch: per-camera windows, their figures as metrics and in Redis.

The model thread calls :meth:`DriftWatch.observe` with each scored batch (image statistics are
taken from the batch tensor the model just read, :func:`dfm_stream.drift.image_stats`); the
fetch thread calls :meth:`DriftWatch.flush` every ``--stats-interval``, which compares every
camera's window with its model's reference, sets the ``dfm_drift_*`` gauges and writes the hash
``{prefix}:{CAM}:drift`` (:func:`dfm_stream.keys.drift_key`, fields in ``docs/wire-format.md``).

A camera's window starts empty again when its model version changes: scores of two versions are
not comparable. With several workers on one camera each keeps the window of the frames it
scored (a share of the camera's frames) and the hash holds the last one written.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dfm_stream import keys
from dfm_stream.artifact import ArtifactInfo
from dfm_stream.connect import RedisClient
from dfm_stream.drift import (
    STATS,
    WINDOW,
    DriftFigures,
    DriftReference,
    Window,
    compare,
    image_stats,
    reference_of,
)
from dfm_stream.metrics import DriftMetrics


@dataclass
class _Camera:
    model: str
    reference: DriftReference | None
    window: Window


def figures_to_hash(figures: DriftFigures, model: str, worker: str, now_ms: int) -> dict[str, str]:
    """Return the fields of the drift hash for ``figures`` (see ``docs/wire-format.md``)."""
    return {
        "model": model,
        "worker": worker,
        "updated_ms": str(now_ms),
        "frames": str(figures.frames),
        "verdict": figures.verdict,
        "reason": figures.reason,
        "figures": json.dumps(
            [
                {"name": f.name, "value": f.value, "alert": f.alert, "reference": f.reference,
                 "current": f.current}
                for f in figures.figures
            ]
        ),
    }  # fmt: skip


class DriftWatch:
    """Per-camera drift windows of one worker."""

    def __init__(
        self,
        client: RedisClient,
        prefix: str,
        worker: str,
        metrics: DriftMetrics | None = None,
        window: int = WINDOW,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.worker = worker
        self.metrics = metrics
        self.window = window
        self._cameras: dict[str, _Camera] = {}
        self._lock = threading.Lock()

    def observe(
        self, cameras: Sequence[str], model: str, info: ArtifactInfo, batch: torch.Tensor, scores: np.ndarray
    ) -> None:
        """Add one scored batch: ``cameras[i]`` saw the frame ``batch[i]`` that scored ``scores[i]``."""
        stats = image_stats(batch, info.mean, info.std)
        names = np.asarray(cameras)
        with self._lock:
            for camera in dict.fromkeys(cameras):
                state = self._cameras.get(camera)
                if state is None or state.model != model:
                    state = _Camera(model, reference_of(info.drift, model), Window(self.window))
                    self._cameras[camera] = state
                rows = names == camera
                state.window.add(np.asarray(scores)[rows], stats[rows])

    def figures(self) -> dict[str, tuple[str, DriftFigures]]:
        """Return camera -> (model, figures) now."""
        with self._lock:
            return {c: (s.model, compare(s.window, s.reference)) for c, s in self._cameras.items()}

    def flush(self) -> None:
        """Compare every camera's window with its reference; export the figures and write the hashes."""
        current = self.figures()
        if not current:
            return
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        for camera, (model, figures) in current.items():
            fields = figures_to_hash(figures, model, self.worker, now_ms)
            pipe.hset(keys.drift_key(camera, self.prefix), mapping={k: v for k, v in fields.items()})
            self._export(camera, figures)
        pipe.execute()

    def _export(self, camera: str, figures: DriftFigures) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        m.window_frames.labels(camera).set(figures.frames)

        def value(name: str) -> float:
            figure = figures.get(name)
            return math.nan if figure is None or figure.value is None else figure.value

        m.score_psi.labels(camera).set(value("score_psi"))
        m.score_quantile_ratio.labels(camera).set(value("score_quantile_ratio"))
        for stat in STATS:
            m.image_psi.labels(camera, stat).set(value(f"{stat}_psi"))

"""Does a reduced-precision backbone keep what a user cares about? Compared with fp32 on test sets.

For each MVTec-layout evaluation set the same fitted model scores every test image twice, with
the fp32 engine and with the reduced one (int8, bf16). Bounds (issue 21): image AUROC within
:data:`IMAGE_AUROC_TOL` of fp32, pixel AUROC within :data:`PIXEL_AUROC_TOL`, and the Spearman rank
correlation of the image scores at least :data:`MIN_SPEARMAN`. AUROC deltas only mean something
when fp32 itself separates the defects: with random backbone weights (the tests, the bench
here, which cannot download ImageNet weights) they say that int8 ranks the same synthetic defects
the same way, not how a real model fares; the Spearman figure holds either way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from dfm_stream.evaluate import EvalCollector, auroc
from dfm_stream.images import MvtecSample, iter_batches, mvtec_test_set
from dfm_stream.inference import Engine
from dfm_stream.model.dfm import DFMModel

IMAGE_AUROC_TOL = 0.005
PIXEL_AUROC_TOL = 0.01
MIN_SPEARMAN = 0.99


@dataclass(frozen=True)
class PrecisionCheck:
    """One evaluation set scored in fp32 and in a reduced precision."""

    name: str
    precision: str
    images: int
    image_auroc_fp32: float | None
    image_auroc: float | None
    pixel_auroc_fp32: float | None
    pixel_auroc: float | None
    spearman: float
    max_relative_score_difference: float

    @property
    def image_auroc_delta(self) -> float | None:
        """Reduced minus fp32 image AUROC (None without both classes)."""
        return _delta(self.image_auroc, self.image_auroc_fp32)

    @property
    def pixel_auroc_delta(self) -> float | None:
        """Reduced minus fp32 pixel AUROC (None without masks or without ``fre`` maps)."""
        return _delta(self.pixel_auroc, self.pixel_auroc_fp32)

    @property
    def passed(self) -> bool:
        """True when every bound that applies holds."""
        image, pixel = self.image_auroc_delta, self.pixel_auroc_delta
        return (
            self.spearman >= MIN_SPEARMAN
            and (image is None or abs(image) <= IMAGE_AUROC_TOL)
            and (pixel is None or abs(pixel) <= PIXEL_AUROC_TOL)
        )

    def as_dict(self) -> dict[str, Any]:
        """Return the figures, the deltas and the verdict as a JSON-ready dict."""
        return {
            **asdict(self),
            "image_auroc_delta": self.image_auroc_delta,
            "pixel_auroc_delta": self.pixel_auroc_delta,
            "passed": self.passed,
        }


def _delta(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Return the Spearman rank correlation of ``a`` and ``b`` (average ranks for ties)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape or x.size < 2:
        msg = f"spearman needs two score arrays of the same length >= 2, got {x.shape} and {y.shape}"
        raise ValueError(msg)
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return 1.0 if denom == 0 else float((rx * ry).sum() / denom)


def _ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts - 1) / 2.0)[inverse]


def score_set(
    engine: Engine, model: DFMModel, samples: Sequence[MvtecSample], image_size: tuple[int, int], batch: int
) -> tuple[np.ndarray, EvalCollector]:
    """Score ``samples`` with ``engine``: image scores (in order) and a collector for the AUROCs."""
    collector = EvalCollector(image_size)
    by_path = {s.path: s for s in samples}
    scores: list[float] = []
    for paths, maps, values in _scored(engine, model, [s.path for s in samples], image_size, batch):
        for i, path in enumerate(paths):
            scores.append(float(values[i]))
            collector.add(by_path[path], float(values[i]), None if maps is None else maps[i])
    return np.asarray(scores), collector


def _scored(
    engine: Engine, model: DFMModel, paths: list[Path], image_size: tuple[int, int], batch: int
) -> Iterator[tuple[list[Path], np.ndarray | None, np.ndarray]]:
    for batch_paths, images in iter_batches(paths, batch, image_size):
        result = engine.score(model, images)
        maps = None
        if result.maps is not None:
            up = F.interpolate(torch.from_numpy(result.maps)[:, None], size=image_size, mode="bilinear")
            maps = up[:, 0].numpy()
        yield batch_paths, maps, result.scores


def check_set(
    name: str,
    root: str | Path,
    model: DFMModel,
    image_size: tuple[int, int],
    reference: Engine,
    reduced: Engine,
    batch: int = 8,
) -> PrecisionCheck:
    """Score the test images of the MVTec-layout set at ``root`` with both engines and compare."""
    samples = mvtec_test_set(root)
    ref_scores, ref = score_set(reference, model, samples, image_size, batch)
    new_scores, new = score_set(reduced, model, samples, image_size, batch)
    labels = np.asarray([s.label for s in samples])
    scale = np.maximum(np.abs(ref_scores), np.finfo(np.float64).tiny)
    return PrecisionCheck(
        name=name,
        precision=reduced.precision,
        images=len(samples),
        image_auroc_fp32=_auroc(labels, ref_scores),
        image_auroc=_auroc(labels, new_scores),
        pixel_auroc_fp32=ref.pixel_auroc(),
        pixel_auroc=new.pixel_auroc(),
        spearman=spearman(ref_scores, new_scores),
        max_relative_score_difference=float((np.abs(new_scores - ref_scores) / scale).max()),
    )


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return auroc(labels, scores) if 0 < labels.sum() < labels.size else None

"""Evaluation: AUROC, ROC curves, thresholds and what they give; plots are drawn by :mod:`dfm_stream.plots`.

Convention everywhere: an image is anomalous when its score is strictly greater than the
threshold.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dfm_stream.errors import DfmStreamError
from dfm_stream.plots import Marker, plot_histogram, plot_roc


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold with the precision, recall and F1 it gives on the data it was chosen on."""

    threshold: float
    precision: float
    recall: float
    f1: float


def _check_binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        msg = f"{labels.size} labels for {scores.size} scores"
        raise ValueError(msg)
    return labels, scores


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the ROC curve (ties count one half); None if only one class is present."""
    y, s = _check_binary(np.asarray(labels), np.asarray(scores))
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # Average ranks over ties (Mann-Whitney U).
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(false positive rates, true positive rates)`` from (0, 0) to (1, 1)."""
    y, s = _check_binary(np.asarray(labels), np.asarray(scores))
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def f1_optimal_threshold(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> ThresholdChoice:
    """Return the threshold (midway between scores) that maximises F1 for ``score > threshold``."""
    y, s = _check_binary(np.asarray(labels), np.asarray(scores))
    if not y.any():
        msg = "an F1-optimal threshold needs at least one defective image"
        raise DfmStreamError(msg)
    values = np.unique(s)
    candidates = np.r_[values[0] - 1.0, (values[:-1] + values[1:]) / 2.0]
    best = ThresholdChoice(float(candidates[0]), 0.0, 0.0, -1.0)
    for threshold in candidates:
        predicted = s > threshold
        tp = int((predicted & y).sum())
        precision = tp / max(int(predicted.sum()), 1)
        recall = tp / int(y.sum())
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        if f1 > best.f1:
            best = ThresholdChoice(float(threshold), precision, recall, f1)
    return best


@dataclass(frozen=True)
class OperatingPoint:
    """What a threshold gives on labelled data (``score > threshold`` is an alarm).

    ``precision`` is 0 when nothing is flagged; ``recall`` is None without defective images and
    ``false_alarm_rate`` (false positives / good images) None without good ones.
    """

    threshold: float
    precision: float
    recall: float | None
    f1: float
    false_alarm_rate: float | None
    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int


def metrics_at(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> OperatingPoint:
    """Return precision, recall, F1, false-alarm rate and the four counts at ``threshold``."""
    y, s = _check_binary(np.asarray(labels), np.asarray(scores))
    flagged = s > threshold
    tp, fp = int((flagged & y).sum()), int((flagged & ~y).sum())
    fn, tn = int((~flagged & y).sum()), int((~flagged & ~y).sum())
    precision = tp / max(tp + fp, 1)
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * precision * recall / (precision + recall) if tp and recall else 0.0
    fpr = fp / (fp + tn) if fp + tn else None
    return OperatingPoint(float(threshold), precision, recall, f1, fpr, tp, fp, fn, tn)


def quantile_threshold(good_scores: Sequence[float] | np.ndarray, max_fpr: float) -> float:
    """Return the lowest good score such that at most ``max_fpr`` of good scores lie above it."""
    scores = np.sort(np.asarray(good_scores, dtype=np.float64).ravel())
    if scores.size == 0:
        msg = "calibration needs at least one good image"
        raise DfmStreamError(msg)
    if not 0.0 <= max_fpr < 1.0:
        msg = f"max_fpr must be in [0, 1), got {max_fpr}"
        raise DfmStreamError(msg)
    allowed_above = int(np.floor(max_fpr * scores.size))
    return float(scores[scores.size - 1 - allowed_above])


class EvalCollector:
    """Collects per-image scores (and, for pixel AUROC, maps and masks) of an MVTec-layout test set."""

    def __init__(self, image_size: tuple[int, int]) -> None:
        self.image_size = image_size
        self.rows: list[tuple[str, int, str, float]] = []
        self._pixel_scores: list[np.ndarray] = []
        self._pixel_labels: list[np.ndarray] = []

    def add(self, sample: Any, score: float, anomaly_map: np.ndarray | None) -> None:
        """Record one scored :class:`~dfm_stream.images.MvtecSample`."""
        from dfm_stream.images import read_mask

        self.rows.append((str(sample.path), int(sample.label), str(sample.defect_type), score))
        if anomaly_map is None:
            return
        if sample.mask_path is not None:
            mask = read_mask(sample.mask_path, self.image_size)
        elif sample.label == 0:
            mask = np.zeros(self.image_size, bool)
        else:
            return  # a defect without a mask says nothing about pixels
        self._pixel_scores.append(anomaly_map.astype(np.float32).ravel())
        self._pixel_labels.append(mask.ravel())

    def pixel_auroc(self) -> float | None:
        """Pixel AUROC over every image with a mask (good images: all-zero masks)."""
        if not self._pixel_labels or not any(m.any() for m in self._pixel_labels):
            return None
        return auroc(np.concatenate(self._pixel_labels), np.concatenate(self._pixel_scores))


def _operating_points(labels: np.ndarray, scores: np.ndarray, info: Any) -> dict[str, OperatingPoint | None]:
    """Return what the model's own threshold and the F1-optimal one give on the test set."""
    best = f1_optimal_threshold(labels, scores) if labels.any() else None
    return {
        "model threshold": None if info.threshold is None else metrics_at(labels, scores, info.threshold),
        "F1-optimal": None if best is None else metrics_at(labels, scores, best.threshold),
    }


def _markers(points: dict[str, OperatingPoint | None]) -> list[Marker]:
    return [
        Marker(label, p.threshold, p.false_alarm_rate, p.recall)
        for label, p in points.items()
        if p is not None
    ]


def write_report(
    out: Path, collector: EvalCollector, info: Any, skipped: Sequence[tuple[Path, str]] = ()
) -> dict[str, Any]:
    """Compute the metrics, write ``report.json``, ``roc.png`` and ``histogram.png`` in ``out``."""
    if not collector.rows:
        msg = "no test image could be scored: nothing to evaluate"
        raise DfmStreamError(msg)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.array([r[1] for r in collector.rows])
    scores = np.array([r[3] for r in collector.rows])
    good = labels == 0
    per_defect = {}
    for defect in sorted({r[2] for r in collector.rows if r[1] == 1}):
        keep = good | np.array([r[2] == defect for r in collector.rows])
        per_defect[defect] = auroc(labels[keep], scores[keep])
    points = _operating_points(labels, scores, info)
    fpr, tpr = roc_curve(labels, scores)
    image_auc = auroc(labels, scores)
    report = {
        "n_images": len(collector.rows),
        "n_good": int(good.sum()),
        "n_defective": int((~good).sum()),
        "image_auroc": image_auc,
        "image_auroc_per_defect": per_defect,
        "f1_optimal": _as_dict(points["F1-optimal"]),
        "pixel_auroc": collector.pixel_auroc(),
        "model_threshold": info.threshold,
        "at_model_threshold": _as_dict(points["model threshold"]),
        "model": {
            "backbone": info.backbone,
            "layer": info.layer,
            "score_type": info.score_type,
            "n_components": info.n_components,
            "content_hash": info.content_hash,
        },
        "skipped": [{"path": str(p), "reason": r} for p, r in skipped],
        "images": [{"path": p, "label": y, "defect_type": d, "score": s} for p, y, d, s in collector.rows],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    markers = _markers(points)
    counts = (int(good.sum()), int((~good).sum()))
    plot_roc(out / "roc.png", fpr, tpr, image_auc, counts, markers)
    plot_histogram(out / "histogram.png", scores[good], scores[~good], markers)
    return report


def _as_dict(point: OperatingPoint | None) -> dict[str, Any] | None:
    return None if point is None else dataclasses.asdict(point)

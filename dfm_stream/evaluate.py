"""Evaluation: AUROC, ROC curves, thresholds, and ROC / histogram plots drawn with OpenCV.

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

import cv2
import numpy as np

from dfm_stream.errors import DfmStreamError


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


def _canvas(width: int, height: int) -> np.ndarray:
    return np.full((height, width, 3), 255, np.uint8)


def _axes(img: np.ndarray, box: tuple[int, int, int, int], xlabel: str, ylabel: str, title: str) -> None:
    x0, y0, x1, y1 = box
    cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, title, (x0, y0 - 12), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, xlabel, ((x0 + x1) // 2 - 60, y1 + 35), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (5, y0 - 12 + 0), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)


def plot_roc(path: Path, fpr: np.ndarray, tpr: np.ndarray, auc: float | None) -> None:
    """Draw a ROC curve as a PNG at ``path``."""
    img = _canvas(480, 480)
    box = (60, 40, 440, 420)
    title = f"ROC (image AUROC = {auc:.3f})" if auc is not None else "ROC"
    _axes(img, box, "false positive rate", "TPR", title)
    x0, y0, x1, y1 = box
    cv2.line(img, (x0, y1), (x1, y0), (180, 180, 180), 1, cv2.LINE_AA)
    points = np.stack([x0 + fpr * (x1 - x0), y1 - tpr * (y1 - y0)], axis=1).round().astype(np.int32)
    cv2.polylines(img, [points], False, (200, 80, 0), 2, cv2.LINE_AA)
    _write_png(path, img)


def plot_histogram(
    path: Path, good: np.ndarray, defective: np.ndarray, threshold: float | None, bins: int = 30
) -> None:
    """Draw overlaid score histograms (good: green, defective: red) and the threshold as a PNG."""
    img = _canvas(640, 420)
    box = (60, 40, 620, 360)
    _axes(img, box, "anomaly score", "count", "score histogram (green: good, red: defective)")
    values = np.r_[good, defective, [] if threshold is None else [threshold]]
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(v, edges)[0] for v in (good, defective)]
    peak = max(1, *(int(c.max()) if c.size else 0 for c in counts))
    x0, y0, x1, y1 = box
    width = (x1 - x0) / bins
    for colour, count in zip(((0, 160, 0), (0, 0, 220)), counts, strict=True):
        layer = img.copy()
        for i, c in enumerate(count):
            top = y1 - round(c / peak * (y1 - y0))
            cv2.rectangle(layer, (round(x0 + i * width), top), (round(x0 + (i + 1) * width), y1), colour, -1)
        cv2.addWeighted(layer, 0.5, img, 0.5, 0, dst=img)
    if threshold is not None:
        tx = round(x0 + (threshold - lo) / (hi - lo) * (x1 - x0))
        cv2.line(img, (tx, y0), (tx, y1), (0, 0, 0), 2)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, f"{lo:.4g}", (x0, y1 + 18), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f"{hi:.4g}", (x1 - 50, y1 + 18), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    _write_png(path, img)


def heatmap_overlay(image_bgr: np.ndarray, anomaly_map: np.ndarray, vmax: float) -> np.ndarray:
    """Blend a JET colour map of ``anomaly_map`` (0 .. ``vmax``) over the image."""
    height, width = image_bgr.shape[:2]
    scaled = np.clip(anomaly_map / max(vmax, 1e-12), 0, 1)
    scaled = cv2.resize((scaled * 255).astype(np.uint8), (width, height), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(scaled, cv2.COLORMAP_JET)
    return cv2.addWeighted(image_bgr, 0.55, colour, 0.45, 0)


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        msg = f"cannot encode a PNG for {path}"
        raise DfmStreamError(msg)
    Path(path).write_bytes(encoded.tobytes())


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a BGR uint8 image as a PNG (paths with any characters)."""
    _write_png(path, image)


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
    best = f1_optimal_threshold(labels, scores) if labels.any() else None
    fpr, tpr = roc_curve(labels, scores)
    image_auc = auroc(labels, scores)
    report = {
        "n_images": len(collector.rows),
        "n_good": int(good.sum()),
        "n_defective": int((~good).sum()),
        "image_auroc": image_auc,
        "image_auroc_per_defect": per_defect,
        "f1_optimal": None if best is None else dataclasses.asdict(best),
        "pixel_auroc": collector.pixel_auroc(),
        "model_threshold": info.threshold,
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
    plot_roc(out / "roc.png", fpr, tpr, image_auc)
    plot_histogram(out / "histogram.png", scores[good], scores[~good], best.threshold if best else None)
    return report

"""Evaluation metrics against scikit-learn, and the threshold rules."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from dfm_stream.errors import DfmStreamError
from dfm_stream.evaluate import auroc, f1_optimal_threshold, metrics_at, quantile_threshold, roc_curve
from dfm_stream.plots import MODEL, Marker, nice_ticks, plot_histogram, plot_roc


def _data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + 1.2 * labels, 1)  # rounded: many ties
    return labels, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_roc_curve_match_sklearn(seed: int) -> None:
    labels, scores = _data(seed)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr = roc_curve(labels, scores)
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_auroc_is_none_with_one_class() -> None:
    assert auroc([0, 0, 0], [1.0, 2.0, 3.0]) is None


def test_f1_optimal_threshold_is_the_best_over_all_cuts() -> None:
    labels, scores = _data(3)
    best = f1_optimal_threshold(labels, scores)
    brute = max(f1_score(labels, scores > t) for t in np.unique(scores))
    assert best.f1 == pytest.approx(brute)
    assert f1_score(labels, scores > best.threshold) == pytest.approx(best.f1)
    assert not np.any(scores == best.threshold)  # midway between scores


def test_quantile_threshold_bounds_the_false_alarm_rate() -> None:
    good = np.random.default_rng(4).normal(size=1000)
    for max_fpr in (0.0, 0.01, 0.05):
        threshold = quantile_threshold(good, max_fpr)
        assert np.mean(good > threshold) <= max_fpr
        assert np.mean(good >= threshold) > max_fpr  # the tightest such threshold
    with pytest.raises(DfmStreamError, match="max_fpr"):
        quantile_threshold(good, 1.5)


def test_metrics_at_a_threshold_count_every_outcome() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([1.0, 2.0, 3.0, 5.0, 4.0, 6.0, 7.0])
    point = metrics_at(labels, scores, 3.5)
    assert (point.true_positives, point.false_positives, point.false_negatives, point.true_negatives) == (
        3,
        1,
        0,
        3,
    )
    assert point.precision == pytest.approx(0.75) and point.recall == 1.0
    assert point.false_alarm_rate == pytest.approx(0.25) and point.f1 == pytest.approx(6 / 7)
    nothing = metrics_at(labels, scores, 10.0)
    assert (nothing.precision, nothing.recall, nothing.f1, nothing.false_alarm_rate) == (0.0, 0.0, 0.0, 0.0)
    only_good = metrics_at(np.zeros(3), np.array([1.0, 2.0, 3.0]), 2.5)
    assert only_good.recall is None and only_good.false_alarm_rate == pytest.approx(1 / 3)


def _markers() -> list[Marker]:
    return [Marker("model threshold", 11.5, 0.05, 0.8), Marker("F1-optimal", 12.25, 0.0, 0.75)]


def test_histogram_shows_counts_per_bin_ticks_and_a_legend_of_both_thresholds(tmp_path: Path) -> None:
    good = np.full(7, 10.0)  # 7 in the first bin (10..11)
    defective = np.r_[np.full(9, 13.9), [14.0]]  # 10 in the last (13..14)
    texts = plot_histogram(tmp_path / "h.png", good, defective, _markers(), bins=4)
    assert "good (7 images)" in texts and "defective (10 images)" in texts
    assert "model threshold 11.5" in texts and "F1-optimal 12.25" in texts
    assert {"10", "12", "14"} <= set(texts), "score ticks"
    assert {"anomaly score", "images per bin"} <= set(texts)
    assert texts.count("7") == 1 and "10" in texts, "the count of each non-empty bar is written on it"
    image = cv2.imread(str(tmp_path / "h.png"))
    assert image is not None
    assert (np.abs(image.astype(int) - MODEL).sum(axis=2) == 0).any(), "the model threshold's line is drawn"


def test_roc_marks_both_thresholds_with_their_rates(tmp_path: Path) -> None:
    fpr, tpr = np.array([0.0, 0.0, 0.05, 1.0]), np.array([0.0, 0.75, 0.8, 1.0])
    texts = plot_roc(tmp_path / "roc.png", fpr, tpr, 0.95, (20, 8), _markers())
    assert "ROC, AUROC 0.950 (20 good, 8 defective)" in texts
    assert "model threshold 11.5: FPR 0.050, TPR 0.800" in texts
    assert "F1-optimal 12.25: FPR 0.000, TPR 0.750" in texts
    assert {"0", "0.2", "0.4", "0.6", "0.8", "1", "false-alarm rate (FPR)", "TPR"} <= set(texts)
    assert cv2.imread(str(tmp_path / "roc.png")) is not None


def test_nice_ticks_are_round_and_cover_the_range() -> None:
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(7.3, 16.2) == [8.0, 10.0, 12.0, 14.0, 16.0]
    assert nice_ticks(0.0, 11.0) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]

"""Evaluation metrics against scikit-learn, and the threshold rules."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from dfm_stream.errors import DfmStreamError
from dfm_stream.evaluate import auroc, f1_optimal_threshold, quantile_threshold, roc_curve


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

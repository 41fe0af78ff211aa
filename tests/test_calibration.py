"""Threshold choice for ``calibrate``: resolvable rates, --margin, and the false-alarm interval."""

from __future__ import annotations

import numpy as np
import pytest

from dfm_stream.calibration import (
    apply_margin,
    choose_threshold,
    clopper_pearson,
    false_alarm_rate,
    images_needed,
)
from dfm_stream.errors import ConfigError, DfmStreamError


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (0, 20, 0.0, 1 - 0.025 ** (1 / 20)),  # closed form for k = 0: 0.1684
        (20, 20, 0.025 ** (1 / 20), 1.0),
        (5, 10, 0.187086, 0.812914),  # textbook values (R: binom.test(5, 10))
        (1, 100, 0.000253, 0.054460),
    ],
)
def test_clopper_pearson_matches_known_intervals(k: int, n: int, low: float, high: float) -> None:
    got = clopper_pearson(k, n)
    assert got == pytest.approx((low, high), abs=2e-6)


def test_clopper_pearson_refuses_impossible_counts() -> None:
    with pytest.raises(DfmStreamError, match="0 <= k <= n"):
        clopper_pearson(3, 2)


@pytest.mark.parametrize(("max_fpr", "needed"), [(0.01, 100), (0.05, 20), (0.03, 34), (0.5, 2)])
def test_images_needed_is_the_smallest_set_that_leaves_one_score_above(max_fpr: float, needed: int) -> None:
    assert images_needed(max_fpr) == needed
    good = np.arange(needed, dtype=float)
    choice = choose_threshold(good, np.zeros(needed), max_fpr)
    assert choice.warning is None and choice.false_alarms.alarms == 1
    with pytest.raises(
        ConfigError, match=rf"{needed - 1} good images cannot resolve .* need at least {needed}"
    ):
        choose_threshold(good[:-1], np.zeros(needed - 1), max_fpr)


def test_too_few_good_images_are_refused_unless_forced() -> None:
    good = np.linspace(1.0, 2.0, 20)
    with pytest.raises(
        ConfigError, match=r"20 good images cannot resolve a false-alarm rate of 1.00%.*--force"
    ):
        choose_threshold(good, np.zeros(20), 0.01)
    forced = choose_threshold(good, np.zeros(20), 0.01, force=True)
    assert forced.threshold == 2.0
    assert "20 good images cannot resolve" in forced.warning and "highest good score" in forced.warning
    assert (forced.false_alarms.alarms, forced.false_alarms.n_good) == (0, 20)
    assert forced.false_alarms.high == pytest.approx(0.1684, abs=1e-4)
    assert "0/20 good images above the threshold = 0.00% (95% CI 0.00% .. 16.84%" in str(forced.false_alarms)


def test_margin_raises_the_threshold_as_the_demo_does() -> None:
    good = np.linspace(1.0, 2.0, 20)
    choice = choose_threshold(good, np.zeros(20), 0.0, margin=1.2)
    assert choice.threshold == pytest.approx(2.4) and "margin 1.2" in choice.how
    assert apply_margin(-2.0, 1.5) == pytest.approx(-1.0), "a margin above 1 raises a negative threshold too"
    with pytest.raises(ConfigError, match="margin"):
        apply_margin(1.0, 0.0)


def test_labelled_data_gets_the_f1_threshold_and_its_false_alarms_on_good_images() -> None:
    scores = np.array([1.0, 2.0, 3.0, 10.0, 11.0, 2.5])
    labels = np.array([0, 0, 0, 1, 1, 1])
    choice = choose_threshold(scores, labels, 0.01)
    assert choice.threshold == pytest.approx(2.25) and choice.how.startswith("F1-optimal")
    assert (choice.false_alarms.alarms, choice.false_alarms.n_good) == (1, 3)
    assert false_alarm_rate([1.0, 2.0, 3.0], 2.25).rate == pytest.approx(1 / 3)
    with pytest.raises(DfmStreamError, match="only defective"):
        choose_threshold(scores[3:], labels[3:], 0.01)

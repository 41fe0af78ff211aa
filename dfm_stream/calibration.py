"""Choosing a model's alarm threshold from held-out images, and saying how far to trust it.

With ``n`` good images the quantile for a false-alarm rate ``max_fpr`` leaves ``floor(max_fpr * n)``
good scores above the threshold. When that is 0 (``n < 1 / max_fpr``: 20 images for 1 %) the
images cannot resolve the rate: the threshold would silently be the highest good score, whose
false-alarm rate is anywhere between 0 and ~1/n x 3. :func:`choose_threshold` refuses that
unless forced, and every choice comes with the false-alarm rate it gives on the good images and a
95 % Clopper-Pearson interval.

``margin`` scales the chosen threshold away from the good scores, as the demo's ``--margin`` does
(``threshold x margin`` for a positive threshold; ``threshold + (margin - 1) x |threshold|`` in
general, so a margin above 1 always raises it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dfm_stream.errors import ConfigError, DfmStreamError
from dfm_stream.evaluate import f1_optimal_threshold, quantile_threshold

CONFIDENCE = 0.95
_BISECTIONS = 60


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_n = math.lgamma(n + 1)
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = (
        math.exp(log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
        for i in range(k + 1)
    )
    return min(1.0, math.fsum(terms))


def _solve_decreasing(f: Callable[[float], float], target: float) -> float:
    """Return the p in [0, 1] where the decreasing function ``f`` crosses ``target`` (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Return the exact (Clopper-Pearson) two-sided interval of a rate seen ``k`` times in ``n``."""
    if n < 1 or not 0 <= k <= n:
        msg = f"a rate needs 0 <= k <= n and n >= 1, got k={k}, n={n}"
        raise DfmStreamError(msg)
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else _solve_decreasing(lambda p: _binomial_cdf(k - 1, n, p), 1 - alpha / 2)
    high = 1.0 if k == n else _solve_decreasing(lambda p: _binomial_cdf(k, n, p), alpha / 2)
    return low, high


def allowed_above(n: int, max_fpr: float) -> int:
    """Return how many of ``n`` good scores the quantile threshold for ``max_fpr`` leaves above it."""
    return math.floor(max_fpr * n)


def images_needed(max_fpr: float) -> int:
    """Return the fewest good images whose quantile can resolve ``max_fpr`` (leave one score above)."""
    n = max(1, math.ceil(1.0 / max_fpr))
    while allowed_above(n, max_fpr) < 1:
        n += 1
    return n


def apply_margin(threshold: float, margin: float) -> float:
    """Scale ``threshold`` by ``margin`` away from the good scores (see the module docstring)."""
    if not (math.isfinite(margin) and margin > 0):
        msg = f"--margin must be a number > 0, got {margin}"
        raise ConfigError(msg)
    return float(threshold + (margin - 1.0) * abs(threshold))


@dataclass(frozen=True)
class FalseAlarmRate:
    """Good images scored above the threshold, out of all good ones, with a confidence interval."""

    alarms: int
    n_good: int
    low: float
    high: float

    @property
    def rate(self) -> float:
        """The observed rate ``alarms / n_good``."""
        return self.alarms / self.n_good

    def __str__(self) -> str:
        return (
            f"{self.alarms}/{self.n_good} good images above the threshold = {self.rate:.2%}"
            f" ({CONFIDENCE:.0%} CI {self.low:.2%} .. {self.high:.2%}, Clopper-Pearson)"
        )


def false_alarm_rate(good_scores: Sequence[float] | np.ndarray, threshold: float) -> FalseAlarmRate:
    """Count the good scores strictly above ``threshold`` and bound the rate they estimate."""
    scores = np.asarray(good_scores, dtype=np.float64).ravel()
    alarms = int((scores > threshold).sum())
    low, high = clopper_pearson(alarms, int(scores.size))
    return FalseAlarmRate(alarms, int(scores.size), low, high)


@dataclass(frozen=True)
class Calibration:
    """A chosen threshold, how it was chosen, what it gives on the good images, and any warning."""

    threshold: float
    how: str
    false_alarms: FalseAlarmRate
    warning: str | None = None


def _quantile(good: np.ndarray, max_fpr: float, force: bool) -> tuple[float, str, str | None]:
    n = int(good.size)
    threshold = quantile_threshold(good, max_fpr)
    how = f"quantile of {n} good images for a false-alarm rate <= {max_fpr:g}"
    if max_fpr == 0 or allowed_above(n, max_fpr) >= 1:
        return threshold, how, None
    problem = (
        f"{n} good images cannot resolve a false-alarm rate of {max_fpr:.2%}: need at least "
        f"{images_needed(max_fpr)}"
    )
    if not force:
        msg = (
            f"{problem}. Add good images, raise --max-fpr to at least {1 / n:.2g}, or pass --force to "
            "set the threshold to the highest good score (with --margin to keep it clear of them)"
        )
        raise ConfigError(msg)
    return threshold, f"highest of {n} good scores", f"{problem}; threshold set to the highest good score"


def choose_threshold(
    scores: np.ndarray, labels: np.ndarray, max_fpr: float, margin: float = 1.0, force: bool = False
) -> Calibration:
    """Pick the threshold: the ``max_fpr`` quantile of good-only data, or F1-optimal on labelled data.

    Raises :class:`ConfigError` when good-only data cannot resolve ``max_fpr`` and ``force`` is
    False, and :class:`DfmStreamError` when there is no good image at all.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    defective = np.asarray(labels).astype(bool).ravel()
    if defective.all():
        msg = "the calibration data holds only defective images: add good ones (test/good)"
        raise DfmStreamError(msg)
    warning = None
    if defective.any():
        choice = f1_optimal_threshold(defective, scores)
        threshold = choice.threshold
        how = f"F1-optimal (precision {choice.precision:.3f}, recall {choice.recall:.3f})"
    else:
        threshold, how, warning = _quantile(scores, max_fpr, force)
    if apply_margin(threshold, margin) != threshold:
        threshold, how = apply_margin(threshold, margin), f"{how}, x margin {margin:g}"
    return Calibration(threshold, how, false_alarm_rate(scores[~defective], threshold), warning)

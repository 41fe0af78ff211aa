"""Drift watch: how far a camera's recent frames have moved from what its model was fitted on.

An artifact carries a :class:`DriftReference` in its metadata: the distribution of three image
statistics of its training frames (recorded by ``fit``) and of the scores of its held-out good
images (recorded by ``calibrate``). A worker keeps, per camera, a :class:`Window` of the same
quantities over the last :data:`WINDOW` frames it scored and compares the two (:func:`compare`).

Image statistics, on the model-input image (after the resize, before any backbone), grey level
``g = 0.299 R + 0.587 G + 0.114 B`` in [0, 1] (the normalisation undone):

* ``brightness``: the mean of ``g``;
* ``contrast``: the standard deviation of ``g``;
* ``sharpness``: the variance of the 4-neighbour Laplacian of ``g`` over the interior pixels.

Figures (``None`` when not available: no reference, or fewer than :data:`MIN_FRAMES` frames):

* ``score_psi`` and ``image_psi[stat]``: population stability index of the window against the
  reference, on the reference's bins: up to :data:`MAX_BINS` equal-mass bins cut at the
  reference's own quantiles, open at both ends. ``PSI = sum((c - r) ln(c / r))`` over the bins,
  ``c`` and ``r`` the window's and the reference's shares (floored at :data:`_SHARE_FLOOR`).
* ``score_quantile_ratio``: ``(current p95 - reference p50) / (reference p95 - reference p50)``:
  1 when the window's scores spread as the calibration's good scores did; it grows as good parts
  score higher. Defined for either score type (``nll`` scores may be negative).

Alert lines: :data:`PSI_ALERT` (0.25, the usual "significant shift" line of the PSI) and
:data:`QUANTILE_RATIO_ALERT`. ``deploy/prometheus/alerts.yml`` uses the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dfm_stream.errors import ArtifactError

STATS: tuple[str, ...] = ("brightness", "contrast", "sharpness")
"""The image statistics, in the column order of :func:`image_stats`."""
MAX_BINS = 5
MIN_REFERENCE = 20
"""Fewest values a reference distribution is made of (fewer: that part of the reference is absent)."""
WINDOW = 300
"""Frames per camera the rolling window holds."""
MIN_FRAMES = 100
"""Frames the window needs before it reports figures."""
PSI_ALERT = 0.25
QUANTILE_RATIO_ALERT = 2.0
_SHARE_FLOOR = 1e-4
_GREY = (0.299, 0.587, 0.114)
STATS_SIDE = 128
"""Largest side (px) the image statistics read; larger model inputs are subsampled."""
_REFERENCE_VERSION = 1


def image_stats(batch: torch.Tensor, mean: Iterable[float], std: Iterable[float]) -> np.ndarray:
    """Return ``(N, 3)`` float64 brightness, contrast, sharpness of a normalised ``(N, 3, H, W)`` batch.

    Images wider or taller than :data:`STATS_SIDE` are read every ``k``-th pixel in both
    directions (``k = ceil(max(H, W) / STATS_SIDE)``), so the cost per frame is bounded; the
    reference and the live frames share the model's input size, hence the same ``k``.
    """
    step = max(1, math.ceil(max(batch.shape[-2:]) / STATS_SIDE))
    with torch.inference_mode():
        x = batch[:, :, ::step, ::step].float()
        w = [g * s for g, s in zip(_GREY, std, strict=True)]
        offset = sum(g * m for g, m in zip(_GREY, mean, strict=True))
        grey = x[:, 0] * w[0] + x[:, 1] * w[1] + x[:, 2] * w[2] + offset
        inner = grey[:, 1:-1, 1:-1]
        laplacian = (
            grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:] - 4 * inner
        )
        out = torch.stack(
            (
                grey.mean(dim=(1, 2)),
                grey.flatten(1).std(dim=1, correction=0),
                laplacian.flatten(1).var(dim=1, correction=0),
            ),
            dim=1,
        )
    return out.double().cpu().numpy()


def _finite_list(value: Any, what: str) -> list[float]:
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        msg = f"{what} must be a list of finite numbers"
        raise ValueError(msg)
    return [float(v) for v in value]


@dataclass(frozen=True)
class Distribution:
    """Reference bins of one quantity: ``edges`` (inner, ascending) and each bin's share ``shares``."""

    edges: tuple[float, ...]
    shares: tuple[float, ...]
    n: int
    p50: float
    p95: float

    @classmethod
    def of(cls, values: np.ndarray | Iterable[float]) -> Distribution | None:
        """Bin ``values`` at their own quantiles; None when there are fewer than :data:`MIN_REFERENCE`."""
        data = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
        data = data[np.isfinite(data)]
        if data.size < MIN_REFERENCE:
            return None
        bins = max(2, min(MAX_BINS, data.size // 10))
        edges = np.unique(np.quantile(data, np.arange(1, bins) / bins))
        counts = np.bincount(np.searchsorted(edges, data, side="left"), minlength=edges.size + 1)
        return cls(
            edges=tuple(float(e) for e in edges),
            shares=tuple(float(c) / data.size for c in counts),
            n=int(data.size),
            p50=float(np.quantile(data, 0.5)),
            p95=float(np.quantile(data, 0.95)),
        )

    def psi(self, values: np.ndarray) -> float:
        """Return the population stability index of ``values`` against these bins."""
        counts = np.bincount(
            np.searchsorted(np.asarray(self.edges), values, side="left"), minlength=len(self.shares)
        )
        current = np.maximum(counts / max(1, values.size), _SHARE_FLOOR)
        reference = np.maximum(np.asarray(self.shares), _SHARE_FLOOR)
        return float(np.sum((current - reference) * np.log(current / reference)))

    def to_json_dict(self) -> dict[str, Any]:
        """Return the JSON form stored in the artifact."""
        return {"edges": list(self.edges), "shares": list(self.shares), "n": self.n, "p50": self.p50,
                "p95": self.p95}  # fmt: skip

    @classmethod
    def from_json_dict(cls, data: Any, what: str) -> Distribution:
        """Rebuild from :meth:`to_json_dict`; ``ValueError`` naming ``what`` when malformed."""
        if not isinstance(data, dict) or set(data) != {"edges", "shares", "n", "p50", "p95"}:
            msg = f"{what} must be an object with edges, shares, n, p50 and p95"
            raise ValueError(msg)
        edges = _finite_list(data["edges"], f"{what}.edges")
        shares = _finite_list(data["shares"], f"{what}.shares")
        if len(shares) != len(edges) + 1 or len(shares) > MAX_BINS or edges != sorted(set(edges)):
            msg = f"{what}: edges must ascend strictly and shares have one more entry, at most {MAX_BINS}"
            raise ValueError(msg)
        if any(s < 0 for s in shares) or abs(sum(shares) - 1) > 1e-6:
            msg = f"{what}.shares must be >= 0 and sum to 1"
            raise ValueError(msg)
        n = data["n"]
        if not isinstance(n, int) or isinstance(n, bool) or n < MIN_REFERENCE:
            msg = f"{what}.n must be an integer >= {MIN_REFERENCE}"
            raise ValueError(msg)
        p50, p95 = _finite_list([data["p50"], data["p95"]], f"{what}.p50/p95")
        return cls(tuple(edges), tuple(shares), n, p50, p95)


@dataclass(frozen=True)
class DriftReference:
    """What an artifact's good frames looked like: image statistics (fit) and scores (calibrate)."""

    image: dict[str, Distribution] = field(default_factory=dict)
    scores: Distribution | None = None

    def with_scores(self, good_scores: np.ndarray | Iterable[float]) -> DriftReference:
        """Return a copy whose score distribution is that of ``good_scores`` (held-out good images)."""
        return DriftReference(image=dict(self.image), scores=Distribution.of(good_scores))

    @property
    def empty(self) -> bool:
        """True when nothing could be recorded (too few frames)."""
        return not self.image and self.scores is None

    def to_json_dict(self) -> dict[str, Any]:
        """Return the JSON form stored as the artifact's ``drift`` metadata field."""
        return {
            "version": _REFERENCE_VERSION,
            "image": {name: d.to_json_dict() for name, d in sorted(self.image.items())},
            "scores": None if self.scores is None else self.scores.to_json_dict(),
        }

    @classmethod
    def from_json_dict(cls, data: Any) -> DriftReference:
        """Rebuild from :meth:`to_json_dict`; ``ValueError`` saying what is malformed."""
        if not isinstance(data, dict) or set(data) != {"version", "image", "scores"}:
            msg = "must be an object with version, image and scores"
            raise ValueError(msg)
        if data["version"] != _REFERENCE_VERSION:
            msg = f"version must be {_REFERENCE_VERSION}"
            raise ValueError(msg)
        image = data["image"]
        if not isinstance(image, dict) or not set(image) <= set(STATS):
            msg = f"image must map some of {', '.join(STATS)} to distributions"
            raise ValueError(msg)
        scores = data["scores"]
        return cls(
            image={name: Distribution.from_json_dict(d, f"image.{name}") for name, d in image.items()},
            scores=None if scores is None else Distribution.from_json_dict(scores, "scores"),
        )


def check_reference_json(value: Any) -> str | None:
    """Return why ``value`` is not a valid stored reference (None when it is): the artifact validator."""
    if value is None:
        return None
    try:
        DriftReference.from_json_dict(value)
    except ValueError as e:
        return f"not a drift reference: {e}"
    return None


def reference_of(drift_json: dict[str, Any] | None, source: str = "<metadata>") -> DriftReference | None:
    """Return the reference of an artifact's ``drift`` field (None for artifacts made before it)."""
    if drift_json is None:
        return None
    try:
        return DriftReference.from_json_dict(drift_json)
    except ValueError as e:
        msg = f"artifact {source}: bad drift reference ({e}): re-fit or re-calibrate it"
        raise ArtifactError(msg) from e


class ImageStatsCollector:
    """Collects the image statistics of training batches as they pass (``fit``)."""

    def __init__(self, mean: Iterable[float], std: Iterable[float]) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)
        self._chunks: list[np.ndarray] = []

    def tap(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Yield ``batches`` unchanged, recording each one's statistics."""
        for batch in batches:
            self._chunks.append(image_stats(batch, self.mean, self.std))
            yield batch

    def reference(self) -> DriftReference:
        """Return the reference of every batch seen (image part only; scores come at calibration)."""
        if not self._chunks:
            return DriftReference()
        stats = np.concatenate(self._chunks)
        image = {name: Distribution.of(stats[:, i]) for i, name in enumerate(STATS)}
        return DriftReference(image={k: v for k, v in image.items() if v is not None})


@dataclass(frozen=True)
class Figure:
    """One drift figure: its value against its alert line, with the reference and current medians."""

    name: str
    value: float | None
    alert: float
    reference: float | None = None
    current: float | None = None

    @property
    def past_alert(self) -> bool:
        """True when the figure is at or past its alert line."""
        return self.value is not None and self.value >= self.alert


@dataclass(frozen=True)
class DriftFigures:
    """The comparison of one camera's window with its model's reference."""

    frames: int
    figures: tuple[Figure, ...]
    verdict: str
    """``drift`` (a figure past its line), ``ok``, ``warming up`` (too few frames) or ``unavailable``."""
    reason: str = ""

    def get(self, name: str) -> Figure | None:
        """Return the figure called ``name`` (None when absent)."""
        return next((f for f in self.figures if f.name == name), None)


class Window:
    """The last ``size`` frames' score and image statistics of one camera (not thread-safe)."""

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self._data = np.zeros((size, 1 + len(STATS)), dtype=np.float64)
        self._next = 0
        self.count = 0

    def add(self, scores: np.ndarray, stats: np.ndarray) -> None:
        """Append frames: ``scores`` (N,) and ``stats`` (N, 3) from :func:`image_stats`."""
        rows = np.column_stack((np.asarray(scores, dtype=np.float64), stats))[-self.size :]
        index = (self._next + np.arange(len(rows))) % self.size
        self._data[index] = rows
        self._next = int((self._next + len(rows)) % self.size)
        self.count = min(self.size, self.count + len(rows))

    def values(self) -> np.ndarray:
        """Return the held rows ``(n, 4)``: score, then :data:`STATS`."""
        return self._data[: self.count] if self.count < self.size else self._data


def compare(window: Window, reference: DriftReference | None, min_frames: int = MIN_FRAMES) -> DriftFigures:
    """Return the drift figures of ``window`` against ``reference``."""
    if reference is None or reference.empty:
        why = "the model has no drift reference (made before drift watch, or fitted on < 20 images):"
        return DriftFigures(window.count, (), "unavailable", f"{why} re-fit and calibrate it")
    if window.count < min_frames:
        return DriftFigures(window.count, (), "warming up", f"{window.count} of {min_frames} frames so far")
    rows = window.values()
    figures: list[Figure] = []
    if reference.scores is not None:
        ref = reference.scores
        scores = rows[:, 0]
        p95 = float(np.quantile(scores, 0.95))
        spread = ref.p95 - ref.p50
        ratio = (p95 - ref.p50) / spread if spread > 0 else (math.inf if p95 > ref.p95 else 1.0)
        median = float(np.median(scores))
        figures.append(Figure("score_psi", ref.psi(scores), PSI_ALERT, ref.p50, median))
        figures.append(Figure("score_quantile_ratio", ratio, QUANTILE_RATIO_ALERT, ref.p95, p95))
    for i, name in enumerate(STATS):
        dist = reference.image.get(name)
        if dist is not None:
            column = rows[:, 1 + i]
            figures.append(
                Figure(f"{name}_psi", dist.psi(column), PSI_ALERT, dist.p50, float(np.median(column)))
            )
    verdict = "drift" if any(f.past_alert for f in figures) else "ok"
    reason = "" if reference.scores is not None else "no score reference: calibrate the model to get one"
    return DriftFigures(window.count, tuple(figures), verdict, reason)

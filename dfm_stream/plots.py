"""The PNG plots of ``dfm-stream eval`` (ROC curve, score histogram) and heat-map overlays, in OpenCV.

Every plot has axis ticks with values, labelled lines (the model's own threshold and the
F1-optimal one) and a legend with counts. The plot functions return the texts they drew, so a test
can check what a reader of the picture sees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dfm_stream.errors import DfmStreamError

BLACK = (0, 0, 0)
GREY = (170, 170, 170)
GOOD = (0, 160, 0)  # BGR green
DEFECTIVE = (0, 0, 220)  # BGR red
CURVE = (200, 80, 0)  # BGR blue
MODEL = (200, 0, 200)  # BGR magenta: the model's own threshold
F1 = BLACK  # the F1-optimal threshold, dashed
_FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class Marker:
    """A threshold to show on a plot: its label, value and where it puts the ROC point."""

    label: str
    threshold: float
    fpr: float | None = None
    tpr: float | None = None


@dataclass
class Canvas:
    """A white BGR image plus the list of every text drawn on it."""

    width: int
    height: int
    img: np.ndarray = field(init=False)
    texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.img = np.full((self.height, self.width, 3), 255, np.uint8)

    def text(self, text: str, org: tuple[int, int], scale: float = 0.4, colour: tuple = BLACK) -> None:
        """Draw ``text`` with its baseline starting at ``org``."""
        cv2.putText(self.img, text, org, _FONT, scale, colour, 1, cv2.LINE_AA)
        self.texts.append(text)

    def text_width(self, text: str, scale: float = 0.4) -> int:
        """Return the width in pixels ``text`` takes at ``scale``."""
        return int(cv2.getTextSize(text, _FONT, scale, 1)[0][0])

    def dashed(self, p0: tuple[int, int], p1: tuple[int, int], colour: tuple, thickness: int = 2) -> None:
        """Draw a dashed line (8 px on, 5 px off)."""
        length = max(1.0, math.dist(p0, p1))
        for start in np.arange(0.0, length, 13.0):
            a, b = start / length, min(start + 8.0, length) / length
            q0 = (round(p0[0] + a * (p1[0] - p0[0])), round(p0[1] + a * (p1[1] - p0[1])))
            q1 = (round(p0[0] + b * (p1[0] - p0[0])), round(p0[1] + b * (p1[1] - p0[1])))
            cv2.line(self.img, q0, q1, colour, thickness, cv2.LINE_AA)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Return round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi], about ``target`` of them."""
    span = hi - lo if hi > lo else 1.0
    raw = span / max(target, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10)), key=lambda v: abs(v - raw))
    first = math.ceil(lo / step - 1e-9) * step
    count = math.floor((hi - first) / step + 1e-9) + 1
    return [round(first + i * step, 12) for i in range(max(count, 0))]


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value != int(value) or abs(value) >= 1e4 else str(int(value))


Range = tuple[float, float]


def _axes(
    c: Canvas, box: tuple[int, int, int, int], x_range: Range, y_range: Range, labels: tuple[str, ...]
) -> None:
    """Draw the frame, ticks with values on both axes, the axis labels (x, y) and the title."""
    x0, y0, x1, y1 = box
    (xlo, xhi), (ylo, yhi) = x_range, y_range
    cv2.rectangle(c.img, (x0, y0), (x1, y1), BLACK, 1)
    for value in nice_ticks(xlo, xhi):
        x = round(x0 + (value - xlo) / (xhi - xlo) * (x1 - x0))
        cv2.line(c.img, (x, y1), (x, y1 + 5), BLACK, 1)
        label = _fmt(value)
        c.text(label, (x - c.text_width(label, 0.35) // 2, y1 + 18), 0.35)
    for value in nice_ticks(ylo, yhi):
        y = round(y1 - (value - ylo) / (yhi - ylo) * (y1 - y0))
        cv2.line(c.img, (x0 - 5, y), (x0, y), BLACK, 1)
        label = _fmt(value)
        c.text(label, (x0 - 8 - c.text_width(label, 0.35), y + 4), 0.35)
    xlabel, ylabel, title = labels
    c.text(xlabel, ((x0 + x1) // 2 - c.text_width(xlabel, 0.45) // 2, y1 + 40), 0.45)
    c.text(ylabel, (5, y0 - 10), 0.45)
    c.text(title, (x0 + 60, y0 - 12), 0.5)


def _legend(c: Canvas, corner: tuple[int, int], entries: list[tuple[str, tuple, str]], top: bool) -> None:
    """Draw a legend box with its right ``top`` (or bottom) corner at ``corner``.

    Entries are ``(text, colour, kind)``, kind one of ``box``, ``line``, ``dashed``, ``dot``.
    """
    width = max(c.text_width(t) for t, _, _ in entries) + 44
    height = 8 + 18 * len(entries)
    x, y = corner[0] - width, corner[1] if top else corner[1] - height
    cv2.rectangle(c.img, (x, y), (x + width, y + height), (250, 250, 250), -1)
    cv2.rectangle(c.img, (x, y), (x + width, y + height), GREY, 1)
    for i, (text, colour, kind) in enumerate(entries):
        cy = y + 14 + 18 * i
        if kind == "box":
            cv2.rectangle(c.img, (x + 8, cy - 5), (x + 28, cy + 5), colour, -1)
        elif kind == "dashed":
            c.dashed((x + 6, cy), (x + 30, cy), colour)
        elif kind == "dot":
            cv2.circle(c.img, (x + 18, cy), 5, colour, -1, cv2.LINE_AA)
        else:
            cv2.line(c.img, (x + 6, cy), (x + 30, cy), colour, 2, cv2.LINE_AA)
        c.text(text, (x + 36, cy + 4))


def _marker_style(marker: Marker) -> tuple[tuple, str]:
    return (MODEL, "line") if marker.label.startswith("model") else (F1, "dashed")


def plot_roc(
    path: Path,
    fpr: np.ndarray,
    tpr: np.ndarray,
    auc: float | None,
    counts: tuple[int, int],
    markers: Sequence[Marker] = (),
) -> list[str]:
    """Draw the ROC curve with the thresholds' operating points as a PNG at ``path``; return its texts."""
    c = Canvas(520, 520)
    box = (60, 40, 500, 460)
    n_good, n_defective = counts
    _axes(c, box, (0.0, 1.0), (0.0, 1.0), ("false-alarm rate (FPR)", "TPR", "ROC"))
    x0, y0, x1, y1 = box
    cv2.line(c.img, (x0, y1), (x1, y0), GREY, 1, cv2.LINE_AA)
    points = np.stack([x0 + fpr * (x1 - x0), y1 - tpr * (y1 - y0)], axis=1).round().astype(np.int32)
    cv2.polylines(c.img, [points], False, CURVE, 2, cv2.LINE_AA)
    auc_text = "n/a" if auc is None else f"{auc:.3f}"
    entries = [
        (f"ROC, AUROC {auc_text} ({n_good} good, {n_defective} defective)", CURVE, "line"),
        ("chance", GREY, "line"),
    ]
    for marker in markers:
        colour, _ = _marker_style(marker)
        if marker.fpr is None or marker.tpr is None:
            entries.append((f"{marker.label}: none", colour, "dot"))
            continue
        centre = (round(x0 + marker.fpr * (x1 - x0)), round(y1 - marker.tpr * (y1 - y0)))
        cv2.circle(c.img, centre, 6, colour, -1, cv2.LINE_AA)
        text = f"{marker.label} {marker.threshold:.4g}: FPR {marker.fpr:.3f}, TPR {marker.tpr:.3f}"
        entries.append((text, colour, "dot"))
    _legend(c, (x1 - 8, y1 - 8), entries, top=False)
    write_png(path, c.img)
    return c.texts


def _bars(c: Canvas, box: tuple[int, int, int, int], counts: list[np.ndarray], peak: float) -> None:
    """Good and defective bars side by side in each bin, each with its count above it."""
    x0, y0, x1, y1 = box
    bins = len(counts[0])
    width = (x1 - x0) / bins
    for side, (colour, count) in enumerate(zip((GOOD, DEFECTIVE), counts, strict=True)):
        for i, n in enumerate(count):
            if n == 0:
                continue
            left = round(x0 + i * width + side * width / 2)
            right = round(x0 + i * width + (side + 1) * width / 2) - 1
            top = y1 - round(n / peak * (y1 - y0))
            cv2.rectangle(c.img, (left, top), (right, y1), colour, -1)
            label = str(int(n))
            centre = (left + right) // 2 - c.text_width(label, 0.3) // 2
            c.text(label, (centre, top - 3), 0.3, colour)


def plot_histogram(
    path: Path, good: np.ndarray, defective: np.ndarray, markers: Sequence[Marker] = (), bins: int = 20
) -> list[str]:
    """Draw good (green) and defective (red) score counts per bin and the thresholds as a PNG."""
    c = Canvas(800, 460)
    box = (60, 50, 780, 390)
    thresholds = [m.threshold for m in markers]
    values = np.r_[good, defective, thresholds]
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(v, edges)[0] for v in (good, defective)]
    peak = max(1, *(int(n.max()) if n.size else 0 for n in counts)) * 1.1  # room for the count labels
    _axes(c, box, (lo, hi), (0.0, peak), ("anomaly score", "images per bin", "score histogram"))
    _bars(c, box, counts, peak)
    x0, y0, x1, y1 = box
    entries = [
        (f"good ({len(good)} images)", GOOD, "box"),
        (f"defective ({len(defective)} images)", DEFECTIVE, "box"),
    ]
    for marker in markers:
        colour, kind = _marker_style(marker)
        x = round(x0 + (marker.threshold - lo) / (hi - lo) * (x1 - x0))
        if kind == "dashed":
            c.dashed((x, y0), (x, y1), colour)
        else:
            cv2.line(c.img, (x, y0), (x, y1), colour, 2)
        entries.append((f"{marker.label} {marker.threshold:.4g}", colour, kind))
    _legend(c, (x1 - 8, y0 + 8), entries, top=True)
    write_png(path, c.img)
    return c.texts


def heatmap_overlay(image_bgr: np.ndarray, anomaly_map: np.ndarray, vmax: float) -> np.ndarray:
    """Blend a JET colour map of ``anomaly_map`` (0 .. ``vmax``) over the image."""
    height, width = image_bgr.shape[:2]
    scaled = np.clip(anomaly_map / max(vmax, 1e-12), 0, 1)
    levels = cv2.resize((scaled * 255).astype(np.uint8), (width, height), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(levels, cv2.COLORMAP_JET)
    return cv2.addWeighted(image_bgr, 0.55, colour, 0.45, 0)


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a BGR uint8 image as a PNG (paths with any characters)."""
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        msg = f"cannot encode a PNG for {path}"
        raise DfmStreamError(msg)
    Path(path).write_bytes(encoded.tobytes())

"""Generated inspection images: textured metal discs, some with drawn scratches or spots.

Used for the README quick start, the tests (fit + eval on a set nobody has to download) and the
synthetic camera source. Defects are drawn clearly enough that even a random-weights backbone
separates them from good parts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

DEFECT_TYPES: tuple[str, ...] = ("scratch", "spot")
OTHER_DEFECT_TYPES: tuple[str, ...] = ("crack", "stain")
"""Defects of a second evaluation set (``make_dataset(defects=OTHER_DEFECT_TYPES)``): a thin jagged
dark line and a mid-grey blob, shapes and contrasts the default set does not have."""


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(40, 60)
    noise = cv2.GaussianBlur(rng.normal(0, 6, (size, size)).astype(np.float32), (0, 0), size / 64)
    ramp = np.linspace(-8, 8, size, dtype=np.float32)[None, :] * rng.uniform(-1, 1)
    return base + noise + ramp


def _brushed_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    streaks = cv2.blur(noise, (max(3, size // 8), 1))
    angle = rng.uniform(-5, 5)
    rot = cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0)
    streaks = cv2.warpAffine(streaks, rot, (size, size), borderMode=cv2.BORDER_REFLECT)
    return 10.0 * streaks / (streaks.std() + 1e-6)


def _part_geometry(rng: np.random.Generator, size: int) -> tuple[tuple[float, float], float]:
    centre = (size / 2 + rng.uniform(-0.03, 0.03) * size, size / 2 + rng.uniform(-0.03, 0.03) * size)
    return centre, size * rng.uniform(0.37, 0.40)


def _draw_part(rng: np.random.Generator, size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    image = _background(rng, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dist = np.hypot(xx - centre[0], yy - centre[1])
    metal = 150.0 + rng.uniform(-8, 8) + _brushed_texture(rng, size)
    metal += 12.0 * np.cos(dist / radius * np.pi * 3)  # machined rings
    metal += (xx - centre[0]) / radius * rng.uniform(5, 15)  # light from one side
    disc = np.clip(radius - dist + 0.5, 0, 1)
    hole = np.clip(radius * 0.25 - dist + 0.5, 0, 1)
    rim = np.clip(1 - np.abs(dist - radius * 0.92) / max(1.0, size / 128), 0, 1)
    image = image * (1 - disc) + metal * disc
    image = image * (1 - rim * 0.35)
    image = image * (1 - hole) + 25.0 * hole
    return image


def _draw_scratch(
    rng: np.random.Generator, size: int, centre: tuple[float, float], radius: float, mask: np.ndarray
) -> float:
    angle = rng.uniform(0, np.pi)
    length = radius * rng.uniform(0.6, 1.0)
    offset = rng.uniform(0.4, 0.6) * radius
    theta = rng.uniform(0, 2 * np.pi)
    mid = (centre[0] + offset * np.cos(theta), centre[1] + offset * np.sin(theta))
    dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
    start = (round(mid[0] - dx), round(mid[1] - dy))
    end = (round(mid[0] + dx), round(mid[1] + dy))
    cv2.line(mask, start, end, 255, thickness=max(2, size // 64), lineType=cv2.LINE_AA)
    return 20.0 if rng.random() < 0.5 else 245.0


def _draw_spot(
    rng: np.random.Generator, size: int, centre: tuple[float, float], radius: float, mask: np.ndarray
) -> float:
    offset = rng.uniform(0.35, 0.65) * radius
    theta = rng.uniform(0, 2 * np.pi)
    where = (round(centre[0] + offset * np.cos(theta)), round(centre[1] + offset * np.sin(theta)))
    axes = (max(3, round(size * rng.uniform(0.05, 0.08))), max(3, round(size * rng.uniform(0.04, 0.07))))
    cv2.ellipse(mask, where, axes, rng.uniform(0, 180), 0, 360, 255, thickness=-1, lineType=cv2.LINE_AA)
    return 35.0


def _draw_crack(
    rng: np.random.Generator, size: int, centre: tuple[float, float], radius: float, mask: np.ndarray
) -> float:
    offset = rng.uniform(0.3, 0.6) * radius
    theta = rng.uniform(0, 2 * np.pi)
    point = np.array([centre[0] + offset * np.cos(theta), centre[1] + offset * np.sin(theta)])
    heading = rng.uniform(0, 2 * np.pi)
    points = [point.copy()]
    for _ in range(int(rng.integers(4, 7))):
        heading += rng.uniform(-0.8, 0.8)
        point = point + radius * rng.uniform(0.08, 0.14) * np.array([np.cos(heading), np.sin(heading)])
        points.append(point.copy())
    poly = np.round(np.array(points)).astype(np.int32)[:, None, :]
    cv2.polylines(mask, [poly], False, 255, thickness=max(1, size // 128), lineType=cv2.LINE_AA)
    return 60.0


def _draw_stain(
    rng: np.random.Generator, size: int, centre: tuple[float, float], radius: float, mask: np.ndarray
) -> float:
    offset = rng.uniform(0.35, 0.6) * radius
    theta = rng.uniform(0, 2 * np.pi)
    where = np.array([centre[0] + offset * np.cos(theta), centre[1] + offset * np.sin(theta)])
    for _ in range(3):
        blob = where + rng.uniform(-0.04, 0.04, 2) * size
        r = max(2, round(size * rng.uniform(0.025, 0.045)))
        cv2.circle(mask, (round(blob[0]), round(blob[1])), r, 255, thickness=-1, lineType=cv2.LINE_AA)
    return 105.0


_DRAW = {"scratch": _draw_scratch, "spot": _draw_spot, "crack": _draw_crack, "stain": _draw_stain}


def render_part(
    rng: np.random.Generator, size: int = 256, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Render one part: ``(BGR uint8 HxWx3 image, uint8 HxW mask with 0/255)``.

    ``defect`` is None (a good part) or one of :data:`DEFECT_TYPES` / :data:`OTHER_DEFECT_TYPES`;
    the mask marks the defect.
    """
    if defect is not None and defect not in _DRAW:
        msg = f"unknown defect type {defect!r}: choose one of {', '.join(_DRAW)} or None"
        raise ValueError(msg)
    centre, radius = _part_geometry(rng, size)
    gray = _draw_part(rng, size, centre, radius)
    mask = np.zeros((size, size), np.uint8)
    if defect is not None:
        level = _DRAW[defect](rng, size, centre, radius, mask)
        alpha = mask.astype(np.float32) / 255.0
        gray = gray * (1 - alpha) + level * alpha
        mask = np.where(mask > 127, 255, 0).astype(np.uint8)
    gray = gray + rng.normal(0, 2.0, gray.shape)
    tint = np.array([1.0, 1.0, 1.0]) + rng.uniform(-0.03, 0.03, 3)  # slightly varying lighting colour
    image = np.clip(gray[..., None] * tint[None, None, :], 0, 255).astype(np.uint8)
    return image, mask


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        msg = f"cannot encode {path}"
        raise OSError(msg)
    path.write_bytes(encoded.tobytes())


def make_dataset(
    root: str | Path,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_defect: int = 20,
    size: int = 128,
    seed: int = 0,
    defects: tuple[str, ...] = DEFECT_TYPES,
) -> Path:
    """Write a synthetic set in the MVTec AD layout under ``root`` and return ``root``.

    ``train/good`` (``n_train``), ``test/good`` (``n_test_good``), ``test/<defect>`` (``n_test_defect``
    in total, shared round-robin between ``defects``, by default :data:`DEFECT_TYPES`) and
    ``ground_truth/<defect>/<name>_mask.png``.
    """
    unknown = sorted(set(defects) - set(_DRAW))
    if not defects or unknown:
        msg = f"defects {list(defects)}: choose from {', '.join(_DRAW)}"
        raise ValueError(msg)
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_test_good)):
        folder = root / split / "good"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _write_png(folder / f"{i:03d}.png", render_part(rng, size)[0])
    counters = dict.fromkeys(defects, 0)
    for i in range(n_test_defect):
        defect = defects[i % len(defects)]
        image, mask = render_part(rng, size, defect)
        name = f"{counters[defect]:03d}"
        counters[defect] += 1
        (root / "test" / defect).mkdir(parents=True, exist_ok=True)
        (root / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        _write_png(root / "test" / defect / f"{name}.png", image)
        _write_png(root / "ground_truth" / defect / f"{name}_mask.png", mask)
    logger.info("wrote synthetic data set to %s", root)
    return root

"""Heat-map files of ``dfm-stream score --heatmaps``: their names and their colour scale.

A heat map is named after its source image (``scratch_004.png`` -> ``scratch_004.png`` in the
heat-map folder). Images whose names collide (``test/good/000.png`` and ``test/crack/000.png``)
are told apart by their folders below the common one (``good__000.png``, ``crack__000.png``), and
by their extension if that is still not enough (``a.jpg.png``, ``a.png.png``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SEPARATOR = "__"


def _relative_parts(paths: Sequence[Path]) -> dict[Path, tuple[str, ...]]:
    absolute = {p: Path(os.path.abspath(p)) for p in paths}
    root = Path(os.path.commonpath([a.parent for a in absolute.values()]))
    return {p: a.relative_to(root).parts for p, a in absolute.items()}


def heatmap_names(paths: Sequence[Path]) -> dict[Path, str]:
    """Return a distinct PNG file name for each image path (the same path twice gets one name)."""
    unique = list(dict.fromkeys(paths))
    if not unique:
        return {}
    parts = _relative_parts(unique)
    candidates = [
        lambda p: p.stem,
        lambda p: SEPARATOR.join((*parts[p][:-1], p.stem)),
        lambda p: SEPARATOR.join(parts[p]),
    ]
    names: dict[Path, str] = {}
    pending = unique
    for candidate in candidates:
        counts = Counter(candidate(p) for p in pending)
        for p in pending:
            if counts[candidate(p)] == 1:
                names[p] = candidate(p) + ".png"
        pending = [p for p in pending if p not in names]
    for p in pending:  # two spellings of one file ("a.png", "./a.png"): one image, one name
        names[p] = candidates[-1](p) + ".png"
    return names


def heatmap_scale(threshold: float | None, anomaly_map: np.ndarray, score: float) -> float:
    """Colour scale: the map's maximum, but at least twice the per-position error at the threshold.

    Good parts then stay cool instead of showing their noise at full colour.
    """
    peak = float(anomaly_map.max())
    if threshold is None or score <= 0:
        return peak
    positions = score / max(float(anomaly_map.mean()), 1e-12)  # ~ number of feature positions
    return max(peak, 2.0 * threshold / positions)

"""A built-in camera: generated metal parts riding a conveyor belt, some with defects.

``synthetic:seed=3,defect_rate=0.1,fps=10,size=256x256,cycle=8`` (every key optional). A part
crosses the frame over ``cycle`` frames, then the next part comes. Whether part ``i`` is
defective, and how it looks, depends only on ``(seed, i)``, so a run is reproducible and a test
knows which frames carry a defect (:meth:`SyntheticSource.defect_at`). Each frame message also
carries the extra keys ``defect`` (bool), ``defect_type`` (when defective) and ``part`` (index).
"""

import math
from typing import Any

import numpy as np

from dfm_stream.errors import SourceError
from dfm_stream.sources.base import Frame, Source, now_ns

DEFAULTS: dict[str, float] = {"seed": 0, "defect_rate": 0.1, "fps": 10.0, "cycle": 8}
DEFAULT_SIZE = (256, 256)
PART_FRACTION = 0.8
"""Part diameter (its square tile) as a fraction of the frame's smaller side."""


def _parse_size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 16 or int(h) < 16:
        raise SourceError(f"synthetic source: size {text!r} must be WxH with W, H >= 16 (e.g. 256x256)")
    return int(w), int(h)


class SyntheticSource(Source):
    """Parts on a conveyor, rendered with :func:`dfm_stream.synthetic_parts.render_part`."""

    kind = "synthetic"
    is_live = False
    finite = False

    def __init__(
        self,
        seed: int = 0,
        defect_rate: float = 0.1,
        fps: float = 10.0,
        size: tuple[int, int] = DEFAULT_SIZE,
        cycle: int = 8,
    ) -> None:
        if not 0.0 <= defect_rate <= 1.0:
            raise SourceError(f"synthetic source: defect_rate={defect_rate} must be within [0, 1]")
        if cycle < 1 or not 0 < fps < math.inf:
            raise SourceError(f"synthetic source: cycle={cycle} must be >= 1 and fps={fps} > 0 (finite)")
        if seed < 0:
            raise SourceError(f"synthetic source: seed={seed} must be >= 0")
        self.seed = int(seed)
        self.defect_rate = float(defect_rate)
        self._fps = float(fps)
        self.size = size
        self.cycle = int(cycle)
        self.index = 0
        self._part_index = -1
        self._tile: np.ndarray | None = None
        self._defect: str | None = None

    @classmethod
    def from_spec(cls, spec: str, fps: float = 0.0) -> "SyntheticSource":
        """Parse ``synthetic:key=value,...``; ``fps`` (the camera's) applies when the spec has none."""
        _, _, params = spec.partition(":")
        values: dict[str, Any] = dict(DEFAULTS)
        if fps > 0:
            values["fps"] = fps
        size = DEFAULT_SIZE
        for item in filter(None, (p.strip() for p in params.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or (key not in DEFAULTS and key != "size"):
                raise SourceError(
                    f"synthetic source: bad parameter {item!r} in {spec!r}; use key=value with keys"
                    f" {', '.join([*DEFAULTS, 'size'])}"
                )
            if key == "size":
                size = _parse_size(value.strip())
                continue
            try:
                values[key] = float(value) if key in ("defect_rate", "fps") else int(value)
            except ValueError as e:
                raise SourceError(f"synthetic source: {key}={value!r} is not a number") from e
        return cls(values["seed"], values["defect_rate"], values["fps"], size, values["cycle"])

    @property
    def fps(self) -> float:
        """Return the rate at which parts move (frames per second)."""
        return self._fps

    def defect_at(self, index: int) -> str | None:
        """Return the defect type shown in frame ``index`` (counted from open), or None if good."""
        return self._part(index // self.cycle)[0]

    def _part(self, part: int) -> tuple[str | None, np.random.Generator]:
        from dfm_stream.synthetic_parts import DEFECT_TYPES

        rng = np.random.default_rng([self.seed, part])
        defect = None
        if rng.random() < self.defect_rate:
            defect = str(DEFECT_TYPES[int(rng.integers(len(DEFECT_TYPES)))])
        return defect, rng

    def open(self) -> None:
        """Start from frame 0."""
        self.index = 0
        self._part_index = -1

    def _render(self, part: int) -> tuple[np.ndarray, str | None]:
        from dfm_stream.synthetic_parts import render_part

        w, h = self.size
        defect, rng = self._part(part)
        tile, _mask = render_part(rng, max(16, int(min(w, h) * PART_FRACTION)), defect)
        return tile, defect

    def _belt(self, shift: int) -> np.ndarray:
        w, h = self.size
        frame = np.full((h, w, 3), 70, np.uint8)
        period = max(8, w // 8)
        xs = (np.arange(w) + shift) % period < 2  # belt seams moving with the parts
        frame[:, xs] = 95
        frame[: max(2, h // 32)] = 40
        frame[h - max(2, h // 32) :] = 40
        return frame

    def read(self) -> Frame:
        """Render the next frame of the conveyor."""
        part, step = divmod(self.index, self.cycle)
        if part != self._part_index:
            self._tile, self._defect = self._render(part)
            self._part_index = part
        w, h = self.size
        assert self._tile is not None
        s = self._tile.shape[0]
        travel = 0.3 * w
        cx = int(0.35 * w + travel * (step / max(1, self.cycle - 1) if self.cycle > 1 else 0.5))
        frame = self._belt(-cx)
        x0, y0 = cx - s // 2, (h - s) // 2
        fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(w, x0 + s), min(h, y0 + s)
        frame[fy0:fy1, fx0:fx1] = self._tile[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
        extra: dict[str, Any] = {"defect": self._defect is not None, "part": part}
        if self._defect is not None:
            extra["defect_type"] = self._defect
        self.index += 1
        return Frame(frame, now_ns(), extra)

    def close(self) -> None:
        """Nothing to release."""
        self._tile = None

    def describe(self) -> dict[str, Any]:
        """Return the generator's parameters."""
        return {
            **super().describe(),
            "seed": self.seed,
            "defect_rate": self.defect_rate,
            "size": f"{self.size[0]}x{self.size[1]}",
            "cycle": self.cycle,
        }

"""The frames of one enrolment kept on disk: one image file per frame plus ``manifest.json``.

Layout of the folder (``dfm-stream enrol --out DIR``)::

    DIR/000000.jpg ...   the frame as the camera sent it (JPEG frames byte for byte; raw frames as
                         lossless PNG), numbered in the order they were collected
    DIR/manifest.json    provenance: camera, model, selection rule, who and when, the Redis it came
                         from, and per frame its file, frame id, stream entry id, capture time,
                         source (``stream`` / ``false_alarm``), reviewer and split (``train`` /
                         ``holdout``)

Nothing is pickled: images are standard files, the manifest is JSON (``format`` 1). Frames are
written as they are collected, so memory holds one frame at a time.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from dfm_stream.errors import ConfigError, ImageReadError
from dfm_stream.files import write_atomic
from dfm_stream.images import preprocess, read_image
from dfm_stream.learn.collect import EnrolFrame

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass
class KeptFrame:
    """One frame's line in the manifest."""

    file: str
    frame_id: str
    entry_id: str
    ts: int
    source: str
    reviewer: str = ""
    split: str = "train"


class EnrolmentSet:
    """Writes the frames of an enrolment into ``folder`` and reads them back in batches."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.frames: list[KeptFrame] = []
        self._ids: set[str] = set()

    def add(self, frame: EnrolFrame) -> bool:
        """Write ``frame``'s image; False (nothing written) when that frame id is already kept."""
        if frame.frame_id in self._ids:
            return False
        stem = f"{len(self.frames):06d}"
        if frame.jpeg is not None:
            name, data = f"{stem}.jpg", frame.jpeg
        else:
            assert frame.image is not None
            ok, buf = cv2.imencode(".png", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise ImageReadError(f"cannot encode frame {frame.frame_id} as PNG")
            name, data = f"{stem}.png", buf.tobytes()
        try:
            (self.folder / name).write_bytes(data)
        except OSError as e:
            raise ConfigError(f"--out: cannot write {self.folder / name} ({e.strerror or e})") from e
        self._ids.add(frame.frame_id)
        self.frames.append(
            KeptFrame(name, frame.frame_id, frame.entry_id, frame.ts, frame.source, frame.reviewer)
        )
        return True

    def split(self, holdout: float, seed: int) -> tuple[int, int]:
        """Mark a seeded random ``holdout`` fraction (rounded) as held out; return (train, holdout) counts."""
        n_hold = round(len(self.frames) * holdout)
        order = list(range(len(self.frames)))
        random.Random(seed).shuffle(order)
        held = set(order[:n_hold])
        for i, frame in enumerate(self.frames):
            frame.split = "holdout" if i in held else "train"
        return len(self.frames) - n_hold, n_hold

    def files(self, split: str) -> list[Path]:
        """Return the image files of ``split`` in collection order."""
        return [self.folder / f.file for f in self.frames if f.split == split]

    def write_manifest(self, provenance: dict[str, Any]) -> Path:
        """Write ``manifest.json``: ``provenance`` plus one entry per frame; return its path."""
        body = {"format": MANIFEST_FORMAT, **provenance, "frames": [asdict(f) for f in self.frames]}
        path = self.folder / MANIFEST
        write_atomic(path, (json.dumps(body, indent=1) + "\n").encode())
        return path


def image_batches(
    paths: Sequence[Path], batch_size: int, image_size: tuple[int, int]
) -> Iterator[torch.Tensor]:
    """Yield normalised ``(n, 3, H, W)`` batches of the images at ``paths`` (one batch in memory)."""
    frames: list[np.ndarray] = []
    for path in paths:
        frames.append(read_image(path))
        if len(frames) == batch_size:
            yield preprocess(frames, image_size)
            frames = []
    if frames:
        yield preprocess(frames, image_size)

"""A folder of images as a camera: files sorted by name, paced by the reader, optionally looped."""

import logging
from pathlib import Path
from typing import Any

import cv2

from dfm_stream.errors import SourceError
from dfm_stream.sources.base import Frame, Source, SourceFinished, now_ns

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
DEFAULT_FOLDER_FPS = 5.0
"""Pacing of a folder source when the camera sets no fps."""


class FolderSource(Source):
    """Images of one folder (not recursive), in sorted file-name order."""

    kind = "folder"
    is_live = False

    def __init__(self, path: Path, loop: bool = False, fps: float = 0.0) -> None:
        self.path = Path(path)
        self.loop = loop
        self.finite = not loop
        self._fps = fps if fps > 0 else DEFAULT_FOLDER_FPS
        self._files: list[Path] = []
        self._next = 0

    @property
    def fps(self) -> float:
        """Return the pacing rate (the camera's fps, default 5)."""
        return self._fps

    def open(self) -> None:
        """List the images; raise :class:`SourceError` when the folder has none."""
        if not self.path.is_dir():
            raise SourceError(f"image folder {self.path} does not exist")
        self._files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._files:
            raise SourceError(
                f"image folder {self.path} has no images (looked for {', '.join(IMAGE_SUFFIXES)})"
            )
        self._next = 0

    def read(self) -> Frame:
        """Return the next readable image; unreadable files are skipped with a warning."""
        for _ in range(len(self._files) + 1):
            if self._next >= len(self._files):
                if not self.loop:
                    raise SourceFinished(f"image folder {self.path}: last image delivered")
                self._next = 0
            path = self._files[self._next]
            self._next += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                return Frame(image, now_ns(), {"file": path.name})
            log.warning("image folder %s: skipping unreadable image %s", self.path, path.name)
        raise SourceError(f"image folder {self.path}: none of its images can be read")

    def close(self) -> None:
        """Forget the listing."""
        self._files = []

    def describe(self) -> dict[str, Any]:
        """Return kind, folder and loop flag."""
        return {**super().describe(), "path": str(self.path), "loop": self.loop}

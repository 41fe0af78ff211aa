"""The camera source interface, and the factory that turns a source string into a source.

A source string is one of::

    0, 1, ...                       a USB / V4L camera by index
    rtsp://..., rtmp://..., http(s)://...   a network stream (OpenCV's FFMPEG backend)
    /path/to/video.mp4              a video file (paced in real time, optionally looped)
    /path/to/folder/                a folder of images (sorted by name, paced, optionally looped)
    synthetic:                      generated parts on a conveyor belt
    synthetic:seed=3,defect_rate=0.1,fps=10,size=256x256

Every source has the same life cycle: ``open()``, then ``read()`` until it raises
:class:`SourceFinished` (a finite source has no more frames) or :class:`SourceError` (the camera
failed: the reader reconnects), then ``close()``. ``read()`` may block until the camera delivers;
the reader calls it from a helper thread with a watchdog (:mod:`dfm_stream.sources.capture`).
"""

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from dfm_stream.errors import DfmStreamError

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
"""URL schemes handed to OpenCV's FFMPEG backend as network streams."""

DEFAULT_OPEN_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 5.0


class SourceFinished(DfmStreamError):  # noqa: N818 - a condition, not a failure
    """A finite source (video file, image folder) has delivered its last frame."""


class Frame(NamedTuple):
    """One captured frame: a BGR uint8 image, its capture time (Unix ns) and extra message keys."""

    image: np.ndarray
    ts: int
    extra: dict[str, Any] | None = None


class Source(ABC):
    """A camera: ``open()``, ``read()`` frames, ``close()``.

    Attributes:
        kind: ``usb``, ``network``, ``file``, ``folder`` or ``synthetic``.
        is_live: frames arrive at the device's own pace (the reader decimates to the fps cap);
            when False the reader paces the source itself (files, folders, synthetic).
        finite: the source ends (raises :class:`SourceFinished`) unless looped.
    """

    kind: str = "source"
    is_live: bool = False
    finite: bool = False

    @property
    def fps(self) -> float:
        """Return the source's native frame rate (0 when unknown)."""
        return 0.0

    @abstractmethod
    def open(self) -> None:
        """Open the camera; raise :class:`SourceError` saying why when it cannot be opened."""

    @abstractmethod
    def read(self) -> Frame:
        """Return the next frame; raise :class:`SourceFinished` or :class:`SourceError`."""

    @abstractmethod
    def close(self) -> None:
        """Release the camera (idempotent)."""

    def describe(self) -> dict[str, Any]:
        """Return a JSON-friendly description, safe to log and store (never a password)."""
        return {"kind": self.kind, "live": self.is_live}

    def __enter__(self) -> "Source":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class SourceOptions:
    """How to open a source (what the camera's config says beyond the source string)."""

    loop: bool = False
    fps: float = 0.0
    open_timeout: float = DEFAULT_OPEN_TIMEOUT_S
    read_timeout: float = DEFAULT_READ_TIMEOUT_S


def now_ns() -> int:
    """Return the current Unix time in nanoseconds (the ``ts`` of a frame captured now)."""
    return time.time_ns()


def valid_fps(value: float, default: float) -> float:
    """Return ``value`` when it is a usable frame rate (finite, > 0), else ``default``."""
    return value if math.isfinite(value) and 0 < value < 1000 else default

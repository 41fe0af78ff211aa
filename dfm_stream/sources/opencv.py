"""Sources read through OpenCV's ``VideoCapture``: USB/V4L cameras, network streams, video files.

Network streams use the FFMPEG backend with ``CAP_PROP_OPEN_TIMEOUT_MSEC`` and
``CAP_PROP_READ_TIMEOUT_MSEC``, so a dead or frozen stream fails instead of blocking; the reader
adds its own watchdog on top (:mod:`dfm_stream.sources.capture`). RTSP is read over TCP unless
``OPENCV_FFMPEG_CAPTURE_OPTIONS`` says otherwise (TCP gets through NAT and firewalls, and does not
smear frames on packet loss).
"""

import logging
import os
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dfm_stream.errors import SourceError
from dfm_stream.redact import safe_url
from dfm_stream.sources.base import Frame, Source, SourceFinished, now_ns, valid_fps

log = logging.getLogger(__name__)

DEFAULT_FILE_FPS = 25.0
"""Pacing of a video file whose header carries no frame rate."""

_ENV_LOCK = threading.Lock()


class OpenCvSource(Source):
    """A source backed by one ``cv2.VideoCapture``; subclasses say how to open it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cap: cv2.VideoCapture | None = None
        self._fps = 0.0

    @property
    def fps(self) -> float:
        """Return the frame rate the device or file reports (0 when unknown)."""
        return self._fps

    def _capture(self) -> cv2.VideoCapture:
        raise NotImplementedError

    def open(self) -> None:
        """Open the capture; raise :class:`SourceError` when OpenCV cannot."""
        self.close()
        try:
            cap = self._capture()
        except cv2.error as e:
            raise SourceError(f"cannot open {self.name}: {e}") from e
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.name} (unreachable, wrong address, or unsupported format)")
        self._cap = cap
        self._fps = valid_fps(float(cap.get(cv2.CAP_PROP_FPS) or 0.0), 0.0)

    def _grab(self) -> np.ndarray | None:
        if self._cap is None:
            raise SourceError(f"{self.name} is not open")
        try:
            ok, image = self._cap.read()
        except cv2.error as e:
            raise SourceError(f"{self.name}: read failed: {e}") from e
        if not ok or image is None:
            return None
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        return image

    def read(self) -> Frame:
        """Return the next frame; raise :class:`SourceError` when the stream stops delivering."""
        image = self._grab()
        if image is None:
            raise SourceError(f"{self.name}: no frame (stream ended, timed out, or the camera is gone)")
        return Frame(image, now_ns())

    def close(self) -> None:
        """Release the capture."""
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()


class UsbSource(OpenCvSource):
    """A local USB / V4L2 camera by index."""

    kind = "usb"
    is_live = True

    def __init__(self, index: int, open_timeout: float = 10.0, read_timeout: float = 5.0) -> None:
        super().__init__(f"camera index {index}")
        self.index = index
        self.open_timeout = open_timeout
        self.read_timeout = read_timeout

    def _capture(self) -> cv2.VideoCapture:
        backend = cv2.CAP_V4L2 if os.name == "posix" and Path("/dev").exists() else cv2.CAP_ANY
        cap = cv2.VideoCapture(self.index, backend)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not one from seconds ago
        return cap

    def describe(self) -> dict[str, Any]:
        """Return kind and index."""
        return {**super().describe(), "index": self.index}


class NetworkSource(OpenCvSource):
    """An RTSP / RTMP / HTTP(S) stream read with FFMPEG, with open and read timeouts."""

    kind = "network"
    is_live = True

    def __init__(self, url: str, open_timeout: float = 10.0, read_timeout: float = 5.0) -> None:
        super().__init__(f"stream {safe_url(url)}")
        self.url = url
        self.open_timeout = open_timeout
        self.read_timeout = read_timeout

    def _capture(self) -> cv2.VideoCapture:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            max(1, int(self.open_timeout * 1000)),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            max(1, int(self.read_timeout * 1000)),
        ]
        if self.url.lower().startswith("rtsp"):
            with _ENV_LOCK:  # OpenCV reads this variable at open time
                os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
        return cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, params)

    def describe(self) -> dict[str, Any]:
        """Return kind and the URL without its password."""
        return {**super().describe(), "url": safe_url(self.url)}


class VideoFileSource(OpenCvSource):
    """A video file, read from start to end (or looped); the reader paces it in real time."""

    kind = "file"
    is_live = False

    def __init__(self, path: Path, loop: bool = False) -> None:
        super().__init__(f"video file {path}")
        self.path = Path(path)
        self.loop = loop
        self.finite = not loop

    @property
    def fps(self) -> float:
        """Return the file's frame rate, or 25 when its header has none."""
        return self._fps or DEFAULT_FILE_FPS

    def _capture(self) -> cv2.VideoCapture:
        if not self.path.is_file():
            raise SourceError(f"video file {self.path} does not exist")
        return cv2.VideoCapture(str(self.path))

    def read(self) -> Frame:
        """Return the next frame; rewind at the end when looping, else raise SourceFinished."""
        image = self._grab()
        if image is None and self.loop and self._cap is not None:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            image = self._grab()
            if image is None:  # some containers cannot seek: open again
                self.open()
                image = self._grab()
        if image is None:
            if self.loop:
                raise SourceError(f"{self.name}: no frame after rewinding (empty or unreadable file)")
            raise SourceFinished(f"{self.name}: end of file")
        return Frame(image, now_ns())

    def describe(self) -> dict[str, Any]:
        """Return kind, file name and loop flag."""
        return {**super().describe(), "path": str(self.path), "loop": self.loop}

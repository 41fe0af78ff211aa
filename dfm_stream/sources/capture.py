"""Runs a source in its own thread, so that no camera call can block the reader forever.

OpenCV calls may block (a USB camera unplugged mid-read, a stream that stops sending without
closing the connection). :class:`Capture` does every call that touches the device (``open``,
``read``, ``close``) in a helper thread and hands frames over through a small queue; the camera
loop waits on that queue with a deadline. A read that does not return in time marks the camera
down; the helper thread is abandoned (a daemon) and releases its device when the call finally
returns.

Live sources (USB, network) are read as fast as they deliver; when the camera loop falls behind,
the oldest queued frame is dropped (``on_overrun``) so the loop always gets a fresh frame. Paced
sources (files, folders, synthetic) block instead: the loop pulls frames at its own rate.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable

from dfm_stream.errors import SourceError
from dfm_stream.sources.base import Frame, Source, SourceFinished

log = logging.getLogger(__name__)

POLL_S = 0.05
"""How often waits check the stop event (bounds shutdown latency)."""


class CaptureTimeoutError(SourceError):
    """The camera did not open, or did not deliver a frame, within its timeout."""


class Capture:
    """One source, opened and read in a daemon thread; see the module docstring."""

    def __init__(self, source: Source, name: str, on_overrun: Callable[[], None] | None = None) -> None:
        self.source = source
        self.name = name
        self._on_overrun = on_overrun
        self._queue: queue.Queue[Frame | BaseException] = queue.Queue(maxsize=2 if source.is_live else 1)
        self._opened = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"capture-{name}", daemon=True)

    def start(self) -> "Capture":
        """Start opening the source in the helper thread."""
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            try:
                self.source.open()
            except Exception as e:  # any failure to open is a camera fault, reported to the loop
                self._error = e
                return
            finally:
                self._opened.set()
            while not self._stop.is_set():
                try:
                    item: Frame | BaseException = self.source.read()
                except Exception as e:  # handed to the camera loop, which logs and counts it
                    self._put(e)
                    return
                self._put(item)
        finally:
            try:
                self.source.close()
            except Exception:  # releasing a broken device must not kill the thread noisily
                log.warning("%s: error while releasing the source", self.name, exc_info=True)

    def _put(self, item: Frame | BaseException) -> None:
        if self.source.is_live and isinstance(item, Frame):
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    if self._on_overrun is not None:
                        self._on_overrun()
                except queue.Empty:
                    pass
                self._queue.put_nowait(item)
            return
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def wait_open(self, timeout: float, stop: threading.Event) -> bool:
        """Wait until the source is open; False if ``stop`` was set; raise SourceError on failure."""
        deadline = time.monotonic() + timeout
        while not self._opened.wait(POLL_S):
            if stop.is_set():
                return False
            if time.monotonic() > deadline:
                raise CaptureTimeoutError(f"{self.name}: did not open within {timeout:g} s")
        if self._error is not None:
            if isinstance(self._error, SourceError):
                raise self._error
            raise SourceError(f"{self.name}: cannot open: {self._error}") from self._error
        return True

    def get(self, timeout: float, stop: threading.Event) -> Frame | None:
        """Return the next frame, None if ``stop`` was set; raise on end, error or timeout."""
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            try:
                item = self._queue.get(timeout=min(POLL_S, max(0.001, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise CaptureTimeoutError(
                        f"{self.name}: no frame within {timeout:g} s (frozen?)"
                    ) from None
                continue
            if isinstance(item, Frame):
                return item
            if isinstance(item, SourceError | SourceFinished):
                raise item
            raise SourceError(f"{self.name}: read failed: {item}") from item
        return None

    def close(self, join_timeout: float = 0.5) -> None:
        """Ask the helper thread to stop and wait a little; a thread stuck in a read is abandoned."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(join_timeout)
            if self._thread.is_alive():
                log.warning("%s: capture thread is stuck in a camera call; abandoning it", self.name)

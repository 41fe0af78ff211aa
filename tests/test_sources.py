"""Camera sources: the source-string parser, video files, image folders, the synthetic conveyor,
and the capture watchdog that keeps a frozen camera from blocking the reader."""

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from dfm_stream.errors import SourceError
from dfm_stream.sources import Frame, Source, SourceFinished, make_source, open_source, safe_url, source_kind
from dfm_stream.sources.base import SourceOptions
from dfm_stream.sources.capture import Capture, CaptureTimeoutError
from dfm_stream.sources.synthetic import SyntheticSource


def write_video(
    path: Path, n: int = 10, size: tuple[int, int] = (64, 48), fps: float = 25.0
) -> list[np.ndarray]:
    """Write an MJPG .avi of ``n`` distinct frames; return the frames as decoded back from the file."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for i in range(n):
        img = np.zeros((h, w, 3), np.uint8)
        img[:, :, 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
        img[:, :, 1] = (i * 20) % 256
        cv2.rectangle(img, (i * 3 % w, 5), (i * 3 % w + 10, 20), (255, 255, 255), -1)
        writer.write(img)
    writer.release()
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    assert len(frames) == n
    return frames


def test_source_strings_name_their_kind(tmp_path: Path) -> None:
    video = tmp_path / "a.avi"
    video.write_bytes(b"x")
    assert source_kind("0") == "usb"
    assert source_kind("rtsp://user:pw@cam:554/s") == "network"
    assert source_kind("https://cam/stream.ts") == "network"
    assert source_kind("synthetic:") == "synthetic"
    assert source_kind("synthetic:seed=3") == "synthetic"
    assert source_kind(str(tmp_path)) == "folder"
    assert source_kind(str(video)) == "file"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "empty camera source"),
        ("/no/such/video.mp4", "no such file or folder"),
        ("ftp://host/x", "unsupported source URL scheme 'ftp'"),
        ("synthetic:speed=3", "bad parameter 'speed=3'"),
        ("synthetic:size=12", "must be WxH"),
        ("synthetic:defect_rate=2", "within [0, 1]"),
        ("synthetic:seed=x", "not a number"),
    ],
)
def test_bad_source_strings_are_clear_errors(spec: str, needle: str) -> None:
    with pytest.raises(SourceError) as e:
        make_source(spec)
    assert needle in str(e.value)


def test_urls_never_show_their_password() -> None:
    assert safe_url("rtsp://admin:s3cret@10.0.0.5:554/live") == "rtsp://admin:***@10.0.0.5:554/live"
    src = make_source("rtsp://admin:s3cret@10.0.0.5:554/live")
    assert "s3cret" not in str(src.describe())
    assert src.is_live


def test_video_file_delivers_every_frame_then_finishes(tmp_path: Path) -> None:
    frames = write_video(tmp_path / "v.avi", n=6)
    src = open_source(str(tmp_path / "v.avi"))
    assert src.fps == pytest.approx(25.0)
    got = [src.read().image for _ in range(6)]
    with pytest.raises(SourceFinished):
        src.read()
    src.close()
    for a, b in zip(got, frames, strict=True):
        np.testing.assert_array_equal(a, b)


def test_looped_video_file_rewinds(tmp_path: Path) -> None:
    frames = write_video(tmp_path / "v.avi", n=4)
    with make_source(str(tmp_path / "v.avi"), SourceOptions(loop=True)) as src:
        got = [src.read().image for _ in range(10)]
    for i, img in enumerate(got):
        np.testing.assert_array_equal(img, frames[i % 4])


def test_folder_reads_images_in_name_order_and_loops(tmp_path: Path) -> None:
    for name, value in (("b.png", 20), ("a.png", 10), ("c.jpg", 30)):
        cv2.imwrite(str(tmp_path / name), np.full((8, 8, 3), value, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    src = open_source(str(tmp_path))
    values = [int(src.read().image[0, 0, 0]) for _ in range(3)]
    assert values[:2] == [10, 20] and abs(values[2] - 30) <= 2  # broken.png skipped
    with pytest.raises(SourceFinished):
        src.read()
    looped = open_source(str(tmp_path), SourceOptions(loop=True, fps=2))
    assert looped.fps == 2
    assert [looped.read().extra["file"] for _ in range(4)] == ["a.png", "b.png", "c.jpg", "a.png"]


def test_empty_folder_cannot_open(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="has no images"):
        open_source(str(tmp_path))


def test_synthetic_conveyor_is_reproducible_and_marks_defects() -> None:
    a = SyntheticSource.from_spec("synthetic:seed=5,defect_rate=0.5,size=96x64,cycle=4")
    b = SyntheticSource.from_spec("synthetic:seed=5,defect_rate=0.5,size=96x64,cycle=4")
    a.open()
    b.open()
    fa = [a.read() for _ in range(40)]
    fb = [b.read() for _ in range(40)]
    for x, y in zip(fa, fb, strict=True):
        np.testing.assert_array_equal(x.image, y.image)
    assert fa[0].image.shape == (64, 96, 3)
    flags = [f.extra["defect"] for f in fa]
    assert flags == [a.defect_at(i) is not None for i in range(40)]
    assert 0 < sum(flags) < 40  # some parts good, some defective
    assert [f.extra["part"] for f in fa[:8]] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert not np.array_equal(fa[0].image, fa[1].image)  # the part moves


@pytest.mark.parametrize(("rate", "expected"), [(0, 0), (1, 24)])
def test_synthetic_defect_rate_bounds(rate: float, expected: int) -> None:
    src = SyntheticSource.from_spec(f"synthetic:defect_rate={rate},size=32x32,cycle=3")
    src.open()
    assert sum(src.read().extra["defect"] for _ in range(24)) == expected


class _FrozenSource(Source):
    """A live camera that delivers two frames, then hangs in read() until released."""

    kind = "test"
    is_live = True

    def __init__(self) -> None:
        self.release = threading.Event()
        self.closed = threading.Event()
        self.count = 0

    def open(self) -> None:
        pass

    def read(self) -> Frame:
        self.count += 1
        if self.count > 2:
            self.release.wait(30)
            raise SourceError("released")
        return Frame(np.zeros((4, 4, 3), np.uint8), time.time_ns())

    def close(self) -> None:
        self.closed.set()


def test_capture_watchdog_reports_a_frozen_camera_instead_of_blocking() -> None:
    src = _FrozenSource()
    stop = threading.Event()
    cap = Capture(src, "frozen").start()
    assert cap.wait_open(1.0, stop)
    assert cap.get(1.0, stop) is not None
    assert cap.get(1.0, stop) is not None
    t0 = time.monotonic()
    with pytest.raises(CaptureTimeoutError, match=r"no frame within 0\.3 s"):
        cap.get(0.3, stop)
    assert time.monotonic() - t0 < 5
    cap.close(join_timeout=0.1)
    src.release.set()  # the stuck read returns: the abandoned thread releases the camera itself
    assert src.closed.wait(5)


def test_capture_get_returns_none_when_stopped() -> None:
    src = _FrozenSource()
    src.count = 2
    stop = threading.Event()
    cap = Capture(src, "frozen").start()
    assert cap.wait_open(1.0, stop)
    threading.Timer(0.1, stop.set).start()
    assert cap.get(30.0, stop) is None
    src.release.set()
    cap.close()

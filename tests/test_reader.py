"""The reader loop, in-process against a real redis-server: frames in order, bounded streams,
faulty cameras isolated, Redis outages survived."""

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
from support import wait_until
from test_sources import write_video

from dfm_stream.config import CameraConfig
from dfm_stream.embedded_redis import EmbeddedRedis, free_port
from dfm_stream.errors import WireError
from dfm_stream.frame_codec import decode_frame
from dfm_stream.keys import alarms_key, cameras_key, frames_key
from dfm_stream.metrics import ReaderMetrics, new_registry
from dfm_stream.reader import Decimator, Reader, transform
from dfm_stream.sources import Frame, Source, SourceOptions
from dfm_stream.wire import EventMsg, FrameMsg


def _frames(client: redis.Redis, camera: str) -> list[FrameMsg]:
    return [FrameMsg.from_bytes(fields[b"msg"]) for _, fields in client.xrange(frames_key(camera))]


def _events(client: redis.Redis) -> list[EventMsg]:
    return [EventMsg.from_bytes(fields[b"msg"]) for _, fields in client.xrange(alarms_key())]


def _sample(registry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _reader(client: redis.Redis, *cams: CameraConfig, **kwargs) -> tuple[Reader, object]:
    registry = new_registry(process_metrics=False)
    return Reader(list(cams), client, metrics=ReaderMetrics.create(registry), **kwargs), registry


def test_video_file_frames_arrive_in_order_with_seq_ts_size_and_pixels(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    source_frames = write_video(tmp_path / "clip.avi", n=12, size=(64, 48))
    cam = CameraConfig(id="clip", source=str(tmp_path / "clip.avi"))
    reader, registry = _reader(redis_client, cam)
    t0 = time.time_ns()
    assert reader.run() == 0  # a finite file: the reader ends by itself
    t1 = time.time_ns()
    msgs = _frames(redis_client, "clip")
    assert [m.seq for m in msgs] == list(range(12))
    assert len({m.session for m in msgs}) == 1 and len(msgs[0].session) == 32
    ts = [m.ts for m in msgs]
    assert ts == sorted(ts) and t0 <= ts[0] and ts[-1] <= t1
    # paced in real time at the file's 25 fps: 12 frames span about 11/25 s
    assert (ts[-1] - ts[0]) / 1e9 > 0.3
    for msg, src in zip(msgs, source_frames, strict=True):
        assert (msg.w, msg.h, msg.c, msg.enc) == (64, 48, 3, "jpeg")
        rgb = decode_frame(msg)
        err = np.abs(rgb[:, :, ::-1].astype(int) - src.astype(int))
        assert err.mean() < 3.0, "JPEG at quality 90 stays within JPEG error of the source frame"
    assert _sample(registry, "dfm_reader_frames_published_total", camera="clip") == 12
    state = redis_client.hget(cameras_key(), "clip")
    assert b'"state": "finished"' in state and b'"kind": "file"' in state


def test_roi_resize_and_raw_encoding_are_applied(tmp_path: Path, redis_client: redis.Redis) -> None:
    source_frames = write_video(tmp_path / "clip.avi", n=3, size=(64, 48))
    cam = CameraConfig(
        id="crop",
        source=str(tmp_path / "clip.avi"),
        roi=(8, 4, 40, 30),
        size=(20, 15),
        encoding="raw",
        pace=False,
    )
    reader, _ = _reader(redis_client, cam)
    reader.run()
    msgs = _frames(redis_client, "crop")
    assert len(msgs) == 3
    expected = cv2.resize(source_frames[0][4:34, 8:48], (20, 15), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(decode_frame(msgs[0])[:, :, ::-1], expected)
    assert transform(np.zeros((10, 10, 3), np.uint8), (2, 2, 8, 8), None).shape == (8, 8, 3)
    with pytest.raises(WireError, match="does not fit the 10x10 frame"):  # never clipped silently (#15)
        transform(np.zeros((10, 10, 3), np.uint8), (2, 2, 100, 100), None)


def test_maxlen_bounds_the_stream_under_a_fast_producer(redis_client: redis.Redis) -> None:
    cam = CameraConfig(
        id="fast", source="synthetic:size=32x32,cycle=2", pace=False, maxlen=50, encoding="raw"
    )
    reader, registry = _reader(redis_client, cam, max_frames=1500)
    reader.run()
    assert _sample(registry, "dfm_reader_frames_published_total", camera="fast") == 1500
    length = redis_client.xlen(frames_key("fast"))
    assert 50 <= length < 300, f"MAXLEN ~ 50 must keep the stream near 50 entries, got {length}"
    assert _frames(redis_client, "fast")[-1].seq == 1499


class _LiveCamera(Source):
    """A live camera delivering frames at ``rate`` per second (stands in for a USB camera)."""

    kind = "usb"
    is_live = True

    def __init__(self, rate: float) -> None:
        self.rate = rate

    @property
    def fps(self) -> float:
        return self.rate

    def open(self) -> None:
        self.next = time.monotonic()

    def read(self) -> Frame:
        self.next += 1 / self.rate
        time.sleep(max(0.0, self.next - time.monotonic()))
        return Frame(np.full((24, 32, 3), 128, np.uint8), time.time_ns())

    def close(self) -> None:
        pass


def test_fps_cap_decimates_a_live_camera_and_counts_it(redis_client: redis.Redis) -> None:
    cam = CameraConfig(id="usb", source="0", fps=10)
    reader, registry = _reader(redis_client, cam, max_frames=8, factory=lambda spec, opts: _LiveCamera(50))
    reader.run()
    decimated = _sample(registry, "dfm_reader_frames_dropped_total", camera="usb", reason="decimated")
    captured = _sample(registry, "dfm_reader_frames_captured_total", camera="usb")
    assert redis_client.xlen(frames_key("usb")) == 8
    assert decimated >= 20, f"50 fps capped to 10 fps drops ~4 of 5 frames (captured {captured})"
    ts = [m.ts for m in _frames(redis_client, "usb")]
    gaps = np.diff(ts) / 1e9
    assert gaps.min() > 0.07, f"published frames are ~0.1 s apart, got {gaps}"


def test_decimator_keeps_the_requested_rate() -> None:
    d = Decimator(10)
    kept = sum(d.keep(int(i * 1e9 / 30)) for i in range(300))  # 10 s at 30 fps
    assert 95 <= kept <= 101
    assert all(Decimator(0).keep(i) for i in range(5))


def test_a_dead_camera_does_not_stop_a_good_one(redis_client: redis.Redis) -> None:
    bad = CameraConfig(
        id="bad",
        source=f"http://127.0.0.1:{free_port()}/none.ts",
        backoff_initial=0.1,
        backoff_max=0.3,
        open_timeout=2.0,
    )
    good = CameraConfig(id="good", source="synthetic:size=32x32", fps=50)
    reader, registry = _reader(redis_client, bad, good)
    reader.start()
    try:
        wait_until(lambda: redis_client.xlen(frames_key("good")) >= 20, 20, what="frames of the good camera")
        wait_until(
            lambda: any(e.type == "camera_down" and e.camera == "bad" for e in _events(redis_client)),
            10,
            what="camera_down of the bad camera",
        )
        wait_until(
            lambda: _sample(registry, "dfm_reader_reconnects_total", camera="bad") >= 2, 10, what="reconnects"
        )
        ok, detail = reader.ready()
        assert not ok and "bad" in detail and "good" not in detail
        down = next(e for e in _events(redis_client) if e.type == "camera_down")
        assert down.reason == "open_failed" and down.message
        assert _sample(registry, "dfm_camera_up", camera="good") == 1
        assert _sample(registry, "dfm_camera_up", camera="bad") == 0
    finally:
        reader.close()
    assert not redis_client.xlen(frames_key("bad"))


def test_reader_survives_redis_restart_and_counts_dropped_frames(aof_redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(aof_redis_server.url, socket_timeout=2, socket_connect_timeout=2)
    cam = CameraConfig(id="cam", source="synthetic:size=32x32", fps=40, backoff_initial=0.05, backoff_max=0.3)
    reader, registry = _reader(client, cam)
    reader.start()
    try:
        wait_until(lambda: client.xlen(frames_key("cam")) >= 10, 20, what="first frames")
        aof_redis_server.stop(kill=True)
        dropped = lambda: _sample(  # noqa: E731
            registry, "dfm_reader_frames_dropped_total", camera="cam", reason="redis_unavailable"
        )
        wait_until(lambda: dropped() >= 10, 20, what="frames dropped while Redis is down")
        assert reader.loops["cam"].state == "up", "the camera stays open while Redis is down"
        assert not reader.ready()[0]
        aof_redis_server.start()
        before = _sample(registry, "dfm_reader_frames_published_total", camera="cam")
        wait_until(
            lambda: _sample(registry, "dfm_reader_frames_published_total", camera="cam") >= before + 10,
            20,
            what="publishing resumed after the restart",
        )
        wait_until(lambda: reader.ready()[0], 10, what="ready again")
    finally:
        reader.close()
    msgs = _frames(client, "cam")
    seqs = [m.seq for m in msgs]
    assert seqs == sorted(seqs) and len(set(m.session for m in msgs)) == 1
    published = _sample(registry, "dfm_reader_frames_published_total", camera="cam")
    # every seq handed out was either published or dropped with a reason
    assert reader.loops["cam"].seq == published + dropped()
    assert len(seqs) == published
    assert seqs[-1] - seqs[0] + 1 > len(seqs), "the outage shows as a gap in seq"
    client.close()


def test_stop_event_ends_an_endless_camera_promptly(redis_client: redis.Redis) -> None:
    cam = CameraConfig(id="s", source="synthetic:size=32x32", fps=20)
    stop = threading.Event()
    reader, _ = _reader(redis_client, cam, stop=stop)
    reader.start()
    wait_until(lambda: redis_client.xlen(frames_key("s")) >= 2, 20, what="frames")
    stop.set()
    t0 = time.monotonic()
    reader.close(timeout=5)
    assert time.monotonic() - t0 < 2
    assert not any(t.is_alive() for t in reader._threads)
    assert b'"state": "stopped"' in redis_client.hget(cameras_key(), "s")


def test_source_options_reach_the_factory(redis_client: redis.Redis) -> None:
    seen: list[SourceOptions] = []

    def factory(spec: str, opts: SourceOptions) -> Source:
        seen.append(opts)
        return _LiveCamera(100)

    cam = CameraConfig(id="o", source="0", loop=True, open_timeout=3, read_timeout=2)
    reader, _ = _reader(redis_client, cam, max_frames=2, factory=factory)
    reader.run()
    assert seen[0] == SourceOptions(loop=True, fps=0.0, open_timeout=3.0, read_timeout=2.0)

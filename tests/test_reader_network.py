"""A real network stream on loopback: ffmpeg serves HTTP MPEG-TS; the reader ingests it, survives
the server being killed and restarted, and reports camera_down then camera_up.

ffmpeg alone cannot act as an RTSP server (its RTSP muxer pushes to one, and ``-rtsp_flags
listen`` is for receiving), and Debian's RTSP servers need extra packages, so the test uses
ffmpeg's built-in HTTP server (one client per ffmpeg process). The reader's code path is the
same for rtsp:// and http:// (OpenCV's FFMPEG backend with open/read timeouts).
"""

import subprocess
from pathlib import Path

import redis
from conftest import Processes, wait_until
from tools import require_tool

from dfm_stream.config import CameraConfig
from dfm_stream.embedded_redis import free_port
from dfm_stream.keys import alarms_key, frames_key
from dfm_stream.metrics import ReaderMetrics, new_registry
from dfm_stream.reader import Reader
from dfm_stream.wire import EventMsg, FrameMsg


def _serve(procs: Processes, ffmpeg: str, port: int, name: str) -> subprocess.Popen[bytes]:
    cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi"]
    cmd += [
        "-i",
        "testsrc=size=160x120:rate=25",
        "-f",
        "mpegts",
        "-listen",
        "1",
        f"http://127.0.0.1:{port}/cam.ts",
    ]
    return procs.start(cmd, name=name)


def _events(client: redis.Redis) -> list[EventMsg]:
    return [EventMsg.from_bytes(f[b"msg"]) for _, f in client.xrange(alarms_key())]


def test_network_stream_reconnects_after_the_server_restarts(
    procs: Processes, redis_client: redis.Redis, tmp_path: Path
) -> None:
    ffmpeg = require_tool("ffmpeg")
    port = free_port()
    server = _serve(procs, ffmpeg, port, "ffmpeg-1")
    cam = CameraConfig(
        id="net",
        source=f"http://127.0.0.1:{port}/cam.ts",
        size=(80, 60),
        read_timeout=2.0,
        open_timeout=5.0,
        backoff_initial=0.1,
        backoff_max=0.5,
    )
    registry = new_registry(process_metrics=False)
    reader = Reader([cam], redis_client, metrics=ReaderMetrics.create(registry))
    reader.start()
    try:
        wait_until(lambda: redis_client.xlen(frames_key("net")) >= 10, 30, what="frames from the stream")
        first = FrameMsg.from_bytes(redis_client.xrange(frames_key("net"), count=1)[0][1][b"msg"])
        assert (first.w, first.h) == (80, 60)
        # the reader may have tried before ffmpeg listened (camera_down, then camera_up): start from here
        start = _events(redis_client)
        assert start[-1].type == "camera_up"
        n0 = len(start)

        server.kill()
        server.wait(5)
        wait_until(
            lambda: [e.type for e in _events(redis_client)[n0:]] == ["camera_down"],
            20,
            what="camera_down after the stream server died",
        )
        assert registry.get_sample_value("dfm_camera_up", {"camera": "net"}) == 0
        before = redis_client.xlen(frames_key("net"))

        _serve(procs, ffmpeg, port, "ffmpeg-2")
        wait_until(
            lambda: [e.type for e in _events(redis_client)[n0:]] == ["camera_down", "camera_up"],
            30,
            what="camera_up after the stream server came back",
        )
        wait_until(
            lambda: redis_client.xlen(frames_key("net")) >= before + 10, 30, what="frames after reconnect"
        )
        up = _events(redis_client)[-1]
        assert up.since_ts is not None and up.since_ts <= up.ts
        assert registry.get_sample_value("dfm_camera_up", {"camera": "net"}) == 1
        assert registry.get_sample_value("dfm_reader_reconnects_total", {"camera": "net"}) >= 1
    finally:
        reader.close()
    seqs = [FrameMsg.from_bytes(f[b"msg"]).seq for _, f in redis_client.xrange(frames_key("net"))]
    assert seqs == list(range(len(seqs))), "seq keeps counting across the reconnect"

"""A real RTSP camera on loopback: the reader ingests it, survives the server (and its publisher)
being killed and restarted, and reports camera_down then camera_up.

The RTSP server is GStreamer's gst-rtsp-server (Debian: python3-gi, gir1.2-gst-rtsp-server-1.0),
driven by ``tests/gst_rtsp_server.py`` under the system Python; ffmpeg encodes a test pattern
to H.264 and publishes it to the server in RTP, as the camera would. The reader is left to its
default RTSP transport, and the server's log shows the reader asked for TCP.
"""

import os
import subprocess

import pytest
import redis
from conftest import REPO, Processes, wait_until
from tools import require_tool

from dfm_stream.config import CameraConfig
from dfm_stream.embedded_redis import free_port
from dfm_stream.keys import alarms_key, frames_key
from dfm_stream.metrics import ReaderMetrics, new_registry
from dfm_stream.reader import Reader
from dfm_stream.wire import EventMsg, FrameMsg

SYSTEM_PYTHON = "/usr/bin/python3"
"""Debian's Python, where python3-gi and the gst-rtsp-server typelib are installed."""

SERVER_SCRIPT = REPO / "tests" / "gst_rtsp_server.py"
CAPTURE_OPTIONS = "OPENCV_FFMPEG_CAPTURE_OPTIONS"


def _require_gst_rtsp_server() -> str:
    """Return the system Python if it can run gst-rtsp-server; skip (fail under CI) otherwise."""
    python = require_tool(SYSTEM_PYTHON)
    probe = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    if subprocess.run([python, "-c", probe], capture_output=True, check=False).returncode == 0:
        return python
    message = "gst-rtsp-server is not installed (apt-get install python3-gi gir1.2-gst-rtsp-server-1.0)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
    raise AssertionError("unreachable")


@pytest.fixture
def default_capture_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run without OPENCV_FFMPEG_CAPTURE_OPTIONS, and restore the variable after (the source sets it)."""
    monkeypatch.setenv(CAPTURE_OPTIONS, "")  # records the original value (or its absence) for the undo
    monkeypatch.delenv(CAPTURE_OPTIONS)


def _start_camera(
    procs: Processes, python: str, ffmpeg: str, ports: tuple[int, int], name: str
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """Start the RTSP server and, once it listens, ffmpeg publishing H.264 to it; return both."""
    rtsp_port, rtp_port = ports
    server = procs.start(
        [python, str(SERVER_SCRIPT), "--port", str(rtsp_port), "--rtp-port", str(rtp_port), "--path", "/cam"],
        name=f"rtsp-server-{name}",
    )
    wait_until(lambda: "ready" in procs.log(server) or server.poll() is not None, 15, what="the RTSP server")
    assert server.poll() is None, procs.log(server)
    publish = [ffmpeg, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi"]
    publish += ["-i", "testsrc=size=160x120:rate=15", "-c:v", "libx264", "-pix_fmt", "yuv420p"]
    publish += ["-preset", "ultrafast", "-tune", "zerolatency", "-g", "15"]  # a keyframe every second
    publish += ["-f", "rtp", f"rtp://127.0.0.1:{rtp_port}"]
    return server, procs.start(publish, name=f"ffmpeg-{name}")


def _kill(*processes: subprocess.Popen[bytes]) -> None:
    for proc in processes:
        proc.kill()
        proc.wait(5)


def _events(client: redis.Redis) -> list[EventMsg]:
    return [EventMsg.from_bytes(f[b"msg"]) for _, f in client.xrange(alarms_key())]


def _setups(procs: Processes, server: subprocess.Popen[bytes]) -> list[str]:
    return [line for line in procs.log(server).splitlines() if line.startswith("setup ")]


@pytest.mark.usefixtures("default_capture_options")
def test_rtsp_camera_reconnects_after_the_server_restarts(
    procs: Processes, redis_client: redis.Redis
) -> None:
    python = _require_gst_rtsp_server()
    ffmpeg = require_tool("ffmpeg")
    ports = (free_port(), free_port())
    server, publisher = _start_camera(procs, python, ffmpeg, ports, "1")
    cam = CameraConfig(
        id="rtsp",
        source=f"rtsp://127.0.0.1:{ports[0]}/cam",
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
        wait_until(lambda: redis_client.xlen(frames_key("rtsp")) >= 10, 30, what="frames from the camera")
        first = FrameMsg.from_bytes(redis_client.xrange(frames_key("rtsp"), count=1)[0][1][b"msg"])
        assert (first.w, first.h, first.camera) == (80, 60, "rtsp")
        # the reader may have asked before the server had video (camera_down, then camera_up)
        start = _events(redis_client)
        assert start[-1].type == "camera_up"
        n0 = len(start)
        setups = _setups(procs, server)
        assert setups and all("RTP/AVP/TCP" in s for s in setups), f"RTSP over TCP by default: {setups}"

        _kill(server, publisher)
        wait_until(
            lambda: [e.type for e in _events(redis_client)[n0:]] == ["camera_down"],
            20,
            what="camera_down after the RTSP server died",
        )
        assert registry.get_sample_value("dfm_camera_up", {"camera": "rtsp"}) == 0
        before = redis_client.xlen(frames_key("rtsp"))

        server, publisher = _start_camera(procs, python, ffmpeg, ports, "2")
        wait_until(
            lambda: [e.type for e in _events(redis_client)[n0:]] == ["camera_down", "camera_up"],
            30,
            what="camera_up after the RTSP server came back",
        )
        wait_until(
            lambda: redis_client.xlen(frames_key("rtsp")) >= before + 10, 30, what="frames after reconnect"
        )
        up = _events(redis_client)[-1]
        assert up.since_ts is not None and up.since_ts <= up.ts
        assert registry.get_sample_value("dfm_camera_up", {"camera": "rtsp"}) == 1
        assert registry.get_sample_value("dfm_reader_reconnects_total", {"camera": "rtsp"}) >= 1
    finally:
        reader.close()
    msgs = [FrameMsg.from_bytes(f[b"msg"]) for _, f in redis_client.xrange(frames_key("rtsp"))]
    assert [m.seq for m in msgs] == list(range(len(msgs))), "seq keeps counting across the reconnect"
    assert len({m.session for m in msgs}) == 1, "one reader session across the reconnect"

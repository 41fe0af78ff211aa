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
from stream_helpers import check_reader_survives_server_restart
from support import REPO, Processes, wait_until
from tools import require_tool

from dfm_stream.embedded_redis import free_port

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


def _setups(procs: Processes, server: subprocess.Popen[bytes]) -> list[str]:
    return [line for line in procs.log(server).splitlines() if line.startswith("setup ")]


@pytest.mark.usefixtures("default_capture_options")
def test_rtsp_camera_reconnects_after_the_server_restarts(
    procs: Processes, redis_client: redis.Redis
) -> None:
    python = _require_gst_rtsp_server()
    ffmpeg = require_tool("ffmpeg")
    ports = (free_port(), free_port())
    running = [_start_camera(procs, python, ffmpeg, ports, "1")]

    def check_tcp() -> None:
        setups = _setups(procs, running[0][0])
        assert setups and all("RTP/AVP/TCP" in s for s in setups), f"RTSP over TCP by default: {setups}"

    check_reader_survives_server_restart(
        redis_client,
        "rtsp",
        f"rtsp://127.0.0.1:{ports[0]}/cam",
        kill_server=lambda: _kill(*running[-1]),
        restart_server=lambda: running.append(_start_camera(procs, python, ffmpeg, ports, "2")),
        while_up=check_tcp,
    )

"""A real network stream on loopback: ffmpeg serves HTTP MPEG-TS; the reader ingests it, survives
the server being killed and restarted, and reports camera_down then camera_up.

ffmpeg alone cannot act as an RTSP server (its RTSP muxer pushes to one, and ``-rtsp_flags
listen`` is for receiving), and Debian's RTSP servers need extra packages, so the test uses
ffmpeg's built-in HTTP server (one client per ffmpeg process). tests/test_reader_rtsp.py runs
the same scenario against a real RTSP server.
"""

import subprocess

import redis
from stream_helpers import check_reader_survives_server_restart
from support import Processes
from tools import require_tool

from dfm_stream.embedded_redis import free_port


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


def test_network_stream_reconnects_after_the_server_restarts(
    procs: Processes, redis_client: redis.Redis
) -> None:
    ffmpeg = require_tool("ffmpeg")
    port = free_port()
    servers = [_serve(procs, ffmpeg, port, "ffmpeg-1")]

    def kill() -> None:
        servers[-1].kill()
        servers[-1].wait(5)

    check_reader_survives_server_restart(
        redis_client,
        "net",
        f"http://127.0.0.1:{port}/cam.ts",
        kill_server=kill,
        restart_server=lambda: servers.append(_serve(procs, ffmpeg, port, "ffmpeg-2")),
    )

"""A reader that sent nothing to Redis says so: exit 2 and one ``error:`` line naming the camera and why.

Real ``dfm-stream read`` processes against a real redis-server, one per way of sending nothing: a
source that never delivers a frame (a file that is not a video, an empty folder, a USB index with
no camera, an RTSP URL nobody serves) and frames that cannot be written (Redis unreachable, or an
ACL user without XADD). A run stopped by SIGTERM still exits 0 (the stop was asked for).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis
from support import Processes, wait_until

from dfm_stream.embedded_redis import EmbeddedRedis, free_port
from dfm_stream.keys import cameras_key

FAST = ("--duration", "3", "--open-timeout", "1", "--backoff-max", "1", "--metrics-port", "-1")


def _read(procs: Processes, redis_url: str, source: str, *extra: str, camera: str = "c1") -> tuple[int, str]:
    """Run a reader of one camera for 3 s; return its exit status and its last output line."""
    proc = procs.dfm("read", "--redis", redis_url, "--camera", camera, "--source", source, *FAST, *extra)
    rc = proc.wait(60)
    lines = [line for line in procs.log(proc).splitlines() if line.strip()]
    return rc, lines[-1] if lines else ""


def _sources(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Name -> (source, a fragment the error must contain) for sources that deliver nothing."""
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    dead = free_port()
    return {
        "non-video file": (str(text), "cannot open video file"),
        "empty folder": (str(empty), "has no images"),
        "absent USB index": ("63", "cannot open camera index 63"),
        "dead RTSP URL": (f"rtsp://viewer:secret@127.0.0.1:{dead}/stream1", "cannot open stream"),
    }


@pytest.mark.parametrize("kind", ["non-video file", "empty folder", "absent USB index", "dead RTSP URL"])
def test_a_source_that_never_delivers_a_frame_fails_the_run(
    procs: Processes, redis_url: str, redis_client: redis.Redis, tmp_path: Path, kind: str
) -> None:
    source, why = _sources(tmp_path)[kind]
    rc, last = _read(procs, redis_url, source)
    assert rc == 2, last
    assert last.startswith("error: camera c1: source ") and "delivered no frame in " in last, last
    assert why in last, last
    assert "secret" not in last  # the URL is shown without its password
    assert redis_client.hexists(cameras_key(), "c1")  # it registered itself: a site can see it


def test_frames_that_never_reach_redis_fail_the_run(procs: Processes) -> None:
    rc, last = _read(procs, f"redis://127.0.0.1:{free_port()}/0", "synthetic:size=32x32")
    assert rc == 2, last
    assert last.startswith("error: camera c1: ") and "none written to Redis (Redis: " in last, last


def test_frames_refused_by_redis_fail_the_run(
    procs: Processes, redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    redis_client.acl_setuser(
        "noxadd", enabled=True, passwords=["+pw"], commands=["+@all", "-xadd"], keys=["*"], channels=["*"]
    )
    rc, last = _read(procs, f"redis://noxadd:pw@127.0.0.1:{redis_server.port}/0", "synthetic:size=32x32")
    assert rc == 2, last
    assert "none written to Redis" in last and "xadd" in last.lower(), last


def test_only_the_cameras_that_sent_nothing_are_named(
    procs: Processes, redis_url: str, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    config = tmp_path / "cams.toml"
    config.write_text(
        '[[cameras]]\nid = "good"\nsource = "synthetic:size=32x32"\n\n'
        f'[[cameras]]\nid = "bad"\nsource = "{empty}"\n'
    )
    proc = procs.dfm("read", "--redis", redis_url, "--config", str(config), *FAST)
    rc = proc.wait(60)
    last = procs.log(proc).strip().splitlines()[-1]
    assert rc == 2, last
    assert "camera bad: " in last and "camera good" not in last, last


def test_a_run_that_sent_frames_exits_zero(procs: Processes, redis_url: str) -> None:
    rc, last = _read(procs, redis_url, "synthetic:size=32x32")
    assert rc == 0, last
    assert "error" not in last


def test_sigterm_exits_zero_even_when_nothing_was_sent(
    procs: Processes, redis_url: str, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = procs.dfm(
        "read", "--redis", redis_url, "--camera", "c1", "--source", str(empty), "--metrics-port", "-1"
    )
    wait_until(lambda: "camera c1 down" in procs.log(proc), 30, what="the camera reported down")
    assert procs.stop(proc, signal.SIGTERM) == 0, procs.log(proc)
    assert "nothing reached Redis from: camera c1" in procs.log(proc)

"""``dfm-stream alarms --images DIR`` writes only inside DIR, whatever the events in Redis say.

Camera names and entry ids come from the alarm stream, i.e. from anyone who can write to Redis:
the file name built from them is sanitised, and an event whose image cannot be saved is reported
and skipped instead of ending the command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import redis
from support import REPO

from dfm_stream.alarms import publish_event
from dfm_stream.wire import EventMsg

JPEG = b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9"


def _raise(client: redis.Redis, camera: str) -> str:
    event = EventMsg(type="raised", camera=camera, ts=1, frame_id="f", seq=1, score=2.0, image=JPEG)
    return publish_event(client, event)


def _alarms(redis_url: str, images: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dfm_stream.cli", "alarms", "--redis", redis_url, "--images", str(images)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=dict(os.environ),
        check=False,
    )


def test_camera_names_cannot_pick_a_file_outside_the_folder(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    images = tmp_path / "deep" / "images"
    outside = tmp_path / "deep" / "outside"
    outside.mkdir(parents=True)
    absolute = tmp_path / "absolute"
    cameras = ["../outside/x", str(absolute), "no/such/dir/x", "..", "cam1"]
    ids = [_raise(redis_client, camera) for camera in cameras]

    proc = _alarms(redis_url, images)

    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["id"] for line in lines] == ids, "every event is printed, the follower survives"
    written = sorted(p.name for p in images.iterdir())
    assert len(written) == len(cameras)
    for line in lines:
        path = Path(line["image_file"])
        assert path.parent == images and path.read_bytes() == JPEG
    assert list(outside.iterdir()) == [] and not list(tmp_path.glob("absolute*"))
    assert f"cam1_{ids[-1]}.jpg" in written, "a valid camera id keeps its readable file name"


def test_an_image_that_cannot_be_saved_is_reported_and_skipped(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    first = _raise(redis_client, "cam1")
    second = _raise(redis_client, "cam1")
    (images / f"cam1_{first}.jpg").mkdir(parents=True)  # the file name is taken by a folder

    proc = _alarms(redis_url, images)

    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["id"] for line in lines] == [first, second]
    assert "image_file" not in lines[0] and "not saved" in lines[0]["image_error"]
    assert f"event {first}" in proc.stderr and "Traceback" not in proc.stderr
    assert (images / f"cam1_{second}.jpg").read_bytes() == JPEG

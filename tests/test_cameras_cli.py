"""``dfm-stream cameras``: list registered cameras with their state, remove (and purge) the stale ones.

Real ``dfm-stream read`` processes write the registrations and heartbeats; a camera whose reader
stopped long ago is made by aging its heartbeat (``ZADD``, as any producer may write it), since
waiting a minute for it would make the test slow. The command runs as a child process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import redis
from support import REPO, Processes, wait_until

from dfm_stream import keys
from dfm_stream.embedded_redis import free_port


def _cameras(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dfm_stream.cli", "cameras", *args]
    if "--redis" not in args:
        cmd += ["--redis", redis_url]
    return subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=60)


def _listed(redis_url: str) -> dict[str, dict]:
    done = _cameras(redis_url, "--json")
    assert done.returncode == 0, done.stderr
    return {c["camera"]: c for c in json.loads(done.stdout)}


def _start_reader(procs: Processes, redis_url: str, camera: str, *extra: str) -> object:
    return procs.dfm(
        *("read", "--redis", redis_url, "--camera", camera, "--source", "synthetic:size=32x32"),
        *("--metrics-port", "-1", *extra),
        name=camera,
    )


def _site(procs: Processes, redis_url: str, client: redis.Redis) -> object:
    """A live camera, a stale one (reader stopped 5 min ago, assigned a model) and one never seen."""
    stopped = _start_reader(procs, redis_url, "old", "--max-frames", "12")
    assert stopped.wait(60) == 0, procs.log(stopped)  # type: ignore[attr-defined]
    client.zadd(keys.cameras_alive_key(), {"old": time.time() - 300})
    client.hset(keys.assignments_key(), "old", "bolts@2")
    client.hset(keys.cameras_key(), "ghost", json.dumps({"camera": "ghost"}))
    live = _start_reader(procs, redis_url, "live1")
    wait_until(lambda: client.xlen(keys.frames_key("live1")) >= 3, 30, what="frames of live1")
    client.xgroup_create(keys.frames_key("live1"), keys.DEFAULT_GROUP, id="0")
    client.xreadgroup(keys.DEFAULT_GROUP, "w1", {keys.frames_key("live1"): ">"}, count=2)
    return live


def test_list_says_live_stale_and_never_seen_with_streams_backlog_and_model(
    procs: Processes, redis_url: str, redis_client: redis.Redis
) -> None:
    _site(procs, redis_url, redis_client)
    cams = _listed(redis_url)
    assert sorted(cams) == ["ghost", "live1", "old"]
    live, old, ghost = cams["live1"], cams["old"], cams["ghost"]
    assert live["state"] == "live" and live["reader_state"] == "up" and live["source"] == "synthetic"
    assert live["frames"] >= 3 and live["pending"] == 2 and live["lag"] >= 1
    assert live["last_frame_age_s"] < 30 and live["last_seen_age_s"] < 30
    assert old["state"] == "stale" and 290 < old["last_seen_age_s"] < 400
    assert old["reader_state"] == "finished" and old["frames"] == 12 and old["model"] == "bolts@2"
    assert old["pending"] is None  # no worker group on its stream
    assert ghost["state"] == "never_seen" and ghost["last_seen_ts"] is None and ghost["frames"] == 0

    table = _cameras(redis_url)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:]}
    assert "live" in rows["live1"] and "stale (5 min ago)" in rows["old"] and "bolts@2" in rows["old"]
    assert "never seen" in rows["ghost"]


def test_remove_forgets_cameras_and_purge_deletes_their_keys(
    procs: Processes, redis_url: str, redis_client: redis.Redis
) -> None:
    _site(procs, redis_url, redis_client)
    done = _cameras(redis_url, "remove", "ghost")
    assert done.returncode == 0 and "removed camera ghost (was never seen)" in done.stdout, done
    done = _cameras(redis_url, "remove", "old", "--purge")
    assert done.returncode == 0, done.stderr
    assert "removed camera old (was stale)" in done.stdout and "bolts@2 kept" in done.stdout
    assert not redis_client.hexists(keys.cameras_key(), "old")
    assert redis_client.zscore(keys.cameras_alive_key(), "old") is None
    assert not redis_client.exists(keys.frames_key("old"))
    assert redis_client.hget(keys.assignments_key(), "old") == b"bolts@2"
    assert sorted(_listed(redis_url)) == ["live1"]


def test_remove_without_purge_keeps_the_streams(
    procs: Processes, redis_url: str, redis_client: redis.Redis
) -> None:
    _site(procs, redis_url, redis_client)
    done = _cameras(redis_url, "--json", "remove", "old")  # options may come before the action
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["camera"] == "old"
    assert not redis_client.hexists(keys.cameras_key(), "old")
    assert redis_client.xlen(keys.frames_key("old")) == 12


def test_purging_a_live_camera_needs_force(
    procs: Processes, redis_url: str, redis_client: redis.Redis
) -> None:
    _site(procs, redis_url, redis_client)
    refused = _cameras(redis_url, "remove", "old", "live1", "--purge")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]  # one line
    assert "camera 'live1' is live" in refused.stderr and "--force" in refused.stderr
    assert redis_client.hexists(keys.cameras_key(), "old")  # nothing removed when one is refused
    assert redis_client.exists(keys.frames_key("live1"))
    forced = _cameras(redis_url, "remove", "live1", "--purge", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "was live" in forced.stderr  # its reader still runs: said, not hidden
    assert not redis_client.hexists(keys.cameras_key(), "live1")


def test_user_mistakes_and_unreachable_redis_are_one_line_and_exit_2(redis_url: str) -> None:
    unknown = _cameras(redis_url, "remove", "nosuch")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: no camera 'nosuch'"), unknown
    down = _cameras(redis_url, "--redis", f"redis://127.0.0.1:{free_port()}/0")
    assert down.returncode == 2 and down.stderr.startswith("error: cannot reach Redis"), down
    assert len(down.stderr.strip().splitlines()) == 1
    empty = _cameras(redis_url)
    assert empty.returncode == 0 and "no cameras registered" in empty.stdout

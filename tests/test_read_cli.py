"""``dfm-stream read`` as a user runs it: flags, config files, metrics, clean exit on SIGTERM."""

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from support import Processes, wait_until

from dfm_stream.cli import main
from dfm_stream.embedded_redis import free_port
from dfm_stream.keys import cameras_key, frames_key
from dfm_stream.wire import FrameMsg


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_serving_reader_exits_zero_promptly_on_sigterm(
    procs: Processes, redis_url: str, redis_client: redis.Redis
) -> None:
    """While running it serves /metrics, /readyz, /healthz and camera state; SIGTERM: exit 0 within 2 s."""
    port = free_port()
    p = procs.dfm(
        "read",
        "--redis",
        redis_url,
        "--camera",
        "cam1",
        "--source",
        "synthetic:size=64x48",
        "--fps",
        "20",
        "--jpeg-quality",
        "80",
        "--metrics-port",
        str(port),
        name="reader",
    )
    wait_until(lambda: redis_client.xlen(frames_key("cam1")) >= 5, 30, what="frames from the reader")
    wait_until(lambda: _get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 10, what="ready")
    status, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and 'dfm_reader_frames_published_total{camera="cam1"}' in body
    assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    info = json.loads(redis_client.hget(cameras_key(), "cam1"))
    assert info["state"] == "up" and info["pid"] == p.pid
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc = p.wait(10)
    elapsed = time.monotonic() - t0
    assert rc == 0, procs.log(p)
    assert elapsed < 2.0, f"SIGTERM took {elapsed:.2f} s"
    assert json.loads(redis_client.hget(cameras_key(), "cam1"))["state"] == "stopped"


def test_config_file_runs_every_camera_with_env_overrides(
    procs: Processes, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    cfg = tmp_path / "cams.toml"
    cfg.write_text(
        f"""
[redis]
url = "{redis_url}"
[reader]
size = "48x32"
[[cameras]]
id = "a"
source = "synthetic:seed=1"
[[cameras]]
id = "b"
source = "synthetic:seed=2"
"""
    )
    env = {"DFM__CAMERAS__B__ENCODING": "raw"}
    p = procs.dfm(
        "read",
        "--config",
        str(cfg),
        "--max-frames",
        "5",
        "--no-pace",
        "--metrics-port",
        "-1",
        name="cfg",
        env=env,
    )
    assert p.wait(60) == 0, procs.log(p)
    a = [FrameMsg.from_bytes(f[b"msg"]) for _, f in redis_client.xrange(frames_key("a"))]
    b = [FrameMsg.from_bytes(f[b"msg"]) for _, f in redis_client.xrange(frames_key("b"))]
    assert [m.seq for m in a] == [m.seq for m in b] == [0, 1, 2, 3, 4]
    assert {(m.w, m.h, m.enc) for m in a} == {(48, 32, "jpeg")}
    assert {(m.w, m.h, m.enc) for m in b} == {(48, 32, "raw")}


def test_one_camera_of_a_config_with_command_line_overrides(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    cfg = tmp_path / "cams.toml"
    cfg.write_text(
        '[[cameras]]\nid = "a"\nsource = "synthetic:"\n[[cameras]]\nid = "b"\nsource = "synthetic:"\n'
    )
    argv = ["read", "--redis", redis_url, "--config", str(cfg), "--camera", "b", "--size", "40x30"]
    assert main([*argv, "--max-frames", "3", "--no-pace", "--metrics-port", "-1"]) == 0
    assert redis_client.xlen(frames_key("a")) == 0
    msgs = [FrameMsg.from_bytes(f[b"msg"]) for _, f in redis_client.xrange(frames_key("b"))]
    assert [(m.seq, m.w, m.h) for m in msgs] == [(0, 40, 30), (1, 40, 30), (2, 40, 30)]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--camera", "c", "--source", "synthetic:", "--size", "big"], "--size: size 'big' must be WxH"),
        (["--camera", "c", "--source", "synthetic:", "--roi", "1,2"], "--roi"),
        (["--camera", "c", "--source", "synthetic:", "--fps", "-3"], "--fps"),
        (["--camera", "c", "--source", "synthetic:", "--encoding", "png"], "invalid choice: 'png'"),
        (["--camera", "c", "--source", "synthetic:", "--max-frames", "0"], "--max-frames"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["read", *args, "--redis", "redis://127.0.0.1:1/0"])  # Redis is never reached
    except SystemExit as e:  # refused by the parser itself
        code = e.code
    assert code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--camera", "c"], "needs --camera ID and --source SRC, or --config FILE"),
        (["--camera", "c", "--source", "/no/such/clip.mp4"], "no such file or folder"),
        (["--camera", "bad id", "--source", "synthetic:"], "invalid camera id 'bad id'"),
        (["--camera", "c", "--source", "synthetic:", "--jpeg-quality", "500"], "jpeg_quality=500"),
        (
            ["--camera", "c", "--source", "synthetic:", "--backoff-initial", "5", "--backoff-max", "1"],
            "backoff_max",
        ),
        (["--config", "/no/such.toml"], "cannot read config file /no/such.toml"),
        # the whole source string is checked at start, not only its kind
        (
            ["--camera", "c", "--source", "synthetic:sed=1"],
            "camera c: synthetic source: bad parameter 'sed=1'",
        ),
        (["--camera", "c", "--source", "synthetic:seed=-1"], "camera c: synthetic source: seed=-1"),
        (["--camera", "c", "--source", "synthetic:fps=fast"], "camera c: synthetic source: fps='fast'"),
        (["--camera", "c", "--source", "synthetic:size=8x8"], "camera c: synthetic source: size '8x8'"),
    ],
)
def test_bad_settings_are_clear_errors(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["read", "--metrics-port", "-1", *args]) == 2
    assert needle in capsys.readouterr().err


def test_unknown_config_key_names_key_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cams.toml"
    cfg.write_text('[[cameras]]\nid = "a"\nsource = "synthetic:"\nframerate = 3\n')
    assert main(["read", "--config", str(cfg), "--metrics-port", "-1"]) == 2
    err = capsys.readouterr().err
    assert "'framerate'" in err and str(cfg) in err


def test_a_bad_source_string_in_a_config_names_the_camera(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "cams.toml"
    cfg.write_text(
        '[[cameras]]\nid = "a"\nsource = "synthetic:"\n[[cameras]]\nid = "b"\nsource = "synthetic:rate=1"\n'
    )
    assert (
        main(["read", "--config", str(cfg), "--redis", "redis://127.0.0.1:1/0", "--metrics-port", "-1"]) == 2
    )
    err = capsys.readouterr().err
    assert "camera b:" in err and "'rate=1'" in err

"""One URL redaction everywhere: ``user:password@`` and ``?password=`` style secrets never show.

The unit cases pin :func:`dfm_stream.redact.safe_url`; the process cases run the real command and
look at what an operator sees: ``--help`` (whose defaults come from the environment), log lines
and error messages.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

import dfm_stream
from dfm_stream.config import CameraConfig, RedisConfig
from dfm_stream.connect import RedisSettings
from dfm_stream.redact import safe_url
from dfm_stream.sources import safe_url as sources_safe_url

SECRET = "s3cret-Pw"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://admin:{SECRET}@h:6379/0", "redis://admin:***@h:6379/0"),
        (f"redis://:{SECRET}@h:6379/0", "redis://:***@h:6379/0"),
        (f"rediss://u:{SECRET}@h:notaport/0", "rediss://u:***@h:notaport/0"),
        (f"u:{SECRET}@h:6379", "u:***@h:6379"),
        ("h:6379", "h:6379"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        (f"redis://h:6379/0?password={SECRET}&db=1", "redis://h:6379/0?password=***&db=1"),
        (f"rtsp://cam:554/live?user=a&pass={SECRET}", "rtsp://cam:554/live?user=a&pass=***"),
        (f"https://cam/stream?TOKEN={SECRET}#x", "https://cam/stream?TOKEN=***#x"),
        (f"rtsp://a:{SECRET}@10.0.0.5:554/s?token={SECRET}", "rtsp://a:***@10.0.0.5:554/s?token=***"),
        (f"unix:///run/redis.sock?db=0&password={SECRET}", "unix:///run/redis.sock?db=0&password=***"),
        (f"redis://u:{SECRET}#x@h:1/0", "redis://u:***@h:1/0"),
        ("rtsp://cam:554/stream@1", "rtsp://cam:554/stream@1"),
        ("/data/line@1/video.mp4", "/data/line@1/video.mp4"),
        ("synthetic:seed=3,fps=10", "synthetic:seed=3,fps=10"),
        ("redis://user@h:6379/0", "redis://user@h:6379/0"),
        ("", ""),
    ],
)
def test_safe_url_masks_passwords_and_secret_parameters(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_safe_url_never_raises() -> None:
    for odd in (None, 42, b"redis://u:p@h", "redis://[::1", "redis://u:p@[::1]:x/0", "\x00:@?=&#"):
        assert isinstance(safe_url(odd), str)


def test_there_is_one_redaction_and_every_repr_uses_it() -> None:
    assert sources_safe_url is safe_url
    package = Path(dfm_stream.__file__).parent
    defining = [p.relative_to(package) for p in package.rglob("*.py") if "\ndef safe_url(" in p.read_text()]
    assert defining == [Path("redact.py")]
    # the copy that used to sit in sources/base.py raised ValueError on a non-numeric port
    for text in (
        repr(RedisConfig(url=f"redis://u:{SECRET}@h:notaport/0")),
        repr(RedisConfig(url=f"redis://h:6379/0?password={SECRET}")),
        repr(RedisSettings(url=f"redis://h:6379/0?password={SECRET}")),
        repr(CameraConfig(id="c1", source=f"rtsp://a:{SECRET}@cam/live")),
        repr(CameraConfig(id="c1", source=f"rtsp://cam/live?password={SECRET}")),
    ):
        assert SECRET not in text and "***" in text


def _dfm(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dfm_stream.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.parametrize("command", [("work",), ("read",), ("alarms",), ("scores",), ("model", "list")])
def test_help_never_shows_the_password_from_the_environment(command: tuple[str, ...]) -> None:
    url = f"redis://admin:{SECRET}@10.0.0.9:6379/0?password={SECRET}"
    proc = _dfm(*command, "--help", env={"DFM_REDIS_URL": url})
    assert proc.returncode == 0, proc.stderr
    assert "admin:***@10.0.0.9" in proc.stdout, proc.stdout
    assert SECRET not in proc.stdout + proc.stderr


def test_a_password_in_the_query_string_is_masked_in_logs() -> None:
    url = f"redis://127.0.0.1:1/0?password={SECRET}"  # nothing listens there
    proc = _dfm(
        *("read", "--redis", url, "--camera", "c1", "--source", "synthetic:size=32x32"),
        *("--duration", "1", "--metrics-port", "-1"),
    )
    output = proc.stdout + proc.stderr
    assert "password=***" in output, output
    assert SECRET not in output


@pytest.mark.parametrize(
    "args",
    [
        ("alarms", "--redis", f"http://u:{SECRET}@h/0?password={SECRET}"),
        (
            "read",
            "--camera",
            "c1",
            "--source",
            f"u:{SECRET}@cam:554/live",
            "--redis",
            "redis://127.0.0.1:1/0",
        ),
    ],
    ids=["redis-url-scheme", "source-without-scheme"],
)
def test_errors_never_show_the_password(args: tuple[str, ...]) -> None:
    proc = _dfm(*args, "--metrics-port", "-1") if args[0] == "read" else _dfm(*args)
    assert proc.returncode == 2, proc.stderr
    assert "***" in proc.stderr and SECRET not in proc.stderr

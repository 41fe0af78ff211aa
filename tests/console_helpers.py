"""Helpers for the console tests: start ``dfm-stream console``, talk to it over HTTP with cookies.

Plain functions and classes only (fixtures come by injection). :class:`Browserless` is a tiny
HTTP client with its own cookie jar that never follows redirects, so a test sees the 303s and
403s the console answers.
"""

from __future__ import annotations

import http.cookiejar
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from support import Processes, wait_until

from dfm_stream.embedded_redis import free_port
from dfm_stream.wire import ShadowMsg

PASSWORDS = {"olga": "operator-pass-1", "vic": "viewer-pass-22"}
ROLES = {"olga": "operator", "vic": "viewer"}
SECRET = "console-test-secret-0123456789"


def add_users(path: Path) -> None:
    """Write the operator ``olga`` and the viewer ``vic`` into ``path`` with ``console add-user``."""
    for name, password in PASSWORDS.items():
        cli = [sys.executable, "-m", "dfm_stream.cli", "console", "add-user", "--users", str(path)]
        run = subprocess.run(
            [*cli, "--name", name, "--role", ROLES[name], "--password-stdin"],
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == 0, run.stderr


def start_console(
    procs: Processes, redis_url: str, users: Path | None = None
) -> tuple[subprocess.Popen, str]:
    """Start a console on a free port; return the process and its base URL once it answers."""
    port = free_port()
    args = ["console", "--redis", redis_url, "--port", str(port)]
    if users is not None:
        args += ["--users", str(users)]
    proc = procs.dfm(*args, name=f"console-{port}", env={"DFM_CONSOLE_SECRET": SECRET})
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.poll() is None, procs.log(proc)
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until(answers, 90, interval=0.3, what="the console to answer /healthz")
    return proc, url


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class Browserless:
    """An HTTP client with a cookie jar (one session), not following redirects."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect)

    def request(self, path: str, data: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
        """GET (or POST the form ``data``); return status, body text and headers."""
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body)
        try:
            with self.opener.open(req, timeout=30) as r:
                return r.status, r.read().decode(errors="replace"), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace"), dict(e.headers)

    def csrf(self, path: str = "/login") -> str:
        """Return the CSRF token of this session, read from a page's meta tag."""
        _, html, _ = self.request(path)
        match = re.search(r'<meta name="csrf-token" content="([^"]+)"', html)
        assert match, html[:500]
        return match.group(1)

    def login(self, name: str) -> int:
        """Log in as ``name`` (password from :data:`PASSWORDS`); return the status of the POST."""
        status, _, _ = self.request(
            "/login", {"csrf_token": self.csrf(), "username": name, "password": PASSWORDS[name], "next": "/"}
        )
        return status


def shadow_msgs(camera: str, live: str, candidate: str) -> list[ShadowMsg]:
    """Four compared frames: two agree, one flagged by the live model only, one by the candidate only."""
    flags = [(False, False), (True, True), (True, False), (False, True)]
    return [
        ShadowMsg(
            camera=camera,
            frame_id=f"{camera}:{i + 1}-0",
            seq=i,
            ts=time.time_ns(),
            scored_ts=time.time_ns(),
            model=candidate,
            score=1.0 + i,
            threshold=2.5,
            anomalous=shadow_flag,
            live_model=live,
            live_score=2.0 + 2 * i,
            live_threshold=3.5,
            live_anomalous=live_flag,
        )
        for i, (live_flag, shadow_flag) in enumerate(flags)
    ]

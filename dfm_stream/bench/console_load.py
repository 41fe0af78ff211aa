"""Bench stage ``consoles``: worker throughput with operator consoles open, and without them (#18).

:data:`CAMERAS` cameras send :data:`FPS` frames per second each (paced in real time, as readers
would) to one ``dfm-stream work`` process. Each repeat runs two phases on keys of their own, in
alternating order so a drift of the machine touches both alike:

* **alone**: nothing else reads Redis;
* **consoles**: :data:`CONSOLES` ``dfm-stream console`` processes, each with the line overview
  open the way a browser keeps it: the ``/events`` Server-Sent Events stream connected, and every
  camera tile's frame fetched again :data:`FRAME_PERIOD_S` after the last one arrived (what
  ``console.js`` does, one request at a time per tile).

Worker throughput is the number of scores published while frames were being sent (after
:data:`SETTLE_S`), per second. With more frames offered than the worker can score it runs flat
out, so anything the consoles take from it shows up in its throughput. Also reported: the score
latency p99 of both phases, the CPU the console processes and the emulated browsers used, and
the consoles' Redis load: commands per second the server processed beyond what the alone phase
needed per scored frame (Redis ``INFO stats``).
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dfm_stream.bench.env import percentile, pid_cpu_seconds
from dfm_stream.bench.stream_stages import (
    StreamSetup,
    WorkerGroup,
    _paced_send,
    delete_prefix,
    push_backlog,
    read_scores,
    wait_for_scores,
)
from dfm_stream.errors import DfmStreamError
from dfm_stream.wire import ScoreStatus

CAMERAS = 8
FPS = 10.0
CONSOLES = 3
FRAME_PERIOD_S = 0.5
"""``FRAME_PERIOD_MS`` of ``console.js``: the pause between a tile's frame and its next request."""
SETTLE_S = 2.0
"""Seconds at the start of sending not counted (the worker's batches reach a steady state); a
quarter of the duration when that is shorter."""
LIMIT_RATIO = 0.95
"""#18: with consoles open, worker throughput stays within 5 % of the run without."""


def console_setup(setup: StreamSetup) -> StreamSetup:
    """Return ``setup`` with :data:`CAMERAS` cameras (the first camera's frames, renamed)."""
    cameras = [f"line{i}" for i in range(CAMERAS)]
    frames = setup.templates[setup.cameras[0]]
    templates = {cam: [dataclasses.replace(f, camera=cam) for f in frames] for cam in cameras}
    return dataclasses.replace(setup, cameras=cameras, templates=templates)


def consoles_run(setup: StreamSetup, rep: int, duration: float) -> dict[str, Any]:
    """Run both phases (order alternates with ``rep``); return their figures and the ratio."""
    line = console_setup(setup)
    order = (False, True) if rep % 2 == 0 else (True, False)
    phases = {with_consoles: _phase(line, rep, duration, with_consoles) for with_consoles in order}
    alone, shared = phases[False], phases[True]
    per_frame = alone["redis_commands"] / max(alone["frames_in_window"], 1)
    extra = shared["redis_commands"] - per_frame * shared["frames_in_window"]
    ratio = shared["worker_fps"] / alone["worker_fps"] if alone["worker_fps"] else None
    return {
        "cameras": CAMERAS,
        "fps_per_camera": FPS,
        "consoles": CONSOLES,
        "order": ["consoles" if c else "alone" for c in order],
        "alone": alone,
        "with_consoles": shared,
        "throughput_ratio": ratio,
        "within_limit": ratio is not None and ratio >= LIMIT_RATIO,
        "consoles_redis_commands_per_s": extra / shared["window_s"],
    }


def _phase(setup: StreamSetup, rep: int, duration: float, with_consoles: bool) -> dict[str, Any]:
    tag = f"consoles{rep}{'c' if with_consoles else 'a'}"
    prefix = setup.prefix(tag, rep)
    browsers: list[_Browser] = []
    consoles: _Consoles | None = None
    try:
        with WorkerGroup(setup, prefix, tag) as group:
            warm = 2 * setup.batch_size * setup.workers
            push_backlog(setup, prefix, warm, session="warmup")
            wait_for_scores(setup, prefix, warm, 300, group)
            if with_consoles:
                consoles = _Consoles(setup, prefix, tag).start()
                browsers = [_Browser(port, setup.cameras).start() for port in consoles.ports]
                for browser in browsers:
                    browser.wait_open(60)
            stats0 = _redis_stats(setup)
            cpu0 = consoles.cpu_seconds() if consoles else 0.0
            own0 = _own_cpu_seconds()
            started = time.time_ns()
            sent = _paced_send(setup, prefix, CAMERAS * FPS, duration, session=tag)
            ended = time.time_ns()
            stats1 = _redis_stats(setup)
            cpu1 = consoles.cpu_seconds() if consoles else 0.0
            own1 = _own_cpu_seconds()
            group.check_alive()
            events = sum(b.stop() for b in browsers)
            frames_fetched = sum(b.frames for b in browsers)
        scores = [s for s in read_scores(setup.client, prefix, setup.cameras) if s.session == tag]
    finally:
        for browser in browsers:
            browser.stop()
        if consoles is not None:
            consoles.stop()
        delete_prefix(setup.client, prefix)
    window_start = started + int(min(SETTLE_S, duration / 4) * 1e9)
    in_window = [s for s in scores if window_start <= s.scored_ts <= ended]
    window_s = (ended - window_start) / 1e9
    latency = [s.latency_ms for s in in_window if s.status == ScoreStatus.SCORED]
    wall = (ended - started) / 1e9
    return {
        "sent": sent,
        "offered_fps": sent / wall,
        "window_s": window_s,
        "frames_in_window": len(in_window),
        "worker_fps": len(in_window) / window_s,
        "latency_p50_ms": percentile(latency, 50),
        "latency_p99_ms": percentile(latency, 99),
        "redis_commands": stats1[0] - stats0[0],
        "redis_commands_per_s": (stats1[0] - stats0[0]) / wall,
        "redis_output_bytes_per_s": (stats1[1] - stats0[1]) / wall,
        "consoles_cpu_cores": (cpu1 - cpu0) / wall,
        "bench_process_cpu_cores": (own1 - own0) / wall,
        "sse_messages": events,
        "frames_fetched": frames_fetched,
    }


def _redis_stats(setup: StreamSetup) -> tuple[int, int]:
    info = setup.client.info("stats")
    return int(info["total_commands_processed"]), int(info["total_net_output_bytes"])


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class _Consoles:
    """``dfm-stream console`` processes on free loopback ports (read only: no users file)."""

    def __init__(self, setup: StreamSetup, prefix: str, tag: str) -> None:
        from dfm_stream.embedded_redis import free_port

        self.setup = setup
        self.prefix = prefix
        self.tag = tag
        self.ports = [free_port() for _ in range(CONSOLES)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self) -> _Consoles:
        """Start the consoles and wait until each answers ``/healthz``."""
        self.setup.logdir.mkdir(parents=True, exist_ok=True)
        for i, port in enumerate(self.ports):
            path = self.setup.logdir / f"{self.tag}-console{i}.log"
            cmd = [
                sys.executable, "-m", "dfm_stream.cli", "console", "--redis", self.setup.url,
                "--prefix", self.prefix, "--host", "127.0.0.1", "--port", str(port),
            ]  # fmt: skip
            with path.open("wb") as out:
                self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
            self.logs.append(path)
        for proc, port, path in zip(self.procs, self.ports, self.logs, strict=True):
            self._wait_healthy(proc, port, path)
        return self

    def _wait_healthy(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise DfmStreamError(f"bench: console exited with code {proc.returncode}; log {log}:\n{tail}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise DfmStreamError(f"bench: console on port {port} did not answer /healthz within 60 s")

    def cpu_seconds(self) -> float:
        """Return the CPU time the console processes used so far."""
        return sum(pid_cpu_seconds(p.pid) for p in self.procs)

    def stop(self) -> None:
        """SIGTERM the consoles; kill one that does not exit within 10 s."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


class _Browser:
    """One open line overview: the SSE stream and one frame loop per camera tile."""

    def __init__(self, port: int, cameras: list[str]) -> None:
        self.port = port
        self.cameras = cameras
        self.frames = 0
        self.messages = 0
        self._stop = threading.Event()
        self._first_snapshot = threading.Event()
        self._tiles_shown: set[str] = set()
        self._sse: http.client.HTTPConnection | None = None
        self._threads = [threading.Thread(target=self._events, daemon=True)]
        self._threads += [threading.Thread(target=self._tile, args=(c,), daemon=True) for c in cameras]
        self._lock = threading.Lock()

    def start(self) -> _Browser:
        """Open the event stream and start the tiles."""
        for thread in self._threads:
            thread.start()
        return self

    def wait_open(self, timeout: float) -> None:
        """Wait until the page is loaded: a first snapshot received and a frame shown in every tile."""
        deadline = time.monotonic() + timeout
        while not (self._first_snapshot.is_set() and len(self._tiles_shown) == len(self.cameras)):
            if time.monotonic() > deadline:
                raise DfmStreamError(
                    f"bench: console on port {self.port} did not show the line within {timeout:.0f} s "
                    f"(snapshot: {self._first_snapshot.is_set()}, "
                    f"tiles with a frame: {len(self._tiles_shown)} of {len(self.cameras)})"
                )
            time.sleep(0.05)

    def _events(self) -> None:
        self._sse = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            self._sse.request("GET", "/events", headers={"Accept": "text/event-stream"})
            response = self._sse.getresponse()
            while not self._stop.is_set():
                line = response.readline()
                if not line:
                    return
                if line.startswith(b"event:"):
                    self.messages += 1
                    self._first_snapshot.set()
        except OSError:  # closed by stop()
            return

    def _tile(self, camera: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                conn.request("GET", f"/frame/{camera}.jpg?n={n}")
                response = conn.getresponse()
                response.read()
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                self._stop.wait(1.0)  # the page's retry after an error
                continue
            if response.status == 200:
                with self._lock:
                    self.frames += 1
                    self._tiles_shown.add(camera)
            self._stop.wait(FRAME_PERIOD_S)
        conn.close()

    def stop(self) -> int:
        """Close the page; return the SSE messages it received."""
        if not self._stop.is_set():
            self._stop.set()
            if self._sse is not None and self._sse.sock is not None:
                self._sse.sock.shutdown(socket.SHUT_RDWR)
            for thread in self._threads:
                thread.join(15)
        return self.messages

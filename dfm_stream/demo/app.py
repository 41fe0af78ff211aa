"""``dfm-stream demo``: the whole service on one machine, with nothing but Python installed.

What it does, in order:

1. starts an embedded Redis server (:class:`~dfm_stream.embedded_redis.EmbeddedRedis`) unless a
   ``--redis`` URL is given, and clears the demo cameras' keys there;
2. fits a DFM model on good warm-up frames of the synthetic conveyor (with a progress bar) and
   calibrates its threshold on held-out good frames; the artifact goes to the work folder;
3. starts one worker process (``dfm-stream work``) and one reader process per camera
   (``dfm-stream read``), each serving its own ``/metrics``; the demo serves ``dfm_demo_*``
   gauges on ``--metrics-port``;
4. follows the pipeline through Redis (:mod:`dfm_stream.demo.view`) in a live terminal view, or a
   line per second without a terminal, until ``--duration`` passes or Ctrl-C;
5. stops the readers, lets the worker score what is queued, stops it (SIGTERM, wait, SIGKILL),
   stops Redis and prints a summary (also written as JSON with ``--summary-json``).
"""

import contextlib
import json
import logging
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from dfm_stream import keys
from dfm_stream.connect import RedisClient, RedisSettings, connect
from dfm_stream.demo.model import ModelPlan, fit_demo_model, plan_model
from dfm_stream.demo.processes import Child, port_is_free, spawn, spawn_console, wait_ready
from dfm_stream.demo.view import DemoMetrics, Tracker, event_line, print_summary, render, status_line
from dfm_stream.embedded_redis import EmbeddedRedis, free_port
from dfm_stream.errors import DfmStreamError

log = logging.getLogger(__name__)

READER_STOP_S = 10.0
WORKER_STOP_S = 20.0
DRAIN_S = 10.0
_KEEP = "pass --workdir DIR to keep the model and logs"


@dataclass(frozen=True)
class DemoSettings:
    """Everything ``dfm-stream demo`` can be told (see ``dfm-stream demo --help``)."""

    duration: float = 60.0
    cameras: int = 2
    seed: int = 0
    device: str = "auto"
    weights: Path | None = None
    backbone: str | None = None
    layer: str | None = None
    size: int | None = None
    fps: float = 8.0
    defect_rate: float = 0.12
    warmup: int = 192
    calibration: int = 64
    margin: float = 1.2
    batch_size: int = 8
    max_wait_ms: int = 50
    view: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9400
    console_port: int = 8080
    summary_json: Path | None = None
    workdir: Path | None = None
    redis: RedisSettings | None = None
    prefix: str = keys.DEFAULT_PREFIX
    redis_cli: list[str] = field(default_factory=list)

    def camera_names(self) -> list[str]:
        """Return ``line-a``, ``line-b``, ...: ``line-a`` only shows good parts, the others some defects."""
        return [f"line-{chr(ord('a') + i)}" for i in range(self.cameras)]

    def defect_rates(self) -> dict[str, float]:
        """Return camera -> share of defective parts."""
        return {name: (0.0 if i == 0 else self.defect_rate) for i, name in enumerate(self.camera_names())}


class Demo:
    """One run of the demo; :meth:`run` returns the exit code."""

    def __init__(self, settings: DemoSettings, console: Console | None = None) -> None:
        self.s = settings
        self.console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 160)
        self.stop = threading.Event()
        self.running = False
        self.children: list[Child] = []
        self.embedded: EmbeddedRedis | None = None
        self.redis_pid: int | None = None
        self.client: RedisClient | None = None
        self.tracker: Tracker | None = None
        self.metrics_server: Any = None
        self.metrics: DemoMetrics | None = None
        self.failure: str | None = None
        self.plan: ModelPlan | None = None
        self.model_info: dict[str, Any] = {}
        self.elapsed = 0.0
        self._next_port = settings.metrics_port + 1 if settings.metrics_port > 0 else 0
        self._tmp: Path | None = None

    # ----- set-up -------------------------------------------------------------------------------
    def _workdir(self) -> Path:
        if self.s.workdir is not None:
            self.s.workdir.mkdir(parents=True, exist_ok=True)
            return self.s.workdir
        self._tmp = Path(tempfile.mkdtemp(prefix="dfm-demo-"))
        return self._tmp

    def _start_redis(self) -> RedisSettings:
        if self.s.redis is not None:
            self.console.print(f"Redis: external server {self.s.redis.safe_url()}")
            return self.s.redis
        self.embedded = EmbeddedRedis().start()
        self.redis_pid = self.embedded.proc.pid if self.embedded.proc else None
        self.console.print(
            f"Redis: embedded server {self.embedded.url} (binary {self.embedded.binary},"
            f" pid {self.redis_pid}); it stops when the demo ends"
        )
        return RedisSettings(url=self.embedded.url, prefix=self.s.prefix)

    def _ping(self, redis_settings: RedisSettings) -> None:
        import redis

        assert self.client is not None
        try:
            self.client.ping()
        except redis.RedisError as e:
            raise DfmStreamError(
                f"cannot reach Redis at {redis_settings.safe_url()} ({e}): check the URL and credentials,"
                " or leave --redis out to run an embedded server"
            ) from e

    def _reset_keys(self, redis: RedisSettings) -> None:
        """Delete the demo cameras' own keys (frames, scores, alarm state), so each run starts clean."""
        assert self.client is not None
        names = self.s.camera_names()
        doomed = [
            fn(name, redis.prefix)
            for name in names
            for fn in (keys.frames_key, keys.scores_key, keys.alarm_state_key, keys.seq_key)
        ]
        for key in doomed:  # one key per call: cluster-safe
            self.client.delete(key)
        if self.embedded is None:
            self.console.print(f"cleared the demo cameras' keys on that server: {', '.join(doomed)}")

    def _start_id(self) -> str:
        assert self.client is not None
        secs, usecs = self.client.time()
        return f"{int(secs) * 1000 + int(usecs) // 1000}-0"

    def _metrics_port(self) -> int:
        if self.s.metrics_port <= 0:
            return free_port()
        while not port_is_free(self.s.metrics_host, self._next_port):
            self._next_port += 1
        port, self._next_port = self._next_port, self._next_port + 1
        return port

    def _serve_metrics(self) -> None:
        from dfm_stream.metrics import new_registry, serve

        registry = new_registry()
        self.metrics = DemoMetrics(registry)
        if self.s.metrics_port < 0:
            return
        try:
            self.metrics_server = serve(registry, self.s.metrics_host, self.s.metrics_port, ready=self._ready)
        except OSError as e:
            raise DfmStreamError(
                f"cannot serve the demo's metrics on {self.s.metrics_host}:{self.s.metrics_port} ({e}):"
                " pick another --metrics-port, 0 for a free one, or -1 for none"
            ) from e

    def _ready(self) -> tuple[bool, str]:
        dead = [c.name for c in self.children if c.proc.poll() is not None]
        if dead:
            return False, f"stopped: {', '.join(dead)}"
        return self.running, "running" if self.running else "starting"

    # ----- child processes ----------------------------------------------------------------------
    def _spawn(self, name: str, role: str, args: list[str], logdir: Path) -> Child:
        child = spawn(name, role, args, logdir, self.s.metrics_host, self._metrics_port())
        self.children.append(child)
        return child

    def _wait_ready(self, child: Child) -> None:
        wait_ready(child, self.s.metrics_host, self.stop)

    def _start_pipeline(self, model_path: Path, logdir: Path) -> None:
        rates = self.s.defect_rates()
        size = self.plan.size if self.plan else 128
        worker = self._spawn(
            "worker",
            "worker",
            [
                "work",
                *self.s.redis_cli,
                "--model",
                str(model_path),
                "--cameras",
                ",".join(rates),
                "--device",
                self.s.device,
                "--batch-size",
                str(self.s.batch_size),
                "--max-wait-ms",
                str(self.s.max_wait_ms),
            ],
            logdir,
        )
        with self.console.status("starting the worker (loading the model)..."):
            self._wait_ready(worker)
        readers = []
        for i, (name, rate) in enumerate(rates.items()):
            spec = f"synthetic:seed={self.s.seed + i},defect_rate={rate},fps={self.s.fps},size={size}x{size}"
            args = ["read", *self.s.redis_cli, "--camera", name, "--source", spec]
            readers.append(self._spawn(f"reader-{name}", "reader", args, logdir))
        if self.s.console_port >= 0:  # the web console, read only (no users file)
            readers.append(spawn_console(self.s.redis_cli, logdir, self.s.metrics_host, self.s.console_port))
            self.children.append(readers[-1])
        with self.console.status("starting the camera readers and the console..."):
            for reader in readers:
                self._wait_ready(reader)

    # ----- running ------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.running and not self.stop.is_set():
            self.stop.set()
            return
        raise KeyboardInterrupt

    def _poll(self) -> None:
        import redis

        assert self.tracker is not None
        try:
            self.tracker.poll()
        except redis.RedisError as e:
            log.warning("cannot read the pipeline's streams from Redis (will retry): %s", e)
        if self.metrics is not None:
            self.metrics.update(self.tracker)

    def _check_children(self) -> None:
        for child in self.children:
            if child.proc.poll() is not None and self.failure is None:
                self.failure = (
                    f"{child.name} (pid {child.proc.pid}) exited with code {child.proc.returncode};"
                    f" its log ({child.log_path}) ends with:\n{child.log_tail()}"
                )
                self.stop.set()

    def _loop(self) -> None:
        assert self.tracker is not None
        started = time.monotonic()
        header = self._header()
        next_line = started + 1.0
        live = Live(console=self.console, refresh_per_second=4) if self.s.view else None
        with live or contextlib.nullcontext():
            while not self.stop.is_set():
                self.elapsed = time.monotonic() - started
                if self.elapsed >= self.s.duration:
                    break
                self._poll()
                self._check_children()
                if live is not None:
                    live.update(
                        render(self.tracker, f"{header} · {self.elapsed:.0f}/{self.s.duration:.0f} s")
                    )
                else:
                    for event in self.tracker.new_events:
                        self.console.print(f"event: {event_line(event)}")
                    if time.monotonic() >= next_line:
                        self.console.print(status_line(self.tracker, self.elapsed))
                        next_line += 1.0
                self.stop.wait(0.25)
        self.elapsed = time.monotonic() - started

    def _header(self) -> str:
        plan = self.plan
        model = f"{plan.backbone}/{plan.layer} {plan.size}px" if plan else "?"
        return f"dfm-stream demo · {len(self.s.camera_names())} cameras · {model} · Ctrl-C to stop"

    def _shutdown(self) -> None:
        """Stop readers, let the worker finish what is queued, stop it; then Redis."""
        readers = [c for c in self.children if c.role == "reader" and c.proc.poll() is None]
        for child in readers:  # all at once: the cameras stop together
            child.terminate()
        for child in readers:
            child.stop(READER_STOP_S)
        workers = [c for c in self.children if c.role == "worker" and c.proc.poll() is None]
        if self.tracker is not None and workers and self._redis_alive():
            deadline = time.monotonic() + DRAIN_S
            self._poll()
            while not self.tracker.drained() and time.monotonic() < deadline:
                time.sleep(0.2)
                self._poll()
        for child in self.children:
            child.stop(WORKER_STOP_S)
        if self.tracker is not None and self._redis_alive():
            self._poll()

    def _redis_alive(self) -> bool:
        if self.embedded is None:
            return True
        return self.embedded.proc is not None and self.embedded.proc.poll() is None

    def _close(self) -> None:
        for child in self.children:  # normally all stopped already; this is the safety net
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait(5)
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.client is not None:
            self.client.close()
        if self.embedded is not None:
            self.embedded.close()

    # ----- the whole run ------------------------------------------------------------------------
    def _print_urls(self) -> None:
        host = self.s.metrics_host
        if self.metrics_server is not None:
            self.console.print(f"metrics: http://{host}:{self.metrics_server.port}/metrics (demo)")
        for child in self.children:
            path, what = ("/", "console") if child.role == "console" else ("/metrics", "metrics")
            self.console.print(f"{what}: http://{host}:{child.metrics_port}{path} ({child.name})")

    def _prepare(self, workdir: Path) -> Path:
        self._serve_metrics()  # first: a port already taken fails before anything else starts
        redis_settings = self._start_redis()
        if self.embedded is not None:
            self.s = replace(self.s, redis_cli=["--redis", self.embedded.url, *self.s.redis_cli])
        self.client = connect(redis_settings)
        self._ping(redis_settings)
        self._reset_keys(redis_settings)
        self.plan = plan_model(self.s)
        model_path = workdir / "demo-model.safetensors"
        self.model_info = fit_demo_model(self.plan, self.s, model_path, self.console)
        self.tracker = Tracker(self.client, self.s.defect_rates(), redis_settings.prefix, self._start_id())
        return model_path

    def run(self) -> int:
        """Run the demo from start to summary; return the exit code."""
        workdir = self._workdir()
        logdir = workdir / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        interrupted = False
        try:
            model_path = self._prepare(workdir)
            self._start_pipeline(model_path, logdir)
            self._print_urls()
            self.console.print(f"logs: {logdir}")
            if self._tmp is not None:
                self.console.print(f"  (a temporary folder, removed when the demo ends: {_KEEP})")
            self.running = True
            self._loop()
        except KeyboardInterrupt:
            interrupted = True
            self.console.print("interrupted: shutting down")
        except DfmStreamError:
            if self._tmp is not None and not self.children:  # nothing ran: nothing to inspect
                shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        finally:
            self.running = False
            try:
                self._shutdown()
            finally:
                self._close()
                for sig, handler in old.items():
                    signal.signal(sig, handler)
        return self._finish(workdir, logdir, interrupted)

    def _finish(self, workdir: Path, logdir: Path, interrupted: bool) -> int:
        summary = self.summary(interrupted)
        if self.tracker is not None:
            print_summary(summary, self.console)
            self._print_verdict(summary)
        if self.s.summary_json is not None:
            self.s.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
            self.console.print(f"summary written to {self.s.summary_json}")
        if self.failure:
            self.console.print(f"[red]error:[/red] {self.failure}", markup=True)
            self.console.print(f"work folder kept for inspection: {workdir}")
            return 1
        killed = [c.name for c in self.children if c.killed]
        if killed:
            self.console.print(f"killed after SIGTERM timed out: {', '.join(killed)}; logs kept in {logdir}")
        elif self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self.console.print(f"removed the temporary work folder {self._tmp}")
            self.console.print(f"  ({_KEEP})")
        else:
            self.console.print(f"model and logs: {workdir} (logs in {logdir})")
        return 130 if interrupted else 0

    def _print_verdict(self, summary: dict[str, Any]) -> None:
        t = summary["totals"]
        self.console.print(
            f"{t['frames_scored']} frames scored; {t['defects_injected']} defective parts shown,"
            f" {t['defects_detected']} detected; {t['alarms_raised']} alarms raised;"
            f" {t['false_positive_frames']} good frames over the threshold."
            f" Weights: {self.model_info.get('weights_note', '?')}"
        )

    def summary(self, interrupted: bool) -> dict[str, Any]:
        """Return the run's summary (what ``--summary-json`` writes)."""
        data: dict[str, Any] = self.tracker.summary() if self.tracker else {"cameras": {}, "totals": {}}
        data["duration_s"] = round(self.elapsed, 2)
        data["interrupted"] = interrupted
        data["failure"] = self.failure
        data["killed"] = [c.name for c in self.children if c.killed]
        data["model"] = self.model_info
        data["processes"] = [
            {"name": c.name, "role": c.role, "pid": c.proc.pid, "exit_code": c.proc.returncode}
            for c in self.children
        ]
        data["redis"] = {
            "embedded": self.embedded is not None,
            "url": self.embedded.url
            if self.embedded
            else (self.s.redis.safe_url() if self.s.redis else None),
            "pid": self.redis_pid,
            "port": self.embedded.port if self.embedded else None,
        }
        host = self.s.metrics_host
        data["metrics_urls"] = [
            f"http://{host}:{c.metrics_port}/metrics" for c in self.children if c.role != "console"
        ]
        data["console_url"] = next(
            (f"http://{host}:{c.metrics_port}/" for c in self.children if c.role == "console"), None
        )
        if self.metrics_server is not None:
            data["metrics_urls"].insert(0, f"http://{host}:{self.metrics_server.port}/metrics")
        return data


def run_demo(settings: DemoSettings, console: Console | None = None) -> int:
    """Run the demo with ``settings``; return the process exit code."""
    return Demo(settings, console).run()

"""Soak mode: run the whole pipeline for a long time and record the memory of every process.

``dfm-stream soak --duration S`` starts a Redis server (embedded, unless ``--redis``), one reader
process with ``--cameras`` synthetic cameras, and ``--workers`` worker processes scoring them with a
tiny model (fitted on good synthetic frames at start, unless ``--model``). Every ``--rss-interval``
seconds it reads the resident set size of each process from ``/proc/<pid>/status`` (``VmRSS``).
At the end it stops everything (SIGTERM), and reports per process the RSS at start, after warm-up,
at the end and its peak, plus the pipeline's counts (frames published, scored, dropped, pending),
as a table and, with ``--out``, as JSON.

Growth is judged after warm-up (the first third of the run by default: imports, model load,
allocator pools and streams filling up to their MAXLEN all happen there): ``growth`` is the median
RSS of the last fifth of the samples minus the median of the first fifth after warm-up, so one
noisy sample does not decide. ``--max-growth-mib`` turns that into an exit code for CI.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MIB = 2**20


@dataclass
class SoakSettings:
    """What to run and for how long (the options of ``dfm-stream soak``)."""

    duration_s: float
    cameras: int = 4
    rss_interval_s: float = 5.0
    workers: int = 1
    fps: float = 10.0
    size: int = 64
    redis_url: str | None = None
    durability: str = "local"
    model: Path | None = None
    workdir: Path | None = None
    warmup_fraction: float = 1 / 3
    max_growth_mib: float | None = None
    claim_idle_s: float = 5.0


def read_rss(pid: int) -> int | None:
    """Return the resident set size of ``pid`` in bytes (``VmRSS``), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class ProcessTrace:
    """One process of the soak and its RSS samples ``(seconds since start, bytes)``."""

    name: str
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)
    exit_code: int | None = None

    def sample(self, t: float) -> bool:
        """Record the RSS now; return False when the process is gone."""
        rss = read_rss(self.pid)
        if rss is None:
            return False
        self.samples.append((round(t, 3), rss))
        return True

    def summary(self, warmup_s: float) -> dict[str, Any]:
        """Return start / warm / end / peak RSS (bytes) and the growth after warm-up."""
        values = [rss for _, rss in self.samples]
        after = [rss for t, rss in self.samples if t >= warmup_s] or values[-1:]
        window = max(1, len(after) // 5)
        warm = int(statistics.median(after[:window])) if after else None
        end = int(statistics.median(after[-window:])) if after else None
        return {
            "pid": self.pid,
            "exit_code": self.exit_code,
            "samples": len(values),
            "rss_start": values[0] if values else None,
            "rss_warm": warm,
            "rss_end": end,
            "rss_peak": max(values) if values else None,
            "growth_after_warmup": None if warm is None or end is None else end - warm,
        }


def fit_tiny_model(path: Path, size: int, seed: int = 0, n_train: int = 32) -> Path:
    """Fit a resnet18/layer1 model (random weights) on good synthetic frames; write its artifact."""
    import dataclasses

    import torch

    from dfm_stream.artifact import ArtifactInfo, save_artifact
    from dfm_stream.images import preprocess
    from dfm_stream.model.trainer import Dfm
    from dfm_stream.sources.synthetic import SyntheticSource

    torch.manual_seed(seed)
    source = SyntheticSource(seed=seed + 1000, defect_rate=0.0, size=(size, size), cycle=4)
    source.open()
    frames = [source.read().image for _ in range(n_train)]
    batch = preprocess(frames, (size, size))
    trainer = Dfm("resnet18", "layer1", pre_trained=False, pooling_kernel_size=2, pca_level=0.9)
    model = trainer.fit([batch])
    with torch.inference_mode():
        scores = model(batch).pred_score
    info = ArtifactInfo.for_model(model, (size, size), trainer.n_train)
    high = float(scores.max())
    info = dataclasses.replace(info, threshold=high * 1.2, score_min=float(scores.min()), score_max=high * 2)
    save_artifact(path, model, info)
    return path


def _reader_config(settings: SoakSettings) -> str:
    lines = ["[reader]", f"fps = {float(settings.fps)}", ""]
    for i in range(settings.cameras):
        lines += [
            "[[cameras]]",
            f'id = "soak{i}"',
            f'source = "synthetic:seed={i},defect_rate=0.05,size={settings.size}x{settings.size}'
            f',fps={float(settings.fps)}"',
            "",
        ]
    return "\n".join(lines)


class _Children:
    """The processes a soak starts; all are stopped by :meth:`stop_all`, whatever happens."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log_path = self.logdir / f"{name}.log"
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dfm_stream.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.procs[name] = proc
        log.info("started %s (pid %d), log %s", name, proc.pid, log_path)
        return proc

    def stop_all(self, timeout: float = 20.0) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return {name: int(proc.returncode) for name, proc in self.procs.items()}


def metrics_port(log_path: Path) -> int | None:
    """Return the /metrics port a dfm-stream process logged at start (``metrics on http://h:PORT``)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    marker = "metrics on http://"
    for line in text.splitlines():
        if marker in line:
            address = line.split(marker, 1)[1].split("/", 1)[0]
            return int(address.rsplit(":", 1)[1])
    return None


def scrape_totals(port: int, names: tuple[str, ...]) -> dict[str, float]:
    """Return the sum over labels of each counter/gauge in ``names`` from ``/metrics`` on ``port``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name in totals:
                totals[s.name] += s.value
    return totals


READER_COUNTERS = (
    "dfm_reader_frames_captured_total",
    "dfm_reader_frames_published_total",
    "dfm_reader_frames_dropped_total",
)
WORKER_COUNTERS = (
    "dfm_worker_frames_scored_total",
    "dfm_worker_frames_dropped_total",
    "dfm_worker_deadlettered_total",
    "dfm_worker_duplicates_suppressed_total",
    "dfm_worker_loop_errors_total",
)


def _stream_counts(url: str, cameras: list[str]) -> dict[str, Any]:
    """Return scores written, pending, undelivered (lag) and dead letters, and Redis used_memory."""
    import redis

    from dfm_stream import keys, replies
    from dfm_stream.connect import RedisSettings, connect

    client = connect(RedisSettings(url=url), socket_timeout=5)
    out: dict[str, Any] = {"scores": 0, "pending": 0, "lag": 0, "deadletter": 0}
    try:
        for camera in cameras:
            out["scores"] += client.xlen(keys.scores_key(camera))
            if not client.exists(keys.frames_key(camera)):
                continue
            for group in client.xinfo_groups(keys.frames_key(camera)):
                out["pending"] += int(group["pending"])
                # counted, not XINFO's lag (Redis 7.0 overstates it after entries were trimmed)
                last = group["last-delivered-id"]
                after = replies.xrange(client, keys.frames_key(camera), b"(" + last, "+")
                out["lag"] += len(after)
        out["deadletter"] = client.xlen(keys.deadletter_key())
        out["used_memory"] = int(client.info("memory")["used_memory"])
    except redis.RedisError as e:
        log.warning("could not read the stream counts: %s", e)
    finally:
        client.close()
    return out


def _sample_loop(
    settings: SoakSettings, traces: list[ProcessTrace], children: _Children, start: float
) -> str | None:
    """Sample every process until the duration passes; return the name of one that died, if any."""
    end = start + settings.duration_s
    while True:
        now = time.monotonic()
        for trace in traces:
            if not trace.sample(now - start):
                return trace.name
        for name, proc in children.procs.items():
            if proc.poll() is not None:
                return name
        if now >= end:
            return None
        time.sleep(min(settings.rss_interval_s, max(0.0, end - now)))


def _start_pipeline(
    settings: SoakSettings, url: str, model: Path, workdir: Path, children: _Children
) -> None:
    config = workdir / "cameras.toml"
    config.write_text(_reader_config(settings), encoding="utf-8")
    common = ["--redis", url, "--durability", settings.durability, "--metrics-port", "0"]
    children.start("reader", ["read", *common, "--config", str(config)])
    cameras = ",".join(f"soak{i}" for i in range(settings.cameras))
    worker_args = ["work", *common, "--model", str(model), "--cameras", cameras, "--device", "cpu"]
    worker_args += ["--claim-idle", str(settings.claim_idle_s)]
    for i in range(settings.workers):
        children.start(f"worker{i}", worker_args)


def _scrape_all(children: _Children) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in children.procs:
        port = metrics_port(children.logdir / f"{name}.log")
        if port is None:
            continue
        try:
            out[name] = scrape_totals(port, READER_COUNTERS if name == "reader" else WORKER_COUNTERS)
        except OSError as e:
            log.warning("could not scrape %s on port %d: %s", name, port, e)
    return out


def run_soak(settings: SoakSettings) -> dict[str, Any]:
    """Run the soak and return its report (see the module docstring)."""
    from dfm_stream.embedded_redis import EmbeddedRedis

    tmp = None if settings.workdir else tempfile.TemporaryDirectory(prefix="dfm-soak-")
    workdir = Path(settings.workdir or tmp.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    server = None
    children = _Children(workdir)
    traces: list[ProcessTrace] = []
    try:
        url = settings.redis_url
        if url is None:
            server = EmbeddedRedis(workdir=workdir / "redis")
            server.dir.mkdir(exist_ok=True)
            server.start()
            url = server.url
            traces.append(ProcessTrace("redis-server", server.proc.pid))  # type: ignore[union-attr]
        model = settings.model or fit_tiny_model(workdir / "soak-model.safetensors", settings.size)
        start = time.monotonic()
        _start_pipeline(settings, url, model, workdir, children)
        traces += [ProcessTrace(name, proc.pid) for name, proc in children.procs.items()]
        died = _sample_loop(settings, traces, children, start)
        elapsed = time.monotonic() - start
        metrics = _scrape_all(children)
        counts = _stream_counts(url, [f"soak{i}" for i in range(settings.cameras)])
        codes = children.stop_all()
        tails = {n: _tail(workdir / f"{n}.log") for n, c in codes.items() if c != 0 or n == died}
    finally:
        children.stop_all()
        if server is not None:
            server.close()
        if tmp is not None:
            tmp.cleanup()
    for trace in traces:
        trace.exit_code = codes.get(trace.name)
    report = _report(settings, traces, elapsed, died, metrics, counts, workdir if tmp is None else None)
    report["log_tails"] = tails
    return report


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


def _report(
    settings: SoakSettings,
    traces: list[ProcessTrace],
    elapsed: float,
    died: str | None,
    metrics: dict[str, dict[str, float]],
    counts: dict[str, Any],
    workdir: Path | None,
) -> dict[str, Any]:
    warmup_s = settings.duration_s * settings.warmup_fraction
    processes = {t.name: {**t.summary(warmup_s), "rss": t.samples} for t in traces}
    growths = [p["growth_after_warmup"] or 0 for p in processes.values()]
    ok = died is None and all(p["exit_code"] in (0, None) for p in processes.values())
    if settings.max_growth_mib is not None and max(growths, default=0) > settings.max_growth_mib * MIB:
        ok = False
    return {
        "ok": ok,
        "duration_s": round(elapsed, 3),
        "warmup_s": round(warmup_s, 3),
        "cameras": settings.cameras,
        "workers": settings.workers,
        "fps": settings.fps,
        "size": settings.size,
        "died": died,
        "max_growth_mib": settings.max_growth_mib,
        "processes": processes,
        "metrics": metrics,
        "streams": counts,
        "workdir": str(workdir) if workdir else None,
    }


def format_report(report: dict[str, Any]) -> str:
    """Return the report as a short text table (RSS in MiB)."""

    def mib(value: int | None) -> str:
        return "-" if value is None else f"{value / MIB:8.1f}"

    lines = [
        f"soak: {report['duration_s']:.0f} s, {report['cameras']} cameras, {report['workers']} worker(s),"
        f" warm-up {report['warmup_s']:.0f} s",
        f"{'process':<14} {'start':>8} {'warm':>8} {'end':>8} {'peak':>8} {'growth':>8}  exit",
    ]
    for name, p in report["processes"].items():
        growth = p["growth_after_warmup"]
        lines.append(
            f"{name:<14} {mib(p['rss_start'])} {mib(p['rss_warm'])} {mib(p['rss_end'])} {mib(p['rss_peak'])}"
            f" {'-' if growth is None else f'{growth / MIB:+8.1f}'}  {p['exit_code']}"
        )
    s = report["streams"]
    lines.append(
        f"scores written {s.get('scores')}, pending {s.get('pending')}, lag {s.get('lag')},"
        f" dead-lettered {s.get('deadletter')}, Redis used_memory {mib(s.get('used_memory')).strip()} MiB"
    )
    if report["died"]:
        lines.append(f"FAILED: {report['died']} exited during the soak (see its log)")
    lines.append("result: " + ("ok" if report["ok"] else "FAILED"))
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write the report as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")

"""Benchmark stages that go through Redis: the full pipeline, transport only, and latency under load.

* ``pipeline``: a backlog of pre-encoded JPEG frames in Redis, then ``dfm-stream work``
  process(es) score it; throughput is read from the score stream (``scored_ts`` of the scores
  after the first batches, so worker start-up and warm-up are not counted).
* ``transport``: the same backlog through the worker's own consumer, decoder and publisher
  (:class:`~dfm_stream.consumer.StreamConsumer`, :class:`~dfm_stream.inference.Decoder`,
  :class:`~dfm_stream.publisher.Publisher`) with no model: what Redis, msgpack and JPEG decoding
  cost per frame.
* ``latency``: frames paced in real time at a fraction of the measured capacity; percentiles of
  the ``latency_ms`` the worker writes into every score (capture -> published), and of part
  inspection jobs run meanwhile on the first camera (trigger -> result).

With ``durability="replicated"`` (``dfm-stream bench --durability replicated``, against a Redis
with a replica) the workers and the transport stage's publisher confirm every publish with
``WAIT 1``, and the latency stage's sender confirms every frame as a reader does.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.cluster import RedisCluster

from dfm_stream import keys, replies
from dfm_stream.bench.env import percentile
from dfm_stream.connect import RedisClient
from dfm_stream.errors import DfmStreamError
from dfm_stream.frame_codec import encode_frame
from dfm_stream.replication import write_confirmed
from dfm_stream.wire import FIELD, FrameMsg, ScoreMsg, ScoreStatus

log = logging.getLogger(__name__)

PUSH_CHUNK = 200
"""Frames per pipelined XADD round trip when a backlog is written."""
JOB_TIMEOUT_S = 2.0
"""Part jobs of the latency stage wait this long for frames, plus three of the camera's frame
intervals (a slow paced camera must not turn jobs into timeouts)."""


@dataclass
class StreamSetup:
    """What every Redis stage shares: the server, the frames to send and how workers are started."""

    client: RedisClient
    url: str
    base_prefix: str
    cameras: list[str]
    templates: dict[str, list[FrameMsg]]
    artifact: Path
    logdir: Path
    worker_args: list[str] = field(default_factory=list)
    workers: int = 1
    batch_size: int = 8
    durability: str = "local"
    """``replicated``: the paced sender confirms each frame with ``WAIT 1``, as a reader does."""

    def prefix(self, stage: str, rep: int) -> str:
        """Return the key prefix of one stage run (every run writes its own keys)."""
        return f"{self.base_prefix}-{stage}{rep}"


def make_templates(
    frames_bgr: list[Any], cameras: list[str], jpeg_quality: int = 90
) -> dict[str, list[FrameMsg]]:
    """Encode each frame once per camera as JPEG; sending only changes ``seq``/``ts``/``session``."""
    out: dict[str, list[FrameMsg]] = {}
    for camera in cameras:
        out[camera] = [encode_frame(f, camera, 0, "", "jpeg", jpeg_quality, 0) for f in frames_bgr]
    return out


def _frame_bytes(template: FrameMsg, seq: int, session: str) -> bytes:
    return dataclasses.replace(template, seq=seq, session=session, ts=time.time_ns()).to_bytes()


def push_backlog(setup: StreamSetup, prefix: str, n: int, session: str) -> None:
    """Write ``n`` frames round-robin over the cameras (seq per camera), in pipelined chunks."""
    seqs = dict.fromkeys(setup.cameras, 0)
    pipe = setup.client.pipeline(transaction=False)
    for i in range(n):
        camera = setup.cameras[i % len(setup.cameras)]
        templates = setup.templates[camera]
        data = _frame_bytes(templates[i % len(templates)], seqs[camera], session)
        seqs[camera] += 1
        pipe.xadd(keys.frames_key(camera, prefix), {FIELD: data})
        if (i + 1) % PUSH_CHUNK == 0:
            pipe.execute()
    pipe.execute()


def count_scores(client: RedisClient, prefix: str, cameras: list[str]) -> int:
    """Return how many score entries the cameras' score streams hold."""
    pipe = client.pipeline(transaction=False)
    for camera in cameras:
        pipe.xlen(keys.scores_key(camera, prefix))
    return int(sum(pipe.execute()))


def read_scores(client: RedisClient, prefix: str, cameras: list[str]) -> list[ScoreMsg]:
    """Read every score message of the cameras (oldest first per camera)."""
    out: list[ScoreMsg] = []
    for camera in cameras:
        key = keys.scores_key(camera, prefix)
        start = "-"
        while True:
            rows = replies.xrange(client, key, start, "+", count=2000)
            if not rows:
                break
            out.extend(ScoreMsg.from_bytes(r[1][FIELD.encode()]) for r in rows)
            if len(rows) < 2000:
                break
            start = "(" + rows[-1][0].decode()
    return out


def delete_prefix(client: RedisClient, prefix: str) -> None:
    """Remove every key under ``prefix`` (the keys of one stage run)."""
    batch = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)


def throughput_from_scores(scored_ts_ns: list[int], skip: int) -> float:
    """Return frames/s between the ``skip``-th score and the last (frames scored after that point).

    Scores of one batch share a publish time, so the rate counts the scores published strictly
    after the reference score and divides by the time from it to the last one.
    """
    ordered = sorted(scored_ts_ns)
    if len(ordered) < 2:
        raise DfmStreamError(f"bench: only {len(ordered)} scores arrived; cannot compute a rate")
    skip = min(max(1, skip), len(ordered) - 1)
    t0 = ordered[skip - 1]
    while skip < len(ordered) - 1 and ordered[skip] == t0:
        skip += 1
    later = [t for t in ordered if t > t0]
    span = (ordered[-1] - t0) / 1e9
    if not later or span <= 0:
        raise DfmStreamError("bench: all scores were published at once; use more frames (--duration)")
    return len(later) / span


def batch_rates(scored_ts_ns: list[int], batch_size: int, skip: int) -> dict[str, float | None]:
    """Return frames/s from the median and the shortest interval between full batches.

    With a backlog every batch is full and batches are published in order, so the sorted score
    times, cut into runs of ``batch_size`` after the first ``skip`` scores, are the batches; the
    interval between the ends of two consecutive runs is one batch's time in the pipeline.
    """
    ordered = sorted(scored_ts_ns)[skip:]
    ends = [ordered[i + batch_size - 1] for i in range(0, len(ordered) - batch_size + 1, batch_size)]
    gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(ends) if b > a]
    if not gaps:
        return {"median_rate": None, "best_rate": None}
    return {"median_rate": batch_size / statistics.median(gaps), "best_rate": batch_size / min(gaps)}


class WorkerGroup:
    """``dfm-stream work`` child processes on one prefix; stopped with SIGTERM (killed if stuck)."""

    def __init__(self, setup: StreamSetup, prefix: str, tag: str) -> None:
        self.setup = setup
        self.prefix = prefix
        self.tag = tag
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def command(self) -> list[str]:
        """Return one worker's command line."""
        s = self.setup
        return [
            sys.executable, "-m", "dfm_stream.cli", "work",
            "--redis", s.url, "--prefix", self.prefix, "--model", str(s.artifact),
            "--cameras", ",".join(s.cameras), *s.worker_args,
        ]  # fmt: skip

    def start(self) -> WorkerGroup:
        """Start the worker processes (their output goes to log files)."""
        self.setup.logdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for i in range(self.setup.workers):
            path = self.setup.logdir / f"{self.tag}-worker{i}.log"
            with path.open("wb") as out:
                proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env)
            self.procs.append(proc)
            self.logs.append(path)
        return self

    def check_alive(self) -> None:
        """Raise with the log tail when a worker exited."""
        for proc, path in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                tail = path.read_text(errors="replace")[-3000:]
                raise DfmStreamError(f"bench: worker exited with code {proc.returncode}; log {path}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM every worker; SIGKILL one that does not exit within 30 s."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def __enter__(self) -> WorkerGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_scores(
    setup: StreamSetup, prefix: str, expected: int, timeout: float, group: WorkerGroup | None = None
) -> int:
    """Poll until ``expected`` scores exist; raise when a worker died or ``timeout`` s passed."""
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = count_scores(setup.client, prefix, setup.cameras)
        if count >= expected:
            return count
        if group is not None:
            group.check_alive()
        time.sleep(0.1)
    raise DfmStreamError(f"bench: {count} of {expected} scores after {timeout:.0f} s (prefix {prefix})")


def pipeline_run(setup: StreamSetup, rep: int, n_frames: int, expected_rate: float) -> dict[str, Any]:
    """Score a backlog of ``n_frames`` with the worker(s); return frames/s from the score stream."""
    prefix = setup.prefix("pipeline", rep)
    push_backlog(setup, prefix, n_frames, session=f"pipeline{rep}")
    try:
        with WorkerGroup(setup, prefix, f"pipeline{rep}") as group:
            timeout = 120 + 5 * n_frames / max(expected_rate, 0.1)
            wait_for_scores(setup, prefix, n_frames, timeout, group)
        scores = read_scores(setup.client, prefix, setup.cameras)
    finally:
        delete_prefix(setup.client, prefix)
    skip = 2 * setup.batch_size * setup.workers
    times = [s.scored_ts for s in scores]
    return {
        "rate": throughput_from_scores(times, skip),
        **(batch_rates(times, setup.batch_size, skip) if setup.workers == 1 else {}),
        "frames": len(scores),
        "not_scored": sum(1 for s in scores if s.status != ScoreStatus.SCORED),
    }


def transport_run(setup: StreamSetup, rep: int, n_frames: int) -> dict[str, Any]:
    """Push a backlog through consumer -> decoder -> publisher with no model; frames/s from scores."""
    prefix = setup.prefix("transport", rep)
    push_backlog(setup, prefix, n_frames, session=f"transport{rep}")
    try:
        wall = run_echo_consumer(
            setup.client, prefix, setup.cameras, setup.batch_size, n_frames, durability=setup.durability
        )
        scores = read_scores(setup.client, prefix, setup.cameras)
    finally:
        delete_prefix(setup.client, prefix)
    return {
        "rate": throughput_from_scores([s.scored_ts for s in scores], 2 * setup.batch_size),
        "frames": len(scores),
        "loop_rate": n_frames / wall,
    }


def run_echo_consumer(
    client: RedisClient,
    prefix: str,
    cameras: list[str],
    batch_size: int,
    total: int,
    timeout: float = 600,
    durability: str = "local",
    min_size: tuple[int, int] | None = None,
) -> float:
    """Read, decode and publish (score 0, no model) ``total`` frames as the worker does; return seconds.

    The worker's own parts and threads: this thread reads (:class:`StreamConsumer`) and decodes
    (:class:`Decoder`, its thread pool) like the worker's fetch thread, and a
    :class:`PublisherThread` publishes and acks, so only the model is missing. ``min_size``
    decodes at model size (``work --decode-at-model-size``) for a model of that input.
    """
    import torch

    from dfm_stream.consumer import StreamConsumer
    from dfm_stream.inference import DecodedFrame, Decoder, parse_entry
    from dfm_stream.publisher import Publisher, PublisherThread

    consumer = StreamConsumer(client, prefix=prefix, cluster=isinstance(client, RedisCluster))
    consumer.add_cameras(cameras)
    decoder = Decoder(torch.device("cpu"))
    publisher = PublisherThread(
        Publisher(client, prefix=prefix, durability=durability), lambda _items, _result: None
    )
    done = 0
    start = time.perf_counter()
    try:
        while done < total:
            if time.perf_counter() - start > timeout:
                raise DfmStreamError(f"bench transport: {done} of {total} frames after {timeout} s")
            result = consumer.read(batch_size)
            if not result.entries:
                consumer.wait(100)
                continue
            decoded = decoder.decode([(e, parse_entry(e)) for e in result.entries], min_size)
            publisher.submit([_echo_item(d, consumer.name) for d in decoded if isinstance(d, DecodedFrame)])
            done += len(result.entries)
    finally:
        publisher.close()
        decoder.close()
    return time.perf_counter() - start


def _echo_item(frame: Any, worker: str) -> Any:
    from dfm_stream.publisher import AlarmBit, ScoredItem, frame_score

    template = frame_score(frame.entry, frame.msg, worker, "none", 0.0, None)
    return ScoredItem(template=template, entry_id=frame.entry.entry_id, alarm_bit=AlarmBit.NORMAL)


def _paced_send(setup: StreamSetup, prefix: str, rate: float, duration: float, session: str) -> int:
    """XADD frames at ``rate`` per second (round-robin cameras) for ``duration`` s; return the count."""
    n = max(1, round(rate * duration))
    seqs = dict.fromkeys(setup.cameras, 0)
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        camera = setup.cameras[i % len(setup.cameras)]
        templates = setup.templates[camera]
        data = _frame_bytes(templates[i % len(templates)], seqs[camera], session)
        seqs[camera] += 1
        key = keys.frames_key(camera, prefix)
        if setup.durability == "replicated":
            write_confirmed(setup.client, key, lambda pipe: pipe.xadd(key, {FIELD: data}))  # noqa: B023
        else:
            setup.client.xadd(key, {FIELD: data})
    return n


def latency_run(
    setup: StreamSetup, rep: int, capacity: float, loads: list[float], duration: float
) -> dict[str, dict[str, Any]]:
    """For each load (fraction of ``capacity``), pace frames in real time; return latency percentiles."""
    prefix = setup.prefix("latency", rep)
    out: dict[str, dict[str, Any]] = {}
    job_ms: dict[float, list[float]] = {}
    job_errors: dict[float, list[str]] = {}
    try:
        with WorkerGroup(setup, prefix, f"latency{rep}") as group:
            warm = 2 * setup.batch_size * setup.workers
            push_backlog(setup, prefix, warm, session="warmup")
            expected = wait_for_scores(setup, prefix, warm, 120 + 5 * warm / max(capacity, 0.1), group)
            for load in loads:
                rate = load * capacity
                interval_s = len(setup.cameras) / rate  # one camera's frame interval
                with _InspectWhile(setup, prefix, timeout_s=JOB_TIMEOUT_S + 3 * interval_s) as jobs:
                    sent = _paced_send(setup, prefix, rate, duration, session=f"load{load:g}")
                job_ms[load] = jobs.latencies_ms
                job_errors[load] = jobs.errors
                expected += sent
                wait_for_scores(setup, prefix, expected, 60 + 5 * sent / max(capacity, 0.1), group)
        scores = read_scores(setup.client, prefix, setup.cameras)
    finally:
        delete_prefix(setup.client, prefix)
    for load in loads:
        lat = [
            s.latency_ms for s in scores if s.session == f"load{load:g}" and s.status == ScoreStatus.SCORED
        ]
        out[f"{round(load * 100)}"] = {
            "load": load,
            "offered_fps": load * capacity,
            "frames": len(lat),
            "p50_ms": percentile(lat, 50),
            "p95_ms": percentile(lat, 95),
            "p99_ms": percentile(lat, 99),
            "max_ms": max(lat) if lat else None,
        }
        job_lat = job_ms.get(load, [])
        interval_ms = 1000 * len(setup.cameras) / max(load * capacity, 1e-9)  # one camera's frame interval
        p99 = out[f"{round(load * 100)}"]["p99_ms"]
        out[f"{round(load * 100)}"].update(
            inspect_jobs=len(job_lat),
            inspect_errors=len(job_errors.get(load, [])),
            inspect_error_reasons=sorted(set(job_errors.get(load, []))),
            inspect_p50_ms=percentile(job_lat, 50),
            inspect_p99_ms=percentile(job_lat, 99),
            inspect_max_ms=max(job_lat) if job_lat else None,
            inspect_budget_ms=interval_ms + p99 + 50 if p99 is not None else None,
        )
    return out


class _InspectWhile:
    """Part inspection jobs on the first camera, one after the other, while the block runs.

    ``latencies_ms``: trigger -> result of every job that ended ``ok``/``ng``; #17's bound is the
    camera's frame interval + the pipeline's p99 + 50 ms. ``errors``: the reason of every job that
    ended in ``error`` (counted, so a slow pipeline cannot hide its jobs by timing them out).
    """

    def __init__(self, setup: StreamSetup, prefix: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
        from dfm_stream.inspection import Inspector

        self.inspector = Inspector(setup.client, prefix)
        self.camera = setup.cameras[0]
        self.timeout_s = timeout_s
        self.latencies_ms: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-inspect", daemon=True)

    def _run(self) -> None:
        from dfm_stream.inspection import JobRequest

        while not self._stop.is_set():
            result = self.inspector.inspect(
                JobRequest(self.camera, part_id="bench", timeout_s=self.timeout_s, source="api")
            )
            if result.state != "error":
                self.latencies_ms.append(result.latency_ms)
            else:
                self.errors.append(result.reason or "error")
            self._stop.wait(0.05)

    def __enter__(self) -> _InspectWhile:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

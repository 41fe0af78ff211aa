"""Fault scenarios with real processes: workers killed, Redis killed, overload, a frozen consumer.

Every test runs real ``redis-server``, ``dfm-stream read`` and ``dfm-stream work`` processes on
loopback, with a tiny model (``worker_helpers.artifact``: resnet18/layer2, random weights, 64 px),
few frames, and short ``--claim-idle``; each is bounded in time by ``wait_until`` deadlines.
The invariant checked at the end of each: every frame that is in a stream has exactly one accepted
score entry (counted per ``frame_id``, so a duplicate would be seen), nothing is left pending, and
whatever did not get scored is accounted for by a metric.

A camera stream lost and restored (``camera_down`` / ``camera_up`` events, ``dfm_camera_up``,
reconnects) is covered by ``test_reader_network.py`` and ``test_reader_rtsp.py`` with a real ffmpeg
/ RTSP server; it is not repeated here.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
from chaos_helpers import group_pending, http_get, scrape, stream_ids, undelivered, wait_metrics_port
from chaos_helpers import score_counts as counts_of
from support import Processes, wait_until
from worker_helpers import Artifact, make_worker, push_frames, scores

from dfm_stream import keys
from dfm_stream.consumer import StreamConsumer
from dfm_stream.embedded_redis import EmbeddedRedis
from dfm_stream.wire import FIELD, FrameMsg


def write_config(path: Path, cameras: list[str], reader: str) -> Path:
    """A reader config: synthetic 64 px cameras with the ``[reader]`` settings given as TOML text."""
    text = "[reader]\n" + reader + "\n"
    for i, cam in enumerate(cameras):
        text += f'[[cameras]]\nid = "{cam}"\nsource = "synthetic:seed={i},size=64x64,defect_rate=0.1"\n'
    path.write_text(text)
    return path


def worker_args(url: str, artifact: Artifact, cameras: list[str], *extra: str) -> list[str]:
    """``dfm-stream work`` on ``cameras`` with the tiny model on the CPU."""
    return [
        *("work", "--redis", url, "--model", str(artifact.path), "--device", "cpu"),
        *("--cameras", ",".join(cameras), *extra),
    ]


def _entry_key(frame_id: str) -> tuple[int, int]:
    ms, _, seq = frame_id.rsplit(":", 1)[1].partition("-")
    return int(ms), int(seq)


def all_scored_once(client: redis.Redis, cameras: list[str]) -> bool:
    """True when every frame in every stream has a score and nothing is pending or undelivered."""
    for cam in cameras:
        ids = stream_ids(client, cam)
        if not ids or not set(ids) <= set(counts_of(client, cam)):
            return False
        if group_pending(client, cam) or undelivered(client, cam):
            return False
    return True


def state(client: redis.Redis, cameras: list[str]) -> str:
    """Per camera: frames, frames without a score, duplicated scores, pending, undelivered (for failures)."""
    rows = []
    for cam in cameras:
        ids, counts = stream_ids(client, cam), counts_of(client, cam)
        rows.append(
            f"{cam}: frames={len(ids)} unscored={len(set(ids) - set(counts))}"
            f" duplicated={sum(1 for n in counts.values() if n > 1)} pending={group_pending(client, cam)}"
            f" undelivered={undelivered(client, cam)}"
        )
    return "; ".join(rows) + f"; dead letters={client.xlen(keys.deadletter_key())}"


def wait_all_scored(client: redis.Redis, cameras: list[str], timeout: float, what: str) -> None:
    """Wait until :func:`all_scored_once`; on timeout fail with the per-camera state."""
    deadline = time.monotonic() + timeout
    while not all_scored_once(client, cameras):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}: {state(client, cameras)}")
        time.sleep(0.1)


def assert_exactly_one_score_per_frame(client: redis.Redis, cameras: list[str]) -> int:
    """Every frame in each stream has exactly one accepted score, and no score is for another frame.

    Scores of frames that MAXLEN trimmed from the frame stream after they were scored stay in the
    score stream; those must be older than the oldest frame still in the stream.
    """
    total = 0
    for cam in cameras:
        ids = stream_ids(client, cam)
        counts = counts_of(client, cam)
        duplicated = {f: n for f, n in counts.items() if n > 1}
        assert not duplicated, f"camera {cam}: frames with more than one accepted score: {duplicated}"
        assert set(ids) <= set(counts), f"camera {cam}: {len(set(ids) - set(counts))} frames without a score"
        extra = set(counts) - set(ids)
        assert all(_entry_key(f) < _entry_key(ids[0]) for f in extra), "a score for a frame never streamed"
        assert group_pending(client, cam) == 0
        assert undelivered(client, cam) == 0
        total += len(ids)
    return total


def consumer_pending(client: redis.Redis, cameras: list[str], pid: int) -> int:
    """Frames pending at the consumer of process ``pid`` (consumer names are host-PID-xxxx)."""
    total = 0
    for cam in cameras:
        try:
            consumers = client.xinfo_consumers(keys.frames_key(cam), keys.DEFAULT_GROUP)
        except redis.ResponseError:
            continue
        for c in consumers:
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if f"-{pid}-" in f"-{name}-":
                total += int(c["pending"])
    return total


def heartbeat(client: redis.Redis, pid: int) -> bool:
    """True once the worker process ``pid`` wrote its heartbeat key (it is connected and running)."""
    return any(f"-{pid}-" in k.decode() for k in client.scan_iter(keys.worker_heartbeat_key("*")))


def test_workers_sigkilled_at_random_moments_score_each_frame_exactly_once(
    redis_client: redis.Redis, redis_url: str, artifact: Artifact, procs: Processes, tmp_path: Path
) -> None:
    cams = ["k1", "k2", "k3", "k4"]
    frames = 240  # 30 s at 8 fps: workers that start fast must still be killed with work in flight
    config = write_config(tmp_path / "cams.toml", cams, "fps = 8\nmaxlen = 5000\n")
    reader = procs.dfm(
        *("read", "--redis", redis_url, "--config", str(config), "--max-frames", str(frames)),
        *("--metrics-port", "-1"),
        name="reader",
    )
    # big, slow batches: a worker holds frames pending most of the time, so kills hit work in flight
    args = worker_args(
        redis_url, artifact, cams, "--claim-idle", "1", "--max-deliveries", "1000", "--metrics-port", "-1"
    )
    args += ["--batch-size", "16", "--max-wait-ms", "400"]
    live = [procs.dfm(*args, name="w0"), procs.dfm(*args, name="w1")]
    rng = random.Random(20240607)
    kills = kills_in_flight = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if reader.poll() is not None and (kills_in_flight >= 3 or all_scored_once(redis_client, cams)):
            break
        victim = rng.choice(live)
        t0 = time.monotonic()  # a fresh replacement first imports torch: wait until it holds frames
        while consumer_pending(redis_client, cams, victim.pid) == 0 and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        kills_in_flight += consumer_pending(redis_client, cams, victim.pid) > 0
        procs.stop(victim, signal.SIGKILL)
        kills += 1
        live.remove(victim)
        live.append(procs.dfm(*args, name=f"w{kills + 1}"))
    assert reader.wait(60) == 0, procs.log(reader)
    assert kills_in_flight >= 2, f"{kills} kills, only {kills_in_flight} with frames in flight"

    wait_all_scored(redis_client, cams, 120, "every frame scored after the kills")
    for worker in live:  # a replacement may still be importing torch: let it start before SIGTERM
        wait_until(lambda w=worker: heartbeat(redis_client, w.pid), 60, what="the replacement worker up")
        assert procs.stop(worker) == 0, procs.log(worker)
    assert assert_exactly_one_score_per_frame(redis_client, cams) == 4 * frames
    assert redis_client.xlen(keys.deadletter_key()) == 0
    reclaimed = sum("reclaimed" in procs.log(p) for p in procs.procs)
    assert reclaimed >= 1, "frames of killed workers must have been reclaimed by live ones"


def _seqs(client: redis.Redis, cam: str) -> list[int]:
    return [FrameMsg.from_bytes(f[FIELD.encode()]).seq for _, f in client.xrange(keys.frames_key(cam))]


def test_redis_restart_with_aof_loses_no_accepted_frame(
    aof_redis_server: EmbeddedRedis, artifact: Artifact, procs: Processes, tmp_path: Path
) -> None:
    """Reader and worker reconnect by themselves; frames captured during the outage are counted as dropped."""
    server = aof_redis_server
    client = redis.Redis.from_url(server.url)
    cams = ["r1", "r2"]
    config = write_config(tmp_path / "cams.toml", cams, "fps = 10\nmaxlen = 5000\nbackoff_max = 1.0\n")
    reader = procs.dfm(
        "read", "--redis", server.url, "--config", str(config), "--metrics-port", "0", name="reader"
    )
    worker = procs.dfm(
        *worker_args(server.url, artifact, cams, "--claim-idle", "1", "--metrics-port", "0"), name="worker"
    )
    rport, wport = wait_metrics_port(procs, reader), wait_metrics_port(procs, worker)
    wait_until(lambda: all(len(scores(client, c)) >= 10 for c in cams), 90, what="scores before the outage")

    server.stop(kill=True)
    wait_until(
        lambda: all(
            scrape(rport, "dfm_reader_frames_dropped_total", camera=c, reason="redis_unavailable") >= 10
            for c in cams
        ),
        30,
        what="frames captured during the outage counted as dropped",
    )
    assert '"ready": false' in http_get(rport, "/readyz")
    published_during = scrape(rport, "dfm_reader_frames_published_total")
    server.start()
    wait_until(
        lambda: scrape(rport, "dfm_reader_frames_published_total") >= published_during + 20,
        30,
        what="the reader writing again after Redis came back",
    )
    scored_before = scrape(wport, "dfm_worker_frames_scored_total")
    wait_until(
        lambda: scrape(wport, "dfm_worker_frames_scored_total") >= scored_before + 20,
        60,
        what="the worker scoring again after Redis came back",
    )
    assert reader.poll() is None and worker.poll() is None, "both reconnect by themselves"
    dropped = {
        c: scrape(rport, "dfm_reader_frames_dropped_total", camera=c, reason="redis_unavailable")
        for c in cams
    }
    assert procs.stop(reader) == 0
    wait_all_scored(client, cams, 90, "every accepted frame scored")
    assert procs.stop(worker) == 0

    assert_exactly_one_score_per_frame(client, cams)
    for cam in cams:
        seqs = _seqs(client, cam)
        assert seqs == sorted(seqs) and seqs[0] == 0
        missing = sorted(set(range(seqs[-1] + 1)) - set(seqs))
        assert missing, f"camera {cam}: no frame was lost in the outage?"
        assert missing == list(range(missing[0], missing[-1] + 1)), "one gap: the outage"
        # a write whose reply was lost when Redis died counts as dropped yet may be in the AOF
        assert len(missing) <= dropped[cam] <= len(missing) + 1, (cam, len(missing), dropped[cam])
    assert "Redis reachable again" in procs.log(reader)
    client.close()


def test_overload_stays_bounded_and_recovers(
    redis_client: redis.Redis, redis_url: str, artifact: Artifact, procs: Processes, tmp_path: Path
) -> None:
    """Streams stay within MAXLEN, memory and latency bounded, drops and lag reported; the backlog drains."""
    # o1: a short stream (0.2 s of frames at full speed): frames are trimmed before the worker reads
    # them; o2: a long one (2 s): frames wait longer than --max-age and are skipped as stale
    maxlens, scores_maxlen, max_age = {"o1": 300, "o2": 3000}, 8000, 1.0
    cams = list(maxlens)
    worker = procs.dfm(
        *worker_args(redis_url, artifact, cams, "--max-age", str(max_age), "--claim-idle", "2"),
        *("--scores-maxlen", str(scores_maxlen), "--batch-size", "16", "--metrics-port", "0"),
        name="worker",
    )
    wport = wait_metrics_port(procs, worker)
    wait_until(lambda: all(redis_client.exists(keys.frames_key(c)) for c in cams), 60, what="worker groups")
    baseline = int(redis_client.info("memory")["used_memory"])
    config = write_config(tmp_path / "cams.toml", cams, "pace = false\n")
    text = config.read_text()
    for cam, maxlen in maxlens.items():
        text = text.replace(f'id = "{cam}"\n', f'id = "{cam}"\nmaxlen = {maxlen}\n')
    config.write_text(text)
    reader = procs.dfm(
        *("read", "--redis", redis_url, "--config", str(config), "--duration", "10", "--metrics-port", "-1"),
        name="reader",
    )
    longest = dict.fromkeys(cams, 0)
    peak_memory = max_lag = 0.0
    while reader.poll() is None:  # the producer runs flat out for 10 s
        for c in cams:
            longest[c] = max(longest[c], redis_client.xlen(keys.frames_key(c)))
        peak_memory = max(peak_memory, int(redis_client.info("memory")["used_memory"]))
        max_lag = max(max_lag, scrape(wport, "dfm_stream_lag"))
        time.sleep(0.2)
    assert reader.returncode == 0, procs.log(reader)

    slack = 100 + 10  # MAXLEN ~ trims whole stream nodes (100 entries each)
    frame_bytes = max(
        len(f[FIELD.encode()]) for c in cams for _, f in redis_client.xrange(keys.frames_key(c))
    )
    for cam, maxlen in maxlens.items():
        assert longest[cam] <= maxlen + slack, (cam, longest[cam])
    frames_bound = sum((m + slack) * (frame_bytes + 200) for m in maxlens.values())
    bound = baseline + frames_bound + len(cams) * (scores_maxlen + slack) * 600 + 8 * 2**20
    assert peak_memory <= bound, (peak_memory, bound)
    assert scrape(wport, "dfm_worker_frames_dropped_total", camera="o1", reason="trimmed") > 0
    assert scrape(wport, "dfm_worker_frames_dropped_total", camera="o2", reason="stale") > 0
    assert max_lag > 0, "the lag gauge must show the backlog while overloaded"

    wait_all_scored(redis_client, cams, 90, "the backlog drained")
    assert worker.poll() is None
    # one worker: its own reclaim never takes (nor acks as trimmed) a frame it still has in flight
    assert scrape(wport, "dfm_worker_duplicates_suppressed_total") == 0
    wait_until(lambda: scrape(wport, "dfm_stream_lag") == 0, 30, what="the lag gauge back at 0")
    assert_exactly_one_score_per_frame(redis_client, cams)
    results = [s for c in cams for s in scores(redis_client, c)]
    scored = [s for s in results if s.status == "scored"]
    skipped = [s for s in results if s.status == "skipped"]
    assert scored and skipped
    assert all(s.score is None for s in skipped)
    # dequeued younger than --max-age, then at most a few batches of model and publish time
    worst = max(s.latency_ms for s in scored)
    assert worst <= (max_age + 5.0) * 1000, worst
    assert procs.stop(worker) == 0


def test_frames_of_a_stopped_consumer_are_scored_once_by_another(
    redis_client: redis.Redis, redis_url: str, artifact: Artifact, procs: Processes
) -> None:
    cams = ["s1", "s2"]
    slow = procs.dfm(
        *worker_args(redis_url, artifact, cams, "--batch-size", "50", "--max-wait-ms", "6000"),
        *("--metrics-port", "0"),
        name="slow",
    )
    sport = wait_metrics_port(procs, slow)
    wait_until(lambda: all(redis_client.exists(keys.frames_key(c)) for c in cams), 60, what="groups created")
    for cam in cams:
        push_frames(redis_client, cam, artifact.good[:3])
    wait_until(
        lambda: consumer_pending(redis_client, cams, slow.pid) == 6, 20, what="the slow worker's batch"
    )
    slow.send_signal(signal.SIGSTOP)  # stuck mid-batch (its 6 s batch deadline passes while stopped)
    try:
        rescuer = procs.dfm(
            *worker_args(redis_url, artifact, cams, "--claim-idle", "1", "--burst"), name="rescuer"
        )
        assert rescuer.wait(90) == 0, procs.log(rescuer)
    finally:
        slow.send_signal(signal.SIGCONT)
    assert "reclaimed 6 idle frames" in procs.log(rescuer)
    assert all(len(scores(redis_client, c)) == 3 for c in cams)
    wait_until(
        lambda: scrape(sport, "dfm_worker_duplicates_suppressed_total") == 6,
        30,
        what="the woken worker's late scores suppressed",
    )
    assert procs.stop(slow) == 0
    assert assert_exactly_one_score_per_frame(redis_client, cams) == 6
    assert {s.worker for c in cams for s in scores(redis_client, c)} == {_worker_name(procs.log(rescuer))}


def _worker_name(log: str) -> str:
    marker = "worker "
    for line in log.splitlines():
        if " stopped: " in line and marker in line:
            return line.split(marker, 1)[1].split(" ", 1)[0]
    raise AssertionError("no 'worker NAME stopped' line in the log")


def test_reported_lag_returns_to_zero_once_everything_was_delivered(redis_client: redis.Redis) -> None:
    consumer = StreamConsumer(redis_client, name="solo")
    consumer.add_cameras(["lag1"])
    key = keys.frames_key("lag1")
    for i in range(3000):  # a producer far faster than the consumer, with MAXLEN ~ 300
        redis_client.xadd(key, {FIELD: b"x"}, maxlen=300, approximate=True)
        if i % 50 == 0:
            consumer.read_camera("lag1", 16)
    while consumer.read_camera("lag1", 500)[0]:
        pass
    assert undelivered(redis_client, "lag1") == 0, "control: the group has delivered everything"
    lag, _pending = consumer.group_stats()["lag1"]
    assert lag == 0, f"the worker reports a lag of {lag} with nothing left to deliver"


def test_worker_started_before_redis_reads_its_cameras_once_redis_answers(
    artifact: Artifact, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = EmbeddedRedis(workdir=tmp_path)  # not started yet: connections are refused
    worker = make_worker(server.url, artifact.path, burst=False, cameras=["late1"], discover_interval_s=3600)
    caplog.set_level(logging.INFO, logger="dfm_stream.worker")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: caplog.text.count("Redis unavailable") >= 3, 30, what="retries while Redis is down"
        )
        assert "connected to Redis" not in caplog.text
        server.start()
        client = redis.Redis.from_url(server.url)
        # the camera's group is created now, not one (here: hour-long) discovery interval later
        wait_until(lambda: client.exists(keys.frames_key("late1")), 30, what="the group created on reconnect")
        assert "connected to Redis" in caplog.text
        push_frames(client, "late1", artifact.good[:2])
        wait_until(lambda: len(scores(client, "late1")) == 2, 60, what="frames scored")
        client.close()
    finally:
        stop.set()
        thread.join(60)
        worker.client.close()
        server.close()
    assert not thread.is_alive()


def _torch_loaded(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_sigterm_while_the_worker_is_still_importing_torch_exits_zero(
    redis_url: str, artifact: Artifact, procs: Processes
) -> None:
    worker = procs.dfm(*worker_args(redis_url, artifact, ["early1"]), "--metrics-port", "-1", name="early")
    # torch is imported once the command runs, before the model is loaded: stop it right then
    wait_until(lambda: _torch_loaded(worker.pid) or worker.poll() is not None, 60, what="torch being loaded")
    assert procs.stop(worker) == 0, procs.log(worker)

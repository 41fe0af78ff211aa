"""Redis Sentinel: URLs, and a SIGKILLed primary while a reader and a worker stream through it.

Real processes on loopback (:mod:`sentinel_helpers`): a primary, a replica, three sentinels with
short timings. The failover tests SIGKILL the primary mid-stream and check that the reader and the
worker carry on against the promoted replica without a restart, and that every frame on the new
primary has exactly one score there. The time from the kill to the first frame published and the
first frame scored on the new primary is printed (run with ``-s``); it is measured from the entry
ids and ``scored_ts`` stored in Redis, not asserted.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from chaos_helpers import group_pending, score_counts, scrape, stream_ids, undelivered, wait_metrics_port
from failover_helpers import assert_alarm_carried_over, record_accepted
from redis.connection import SSLConnection
from sentinel_helpers import SentinelTopology
from support import Processes, wait_until
from worker_helpers import Artifact

from dfm_stream import keys
from dfm_stream.config import CameraConfig, RedisConfig
from dfm_stream.connect import FailoverConnection, RedisSettings, connect, parse_sentinel_url
from dfm_stream.errors import ConfigError, RedisConnectError
from dfm_stream.reader import Reader
from dfm_stream.wire import FIELD, FrameMsg, ScoreMsg

CAMERAS = ["s1", "s2"]


@pytest.fixture
def sentinel_topology(tmp_path: Path) -> Iterator[SentinelTopology]:
    """A started primary + replica + three sentinels, stopped after the test."""
    topology = SentinelTopology(tmp_path / "sentinel")
    try:
        yield topology.start()
    finally:
        topology.close()


def test_sentinel_url_parts_and_redaction() -> None:
    url = "rediss+sentinel://app:s%40cret@h1:26380,[::1],h3/line%2D1/2"
    target = parse_sentinel_url(url)
    assert target.sentinels == [("h1", 26380), ("::1", 26379), ("h3", 26379)]
    assert (target.service, target.db, target.username, target.password, target.tls) == (
        "line-1",
        2,
        "app",
        "s@cret",
        True,
    )
    assert parse_sentinel_url("redis+sentinel://h1/mymaster").db == 0
    shown = repr(RedisSettings(url=url)) + repr(RedisConfig(url=url))
    assert "s%40cret" not in shown and "h1:26380,[::1],h3" in shown
    for bad in ("redis+sentinel://h1:26379", "redis+sentinel://h1:x/m/0", "redis+sentinel://h1/m/zero"):
        with pytest.raises(RedisConnectError):
            connect(RedisSettings(url=bad))
    with pytest.raises(RedisConnectError, match="exclude"):
        connect(RedisSettings(url="redis+sentinel://h1/m/0", cluster=True))
    with pytest.raises(ConfigError, match="durability"):
        RedisConfig(durability="all")
    for url, tls in (("redis+sentinel://h1/m/0", False), ("rediss+sentinel://h1/m/0", True)):
        pool = connect(RedisSettings(url=url)).connection_pool
        conn = pool.make_connection()  # built, not connected: the TLS options must fit the class
        assert isinstance(conn, FailoverConnection) and isinstance(conn, SSLConnection) == tls
        pool.disconnect()


def test_a_primary_that_refuses_writes_counts_as_unavailable(sentinel_topology: SentinelTopology) -> None:
    """READONLY (a demoted primary) and NOREPLICAS (one cut off from its replicas) read as outages."""
    topo = sentinel_topology
    client = connect(RedisSettings(url=topo.url))
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    assert script(keys=["n"]) == 1
    admin = redis.Redis(port=topo.primary.port)
    admin.config_set("min-replicas-to-write", 2)  # one replica: every write is refused
    for write in (lambda: client.incr("n"), lambda: script(keys=["n"])):
        with pytest.raises(redis.ConnectionError, match="NOREPLICAS"):
            write()
    admin.config_set("min-replicas-to-write", 0)
    assert script(keys=["n"]) == 2
    replica = redis.Redis(port=topo.replica.port)
    with pytest.raises(redis.ReadOnlyError):  # what a demoted primary answers to a plain client
        replica.eval("return redis.call('INCR', KEYS[1])", 1, "n")
    for c in (client, admin, replica):
        c.close()


def write_config(path: Path, fps: int = 10) -> Path:
    """Synthetic 64 px cameras at ``fps`` with a long stream (nothing trimmed during the test)."""
    text = f"[reader]\nfps = {fps}\nmaxlen = 20000\nbackoff_max = 1.0\n"
    for i, cam in enumerate(CAMERAS):
        text += f'[[cameras]]\nid = "{cam}"\nsource = "synthetic:seed={i},size=64x64,defect_rate=0.1"\n'
    path.write_text(text)
    return path


def all_scores(client: redis.Redis, camera: str) -> list[ScoreMsg]:
    """Every score message of ``camera``."""
    return [ScoreMsg.from_bytes(f[FIELD.encode()]) for _, f in client.xrange(keys.scores_key(camera))]


def first_after(client: redis.Redis, kill_ns: int) -> tuple[float, float]:
    """Seconds from ``kill_ns`` to the first frame accepted and the first frame scored after it."""
    kill_ms = kill_ns // 1_000_000
    frames = [int(i.split(":")[-1].split("-")[0]) for c in CAMERAS for i in stream_ids(client, c)]
    published = min(ms for ms in frames if ms > kill_ms) - kill_ms
    scored = min(s.scored_ts for c in CAMERAS for s in all_scores(client, c) if s.scored_ts > kill_ns)
    return published / 1000, (scored - kill_ns) / 1e9


def assert_one_score_per_frame(client: redis.Redis) -> int:
    """Every frame in each stream has exactly one score, nothing pending or undelivered; the frame count."""
    total = 0
    for cam in CAMERAS:
        ids, counts = stream_ids(client, cam), score_counts(client, cam)
        duplicated = {f: n for f, n in counts.items() if n > 1}
        assert not duplicated, f"camera {cam}: frames scored more than once: {duplicated}"
        assert set(ids) <= set(counts), f"camera {cam}: {len(set(ids) - set(counts))} frames without a score"
        assert set(counts) <= set(ids), f"camera {cam}: scores of frames not in the stream"
        assert group_pending(client, cam) == 0 and undelivered(client, cam) == 0
        total += len(ids)
    return total


def all_scored(client: redis.Redis) -> bool:
    """True once every frame has a score and nothing is pending or undelivered."""
    for cam in CAMERAS:
        ids = stream_ids(client, cam)
        if not ids or not set(ids) <= set(score_counts(client, cam)):
            return False
        if group_pending(client, cam) or undelivered(client, cam):
            return False
    return True


def missing_seqs(client: redis.Redis) -> int:
    """Frames missing from the streams: the gaps in each camera's ``seq`` (one reader session each)."""
    total = 0
    for cam in CAMERAS:
        seqs = sorted(
            FrameMsg.from_bytes(f[FIELD.encode()]).seq for _, f in client.xrange(keys.frames_key(cam))
        )
        assert seqs[0] == 0 and len(set(seqs)) == len(seqs)
        total += seqs[-1] + 1 - len(seqs)
    return total


def test_reader_and_worker_follow_a_sigkilled_primary(
    sentinel_topology: SentinelTopology, artifact: Artifact, procs: Processes, tmp_path: Path
) -> None:
    """Local durability: the reader keeps publishing, two workers keep scoring on the promoted replica.

    The primary loses its replica link shortly before it dies, so frames it accepted alone are
    lost: the workers' ``trimmed`` count (gaps in ``seq``) must equal the frames missing.
    """
    topo = sentinel_topology
    client = connect(RedisSettings(url=topo.url))
    config = write_config(tmp_path / "cams.toml")
    common = ("--redis", topo.url, "--metrics-port", "0")
    reader = procs.dfm("read", *common, "--config", str(config), name="reader")
    work = ("work", *common, "--model", str(artifact.path), "--device", "cpu", "--threads", "1")
    work += ("--cameras", ",".join(CAMERAS), "--claim-idle", "1")
    workers = [procs.dfm(*work, name=f"worker{i}") for i in range(2)]
    rport, wports = wait_metrics_port(procs, reader), [wait_metrics_port(procs, w) for w in workers]

    def worker_sum(name: str, **labels: str) -> float:
        return sum(scrape(port, name, **labels) for port in wports)

    wait_until(lambda: all(len(all_scores(client, c)) >= 10 for c in CAMERAS), 120, what="scores before")

    old = topo.primary_port()
    assert old == topo.primary.port
    published_alone = scrape(rport, "dfm_reader_frames_published_total")
    topo.cut_replication()  # what the primary accepts from now on never reaches the replica
    wait_until(
        lambda: scrape(rport, "dfm_reader_frames_published_total") >= published_alone + 6,
        30,
        what="frames accepted by the primary alone",
    )
    kill_ns = time.time_ns()
    topo.primary.stop(kill=True)
    new = topo.wait_failover(old)
    published = scrape(rport, "dfm_reader_frames_published_total")
    scored = [scrape(port, "dfm_worker_frames_scored_total") for port in wports]
    wait_until(
        lambda: scrape(rport, "dfm_reader_frames_published_total") >= published + 20, 60, what="reader after"
    )
    wait_until(
        lambda: (
            all(scrape(p, "dfm_worker_frames_scored_total") > n for p, n in zip(wports, scored, strict=True))
            and worker_sum("dfm_worker_frames_scored_total") >= sum(scored) + 20
        ),
        120,
        what="both workers scoring after",
    )
    assert all(p.poll() is None for p in [reader, *workers]), "all carry on without a restart"

    direct = redis.Redis(port=new)
    assert procs.stop(reader) == 0, procs.log(reader)
    wait_until(lambda: all_scored(direct), 120, what="every frame on the new primary scored")
    trimmed = worker_sum("dfm_worker_frames_dropped_total", reason="trimmed")
    for worker in workers:
        assert procs.stop(worker) == 0, procs.log(worker)
    lost = missing_seqs(direct)
    assert lost >= 6, "the frames only the old primary had are lost in local mode"
    assert trimmed == lost, "every frame lost (in the failover or dropped by the reader) is counted"
    after = [
        i
        for c in CAMERAS
        for i in stream_ids(direct, c)
        if int(i.split(":")[-1].split("-")[0]) > kill_ns // 10**6
    ]
    assert len(after) >= 20, "frames accepted after the failover are on the new primary"
    assert assert_one_score_per_frame(direct) > len(after)
    frame_s, score_s = first_after(direct, kill_ns)
    print(
        f"\nSIGKILL -> first frame accepted on the new primary {frame_s:.2f} s, first score {score_s:.2f} s"
    )
    cli_args = ["scores", "--redis", topo.url, "--camera", "s1", "--count", "3"]
    cli = subprocess.run(
        [sys.executable, "-m", "dfm_stream.cli", *cli_args], check=False, capture_output=True, text=True
    )
    assert cli.returncode == 0 and len(cli.stdout.splitlines()) == 3, cli.stderr  # the CLI reads via Sentinel
    client.close()
    direct.close()


@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
def test_replicated_durability_loses_no_accepted_frame(
    sentinel_topology: SentinelTopology, artifact: Artifact, procs: Processes, fault: str
) -> None:
    """Replicated durability: every frame counted as accepted has exactly one score on the new primary.

    ``sigkill``: the primary dies, then comes back empty and the sentinels make it a replica.
    ``sigstop``: the primary freezes until the replica was promoted, then wakes up still taking
    writes from the connections it had, until the sentinels demote it: none of those may count.
    The reader runs in this process (so the test knows exactly which frames it counted as
    accepted); the worker is a ``dfm-stream work --durability replicated`` process.
    """
    topo = sentinel_topology
    settings = RedisSettings(url=topo.url, durability="replicated")
    client = connect(settings, socket_timeout=2.0, socket_connect_timeout=2.0)
    cams = [
        CameraConfig(id=c, source=f"synthetic:seed={i},size=64x64", fps=10, maxlen=20000, backoff_max=1.0)
        for i, c in enumerate(CAMERAS)
    ]
    reader = Reader(cams, client, durability="replicated")
    accepted_ns: list[tuple[str, int]] = []
    accepted = record_accepted(reader, CAMERAS, accepted_ns)
    worker = procs.dfm(
        "work", "--redis", topo.url, "--durability", "replicated", "--metrics-port", "0",
        "--model", str(artifact.path), "--device", "cpu", "--cameras", ",".join(CAMERAS),
        "--claim-idle", "1", name="worker",
    )  # fmt: skip
    wport = wait_metrics_port(procs, worker)
    reader.start()
    try:
        wait_until(lambda: all(len(all_scores(client, c)) >= 10 for c in CAMERAS), 120, what="scores before")
        old = topo.primary.port
        if fault == "sigkill":
            topo.cut_replication()  # the primary is alone: nothing may be counted as accepted now
            time.sleep(1.0)
            kill_ns = time.time_ns()
            topo.primary.stop(kill=True)
            new = topo.wait_failover(old)
        else:
            kill_ns = time.time_ns()
            new = topo.freeze_primary()
        failover_ns = time.time_ns()
        # the only replica is now the primary: nothing can be confirmed until the old one is back
        topo.rejoin(old, restart=fault == "sigkill")
        rejoined_ns = time.time_ns()
        counted = {c: len(accepted[c]) for c in CAMERAS}
        scored = scrape(wport, "dfm_worker_frames_scored_total")
        wait_until(lambda: all(len(accepted[c]) >= counted[c] + 20 for c in CAMERAS), 60, what="reader after")
        wait_until(lambda: scrape(wport, "dfm_worker_frames_scored_total") >= scored + 20, 90, what="worker")
    finally:
        reader.close()
    direct = redis.Redis(port=new)
    wait_until(lambda: all_scored(direct), 120, what="every frame on the new primary scored")
    assert procs.stop(worker) == 0, procs.log(worker)
    for cam in CAMERAS:
        seqs = {FrameMsg.from_bytes(f[FIELD.encode()]).seq for _, f in direct.xrange(keys.frames_key(cam))}
        lost = sorted(set(accepted[cam]) - seqs)
        assert not lost, f"camera {cam}: frames counted as accepted but missing on the new primary: {lost}"
    assert assert_one_score_per_frame(direct) >= sum(len(a) for a in accepted.values())
    replays = [assert_alarm_carried_over(direct, cam, kill_ns) for cam in CAMERAS]
    assert any(r.raised for r in replays), "no alarm was raised at all: the carry-over check proves nothing"
    _, score_s = first_after(direct, kill_ns)
    frame_s = (min(t for _, t in accepted_ns if t > failover_ns) - kill_ns) / 1e9
    print(
        f"\nreplicated, {fault} -> promotion {(failover_ns - kill_ns) / 1e9:.2f} s, old primary back as a"
        f" replica {(rejoined_ns - kill_ns) / 1e9:.2f} s, first frame accepted (confirmed) {frame_s:.2f} s,"
        f" first score {score_s:.2f} s"
    )
    client.close()
    direct.close()


def test_durability_comes_from_the_flag_the_environment_or_the_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import argparse

    from dfm_stream.connect import add_redis_args, settings_with_config

    def settings(argv: list[str], config: RedisConfig | None = None) -> RedisSettings:
        parser = argparse.ArgumentParser()
        add_redis_args(parser)
        return settings_with_config(parser.parse_args(argv), config)

    monkeypatch.delenv("DFM_DURABILITY", raising=False)
    assert settings([]).durability == "local"
    assert settings(["--durability", "replicated"]).durability == "replicated"
    assert settings([], RedisConfig(durability="replicated")).durability == "replicated"
    monkeypatch.setenv("DFM_DURABILITY", "replicated")
    assert settings([]).durability == "replicated"
    assert settings([], RedisConfig()).durability == "replicated", "the environment beats the file"
    with pytest.raises(SystemExit):
        settings(["--durability", "all"])
    assert RedisSettings(durability="replicated", cluster=True).durability == "replicated"  # WAIT per slot

"""A Redis Cluster with replicas loses a primary (SIGKILL) while a reader and two workers stream through it.

Real processes on loopback (:mod:`cluster_helpers`): three primaries, each with one replica,
``cluster-node-timeout`` :data:`NODE_TIMEOUT_MS`. The reader runs in this process with
``--durability replicated`` (so the test knows which frames it counted as accepted), the workers
are ``dfm-stream work --cluster --durability replicated`` processes. The primary that holds the
first camera's slot is killed; its replica is promoted, the killed node is started again and
rejoins as the new primary's replica (until then nothing on that slot can be confirmed). Then:
every frame the reader counted as accepted has exactly one score, nothing is pending, the alarm
state is the one the surviving scores imply, and the reader and workers never restarted.

The times from the kill to the promotion and to the first frame accepted and scored on the new
primary are printed (run with ``-s``), not asserted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos_helpers import scrape, wait_metrics_port
from cluster_helpers import RedisClusterNodes
from failover_helpers import (
    all_scored,
    all_scores,
    assert_alarm_carried_over,
    assert_scored_once,
    frame_seqs,
    record_accepted,
)
from support import Processes, wait_until
from worker_helpers import Artifact

from dfm_stream import keys
from dfm_stream.config import CameraConfig
from dfm_stream.connect import RedisSettings, connect
from dfm_stream.reader import Reader

CAMERAS = ["c0", "c1", "c2"]
NODE_TIMEOUT_MS = 2000
"""``cluster-node-timeout``: a primary silent this long is failed over (Redis' default is 15 s)."""


@pytest.fixture
def cluster_with_replicas(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    """Three primaries and three replicas holding all 16384 slots, stopped after the test."""
    nodes = RedisClusterNodes(tmp_path / "cluster", replicas=1, node_timeout_ms=NODE_TIMEOUT_MS)
    try:
        yield nodes.start()
    finally:
        nodes.close()


def test_replicated_durability_loses_no_accepted_frame_when_a_cluster_primary_dies(
    cluster_with_replicas: RedisClusterNodes, artifact: Artifact, procs: Processes
) -> None:
    nodes = cluster_with_replicas
    settings = RedisSettings(url=nodes.seed_url, cluster=True, durability="replicated")
    client = connect(settings, socket_timeout=2.0, socket_connect_timeout=2.0)
    cams = [
        CameraConfig(id=c, source=f"synthetic:seed={i},size=64x64", fps=10, maxlen=20000, backoff_max=1.0)
        for i, c in enumerate(CAMERAS)
    ]
    reader = Reader(cams, client, durability="replicated")
    accepted_ns: list[tuple[str, int]] = []
    accepted = record_accepted(reader, CAMERAS, accepted_ns)
    work = ["work", "--redis", nodes.seed_url, "--cluster", "--durability", "replicated"]
    work += ["--metrics-port", "0", "--model", str(artifact.path), "--device", "cpu", "--threads", "1"]
    work += ["--cameras", ",".join(CAMERAS), "--claim-idle", "1"]
    workers = [procs.dfm(*work, name=f"worker{i}") for i in range(2)]
    wports = [wait_metrics_port(procs, w, 120) for w in workers]  # start-up is slow on a busy machine

    def scored() -> float:
        return sum(scrape(port, "dfm_worker_frames_scored_total") for port in wports)

    reader.start()
    try:
        wait_until(lambda: all(len(all_scores(client, c)) >= 10 for c in CAMERAS), 60, what="scores before")
        victim = nodes.primary_of(keys.frames_key(CAMERAS[0]))
        heir = nodes.replica_of(victim)
        kill_ns = time.time_ns()
        victim.stop(kill=True)
        wait_until(lambda: nodes.role(heir.port) == "master", 30, 0.05, "the replica promoted")
        promoted_ns = time.time_ns()
        victim.start()  # rejoins as the replica of the node promoted in its place
        wait_until(nodes.healthy, 30, 0.2, "the killed node back as an in-sync replica")
        assert nodes.role(victim.port) == "slave"
        rejoined_ns = time.time_ns()
        counted = {c: len(accepted[c]) for c in CAMERAS}
        before = scored()
        wait_until(lambda: all(len(accepted[c]) >= counted[c] + 20 for c in CAMERAS), 30, what="reader after")
        wait_until(lambda: scored() >= before + 40, 60, what="workers scoring after")
    finally:
        reader.close()
    wait_until(lambda: all_scored(client, CAMERAS), 60, what="every frame scored")
    assert all(w.poll() is None for w in workers), "the workers carry on without a restart"
    for worker in workers:
        assert procs.stop(worker) == 0, procs.log(worker)

    assert nodes.primary_of(keys.frames_key(CAMERAS[0])) is heir, "the slot map names the promoted replica"
    for cam in CAMERAS:
        lost = sorted(set(accepted[cam]) - frame_seqs(client, cam))
        assert not lost, f"camera {cam}: frames counted as accepted but missing after the failover: {lost}"
        assert_alarm_carried_over(client, cam, kill_ns)
    assert assert_scored_once(client, CAMERAS) >= sum(len(a) for a in accepted.values())

    first_frame = min(t for c, t in accepted_ns if c == CAMERAS[0] and t > kill_ns)
    victim_scores = [s.scored_ts for s in all_scores(client, CAMERAS[0]) if s.scored_ts > kill_ns]
    print(
        f"\ncluster, replicated, SIGKILL -> promotion {(promoted_ns - kill_ns) / 1e9:.2f} s, killed node back"
        f" as a replica {(rejoined_ns - kill_ns) / 1e9:.2f} s, first frame of the killed slot"
        f" accepted (confirmed) {(first_frame - kill_ns) / 1e9:.2f} s, first score on the killed slot"
        f" {(min(victim_scores) - kill_ns) / 1e9:.2f} s"
    )
    client.close()

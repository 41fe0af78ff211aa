"""A real 3-master Redis Cluster on loopback: readers and workers with ``--cluster``, 8 cameras.

The cluster is made of three ``redis-server`` processes in cluster mode joined by
``redis-cli --cluster create``. The model comes from the model registry (pushed through a cluster
client); the workers take it from there. Frames come from a reader process (``read --cluster``) for
two cameras and from the test itself for the other six. Workers are added, stopped with SIGTERM and
killed with SIGKILL while frames flow; at the end every frame has exactly one score, nothing is
pending, and the cameras' keys are spread over the masters, each camera's keys in one slot.
The model is pushed with ``model push --cluster`` and read back through the registry.
"""

import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import RedisClusterNodes, node_keys
from redis.cluster import RedisCluster
from support import Processes, wait_until
from worker_helpers import Artifact

from dfm_stream import keys
from dfm_stream.embedded_redis import EmbeddedRedis
from dfm_stream.frame_codec import encode_frame
from dfm_stream.registry import ModelRegistry
from dfm_stream.wire import FIELD, ScoreMsg

CAMERAS = [f"cam{i}" for i in range(8)]
READER_CAMERAS = CAMERAS[6:]
"""Cameras whose frames come from a ``dfm-stream read --cluster`` process."""
PUSHED_CAMERAS = CAMERAS[:6]
"""Cameras whose frames the test writes itself, in rounds, while workers come and go."""
READER_FRAMES = 30
ROUND_FRAMES = 8
ROUNDS = 3


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[EmbeddedRedis]]:
    """Three masters (no replicas) holding all 16384 slots, stopped after the test."""
    nodes = RedisClusterNodes(tmp_path / "cluster")
    try:
        yield nodes.start().servers
    finally:
        nodes.close()


def heartbeats(servers: list[EmbeddedRedis]) -> int:
    return sum(len(node_keys(s, "dfm:worker:*")) for s in servers)


def scores(client: RedisCluster, camera: str) -> list[ScoreMsg]:
    return [ScoreMsg.from_bytes(f[FIELD.encode()]) for _, f in client.xrange(keys.scores_key(camera))]


def scored(client: RedisCluster) -> int:
    return sum(client.xlen(keys.scores_key(c)) for c in CAMERAS)


def write_config(path: Path, seed_url: str) -> Path:
    cams = "\n".join(
        f'[[cameras]]\nid = "{c}"\nsource = "synthetic:seed={i},size=64x64"\n' for i, c in enumerate(CAMERAS)
    )
    path.write_text(
        f'[redis]\nurl = "{seed_url}"\ncluster = true\n\n{cams}\n'
        '[worker]\nmodel = "tiny"\nbatch_size = 4\nmax_wait_ms = 5\nclaim_idle_s = 2\n'
    )
    return path


def start_worker(procs: Processes, work: list[str], name: str) -> subprocess.Popen[bytes]:
    """Start a worker process and wait until it has joined (connected, model loaded)."""
    proc = procs.dfm(*work, name=name)
    wait_until(lambda: "connected to Redis" in procs.log(proc), 60, what=f"{name} connected")
    return proc


def push_round(client: RedisCluster, art: Artifact, round_no: int) -> None:
    """XADD ``ROUND_FRAMES`` frames to each pushed camera (seq continues across rounds)."""
    for camera in PUSHED_CAMERAS:
        for i in range(ROUND_FRAMES):
            seq = round_no * ROUND_FRAMES + i
            msg = encode_frame(art.good[seq % len(art.good)], camera, seq, "test")
            client.xadd(keys.frames_key(camera), {FIELD: msg.to_bytes()})


@pytest.fixture
def client(redis_cluster: list[EmbeddedRedis]) -> Iterator[RedisCluster]:
    """A cluster client seeded with the first master (binary replies)."""
    cluster_client = RedisCluster.from_url(redis_cluster[0].url)
    yield cluster_client
    cluster_client.close()


def test_workers_on_a_redis_cluster_score_every_frame_once_while_scaling(
    redis_cluster: list[EmbeddedRedis],
    client: RedisCluster,
    artifact: Artifact,
    procs: Processes,
    tmp_path: Path,
) -> None:
    seed = redis_cluster[0].url
    push = procs.dfm(
        "model", "push", "--redis", seed, "--cluster", "--name", "tiny", "--file", str(artifact.path)
    )
    assert push.wait(60) == 0, procs.log(push)
    assert ModelRegistry(client).current("tiny") == 1  # the registry, read back through the cluster
    config = write_config(tmp_path / "cameras.toml", seed)
    work = ["work", "--redis", seed, "--cluster", "--config", str(config), "--device", "cpu"]
    work += ["--metrics-port", "-1"]

    workers = [procs.dfm(*work, name=f"worker{i}") for i in range(2)]
    wait_until(lambda: heartbeats(redis_cluster) == 2, 60, what="two workers running")
    reader = procs.dfm(
        "read", "--redis", seed, "--cluster", "--config", str(config), "--camera", ",".join(READER_CAMERAS),
        "--max-frames", str(READER_FRAMES), "--no-pace", "--metrics-port", "-1", name="reader",
    )  # fmt: skip
    push_round(client, artifact, 0)
    wait_until(lambda: scored(client) >= ROUND_FRAMES, 60, what="the first scores")

    workers.append(start_worker(procs, work, "worker2"))  # scale out while frames flow
    push_round(client, artifact, 1)
    assert procs.stop(workers[0], signal.SIGTERM) == 0, procs.log(workers[0])  # scale in, gracefully
    procs.stop(workers[1], signal.SIGKILL)  # a worker lost with frames possibly in flight
    workers.append(start_worker(procs, work, "worker3"))
    push_round(client, artifact, 2)

    assert reader.wait(60) == 0, procs.log(reader)
    total = len(PUSHED_CAMERAS) * ROUNDS * ROUND_FRAMES + len(READER_CAMERAS) * READER_FRAMES
    wait_until(lambda: scored(client) >= total, 90, what=f"{total} frames scored")
    for worker in workers[2:]:
        assert procs.stop(worker, signal.SIGTERM) == 0, procs.log(worker)

    by_worker: Counter[str] = Counter()
    for camera in CAMERAS:
        frames = [f"{camera}:{i.decode()}" for i, _ in client.xrange(keys.frames_key(camera))]
        got = Counter(s.frame_id for s in scores(client, camera))
        assert sorted(got) == sorted(frames), f"{camera}: frames without a score, or scores without a frame"
        assert max(got.values()) == 1, f"{camera}: a frame was scored twice: {got.most_common(3)}"
        assert client.xpending(keys.frames_key(camera), keys.DEFAULT_GROUP)["pending"] == 0, camera
        assert client.exists(keys.alarm_state_key(camera)), f"{camera}: no alarm state on the cluster"
        by_worker.update(s.worker for s in scores(client, camera))
    for camera in READER_CAMERAS:  # the reader wrote every frame through the cluster client
        assert client.xlen(keys.frames_key(camera)) == READER_FRAMES, camera
    assert len(by_worker) >= 3, f"the work was not shared as workers came and went: {by_worker}"

    # the cameras are sharded: their frame streams live on more than one master, and every key of
    # one camera (frames, scores, alarm state, seq) lives on the node of its frame stream
    holders = {s.port: node_keys(s, "dfm:{*}:*") for s in redis_cluster}
    nodes_with_frames = [port for port, found in holders.items() if any(k.endswith(":frames") for k in found)]
    assert len(nodes_with_frames) > 1, f"every camera landed on one node: {holders}"
    for camera in CAMERAS:
        (port,) = [p for p, found in holders.items() if keys.frames_key(camera) in found]
        for key in (keys.scores_key(camera), keys.alarm_state_key(camera), keys.seq_key(camera)):
            assert key in holders[port], f"{key} is not on the node of {keys.frames_key(camera)}"

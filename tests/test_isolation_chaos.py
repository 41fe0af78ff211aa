"""Fault isolation, all at once (#14): one hostile camera streams beside three honest ones.

The hostile camera sends, between honest frames: entries padded with a 14-million-element array,
bytes that are not msgpack, entries without the ``msg`` field, ``seq`` values that wrap (0,
2^64-1, 0), and half-way through its model assignment is replaced by garbage (the worker reports
it once and keeps the model it had, as for a version that fails to load). Meanwhile a second
client probes Redis every few milliseconds. Checked: Redis never answers ``BUSY`` (or any error)
to the prober, every honest frame gets exactly one score and none is dead-lettered, nothing honest
stays pending, the hostile entries end as dead letters with their reasons (each keeping at most a
64 KiB prefix of what the camera sent, the padded ones their 14 MB as ``size``), and the worker keeps
running without a traceback. Throughput and latency of the honest cameras beside a hostile one
are measured by the benchmark (``dfm-stream bench --stages isolation``), not here.
"""

from __future__ import annotations

import struct
import threading
import time

import msgpack
import numpy as np
import pytest
import redis
from chaos_helpers import score_counts, undelivered
from registry_helpers import tiny_artifact
from support import Processes, wait_until
from worker_helpers import pending

from dfm_stream import keys
from dfm_stream.frame_codec import encode_frame
from dfm_stream.registry import ModelRef, ModelRegistry
from dfm_stream.wire import DEADLETTER_PAYLOAD_BYTES, FIELD, DeadLetterMsg

HONEST = ("cam1", "cam2", "cam3")
EVIL = "evil"
ROUNDS = 24
WORKER_START_S = 180  # torch import + first model load on a busy 2-core machine


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def _frame(camera: str, seq: int, seed: int) -> bytes:
    return encode_frame(_image(seed), camera, seq, "s1").to_bytes()


def _padded(seq: int) -> bytes:
    """A valid frame message whose first key holds an array of 14 million zeros (~14 MB)."""
    body = msgpack.unpackb(_frame(EVIL, seq, seq), raw=False)
    rest = msgpack.packb(body, use_bin_type=True)
    pad = b"\xdd" + struct.pack(">I", 14_000_000) + b"\x00" * 14_000_000
    return bytes([0x80 + len(body) + 1]) + msgpack.packb("pad") + pad + rest[1:]


def _hostile(client: redis.Redis, round_: int) -> str | None:
    """Write round ``round_``'s hostile entry; return the dead-letter reason it must get, if any."""
    key = keys.frames_key(EVIL)
    kind = round_ % 4
    if kind == 0:
        client.xadd(key, {FIELD: _padded(round_)})
        return "oversized"
    if kind == 1:
        client.xadd(key, {FIELD: b"\xc1 this is not msgpack"})
        return "bad_msgpack"
    if kind == 2:
        client.xadd(key, {"other": b"no msg field here"})
        return "bad_message"
    for seq in (0, 2**64 - 1, 0):  # a wrapping sequence of otherwise honest frames: scored
        client.xadd(key, {FIELD: _frame(EVIL, seq, round_)})
    return None


class Prober(threading.Thread):
    """A second client that PINGs and writes a small stream until stopped; collects every error."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.errors: list[str] = []
        self.answered = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.client.ping()
                self.client.xadd("probe", {"x": b"1"}, maxlen=10, approximate=False)
                self.answered += 1
            except redis.RedisError as e:
                self.errors.append(str(e))
            time.sleep(0.005)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        self.client.close()


def _dead_letters(client: redis.Redis) -> list[DeadLetterMsg]:
    return [DeadLetterMsg.from_bytes(f[FIELD.encode()]) for _, f in client.xrange(keys.deadletter_key())]


def test_one_hostile_camera_never_stalls_errors_or_double_scores_the_honest_ones(
    procs: Processes, redis_url: str, redis_client: redis.Redis
) -> None:
    redis_client.config_set("busy-reply-threshold", 500)  # a script running 0.5 s would show as BUSY
    registry = ModelRegistry(redis_client)
    registry.push("m", tiny_artifact("layer1", seed=0))
    for camera in (*HONEST, EVIL):
        registry.assign(camera, ModelRef("m"))
    worker = procs.dfm(
        "work", "--redis", redis_url, "--cameras", ",".join((*HONEST, EVIL)), "--device", "cpu",
        "--batch-size", "8", "--max-wait-ms", "20", "--metrics-port", "-1", name="worker",
    )  # fmt: skip
    for camera in HONEST:  # warm-up: the worker is up and scoring before the hostile traffic starts
        redis_client.xadd(keys.frames_key(camera), {FIELD: _frame(camera, 0, 0)})
    wait_until(
        lambda: worker.poll() is not None or all(redis_client.xlen(keys.scores_key(c)) for c in HONEST),
        WORKER_START_S,
        what="the worker's first scores",
    )
    assert worker.poll() is None, procs.log(worker)[-3000:]

    prober = Prober(redis_url)
    prober.start()
    expected_reasons: list[str] = []
    honest_ids: dict[str, list[str]] = {c: [] for c in HONEST}
    try:
        for round_ in range(1, ROUNDS + 1):
            if round_ == ROUNDS // 2:  # the hostile camera's assignment breaks half-way
                redis_client.hset(keys.assignments_key(), EVIL, "not a @ reference")
                redis_client.incr(keys.registry_generation_key())  # as a registry change would
            for camera in HONEST:
                entry = redis_client.xadd(keys.frames_key(camera), {FIELD: _frame(camera, round_, round_)})
                honest_ids[camera].append(f"{camera}:{entry.decode()}")
            reason = _hostile(redis_client, round_)
            if reason:
                expected_reasons.append(reason)
            time.sleep(0.1)

        def honest_done() -> bool:
            if worker.poll() is not None:
                pytest.fail(f"the worker exited:\n{procs.log(worker)[-3000:]}")
            honest = all(redis_client.xlen(keys.scores_key(c)) >= ROUNDS + 1 for c in HONEST)
            return honest and undelivered(redis_client, EVIL) == 0 and pending(redis_client, EVIL) == 0

        wait_until(honest_done, 180, what="every honest frame scored and the hostile camera drained")
        wait_until(lambda: "camera evil: no usable model" in procs.log(worker), 60, what="the report")
        time.sleep(1.0)  # let the probe see the worker idle as well
    finally:
        prober.stop()

    assert prober.errors == [], f"Redis answered the prober with errors: {prober.errors[:3]}"
    assert prober.answered > 0
    for camera in HONEST:
        counts = score_counts(redis_client, camera)
        assert set(honest_ids[camera]) <= set(counts), f"{camera}: honest frames without a score"
        assert max(counts.values()) == 1, f"{camera}: a frame scored twice"
        assert pending(redis_client, camera) == 0
    letters = _dead_letters(redis_client)
    assert {d.camera for d in letters} == {EVIL}, "an honest frame was dead-lettered"
    assert sorted(d.reason for d in letters) == sorted(expected_reasons)
    stored = [f[b"payload"] for _, f in redis_client.xrange(keys.deadletter_key())]
    assert max(len(p) for p in stored) <= DEADLETTER_PAYLOAD_BYTES < max(d.size or 0 for d in letters)
    assert worker.poll() is None
    log = procs.log(worker)
    assert "Traceback" not in log, log[-3000:]
    assert log.count(f"camera {EVIL}: no usable model") == 1, log[-3000:]
    assert procs.stop(worker) == 0, log[-3000:]

"""Bench stage ``swap``: from a registry command returning to the first frame scored by the new version.

A ``dfm-stream work`` process routed by the registry (no ``--model``) scores one camera fed in
real time at a fraction of the measured capacity. The stage then switches the camera's version
over and over, cycling through the three commands that do it: ``push`` (a new version: the bench
model with another threshold, so its bytes differ and its backbone is the same), ``rollback`` (to
the version before) and ``assign`` (pinned to the other one). For each switch it records the time
from the call returning to the ``scored_ts`` of the first score naming the new version, and
reports percentiles. One more switch pushes a version with other backbone weights (a fresh random
resnet), whose runner must be built: its time shows what a shared backbone saves.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfm_stream import keys, replies
from dfm_stream.artifact import update_calibration
from dfm_stream.bench.env import percentile
from dfm_stream.bench.stream_stages import StreamSetup, WorkerGroup, _frame_bytes, delete_prefix
from dfm_stream.errors import DfmStreamError
from dfm_stream.registry import ModelRef, ModelRegistry
from dfm_stream.wire import FIELD, ScoreMsg

MODEL = "bench"
START_TIMEOUT_S = 600.0
"""Worker start-up: torch import and the first backbone build (minutes on a busy 2-core machine)."""
SWITCH_TIMEOUT_S = 300.0


class RegistryWorkers(WorkerGroup):
    """Workers that take the camera's model from the registry instead of ``--model FILE``."""

    def command(self) -> list[str]:
        """Return one worker's command line (the bench worker's, less ``--model``)."""
        cmd = super().command()
        at = cmd.index("--model")
        return cmd[:at] + cmd[at + 2 :]


def variant(artifact: bytes, n: int) -> bytes:
    """Return ``artifact`` with threshold ``1e6 + n`` (other bytes, same model, no alarms): a new version."""
    with tempfile.TemporaryDirectory(prefix="dfm-swap-") as tmp:
        path = Path(tmp) / "m.safetensors"
        path.write_bytes(artifact)
        update_calibration(path, float(1_000_000 + n), None, None)
        return path.read_bytes()


class _Feed(threading.Thread):
    """Writes the camera's frames at ``rate`` per second until stopped."""

    def __init__(self, setup: StreamSetup, prefix: str, camera: str, rate: float) -> None:
        super().__init__(daemon=True, name="bench-swap-feed")
        self.setup, self.prefix, self.camera, self.rate = setup, prefix, camera, rate
        self.stop = threading.Event()
        self.sent = 0

    def write_one(self) -> None:
        """XADD the next frame."""
        templates = self.setup.templates[self.camera]
        data = _frame_bytes(templates[self.sent % len(templates)], self.sent, "swap")
        self.setup.client.xadd(keys.frames_key(self.camera, self.prefix), {FIELD: data})
        self.sent += 1

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop.is_set():
            self.write_one()
            self.stop.wait(max(0.0, start + self.sent / self.rate - time.monotonic()))


def _first_scored_by(
    setup: StreamSetup, prefix: str, camera: str, label: str, after_ns: int, timeout: float = SWITCH_TIMEOUT_S
) -> int:
    """Wait for the first score naming ``label`` scored after ``after_ns``; return its ``scored_ts``."""
    key = keys.scores_key(camera, prefix)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, fields in reversed(replies.xrevrange(setup.client, key, count=200)):
            msg = ScoreMsg.from_bytes(fields[FIELD.encode()])
            if msg.model == label and msg.scored_ts > after_ns:
                return msg.scored_ts
        time.sleep(0.02)
    raise DfmStreamError(f"bench swap: no score by {label} {timeout:.0f} s after the switch")


def swap_run(
    setup: StreamSetup,
    rep: int,
    capacity: float,
    load: float,
    switches: int,
    other_backbone: bytes | None = None,
) -> dict[str, Any]:
    """Run the switches on fresh keys; return per-command latencies and their percentiles (seconds)."""
    prefix = setup.prefix("swap", rep)
    camera = setup.cameras[0]
    registry = ModelRegistry(setup.client, prefix)
    base = setup.artifact.read_bytes()
    registry.push(MODEL, variant(base, 0))
    registry.assign(camera, ModelRef(MODEL))
    one = dataclasses.replace(setup, cameras=[camera])
    group = RegistryWorkers(one, prefix, f"swap{rep}")
    feed = _Feed(setup, prefix, camera, max(1.0, capacity * load))
    samples: list[dict[str, Any]] = []
    try:
        group.start()
        _Feed(setup, prefix, camera, 1.0).write_one()  # the paced feed starts once the worker scores:
        _first_scored_by(setup, prefix, camera, f"{MODEL}@1", 0, START_TIMEOUT_S)  # no start-up backlog
        feed.start()
        for i in range(switches):
            action, label, switch = _next_switch(registry, camera, base, i)
            switch()
            returned = time.time_ns()
            scored = _first_scored_by(setup, prefix, camera, label, returned)
            samples.append({"action": action, "model": label, "seconds": (scored - returned) / 1e9})
            group.check_alive()
        other = None
        if other_backbone is not None:
            version = registry.push(MODEL, other_backbone).version
            returned = time.time_ns()
            scored = _first_scored_by(setup, prefix, camera, f"{MODEL}@{version}", returned)
            other = (scored - returned) / 1e9
    finally:
        feed.stop.set()
        feed.join(10)
        group.stop()
        delete_prefix(setup.client, prefix)
    seconds = [s["seconds"] for s in samples]
    return {
        "switches": len(samples),
        "rate": capacity * load,
        "p50_s": percentile(seconds, 50),
        "p99_s": percentile(seconds, 99),
        "max_s": max(seconds),
        "by_action": {
            a: percentile([s["seconds"] for s in samples if s["action"] == a], 99)
            for a in sorted({s["action"] for s in samples})
        },
        "other_backbone_s": other,
        "samples": samples,
    }


def _next_switch(
    registry: ModelRegistry, camera: str, base: bytes, i: int
) -> tuple[str, str, Callable[[], object]]:
    """Return (command, label the camera moves to, the call) of switch ``i``.

    The cycle: push (a new current version), rollback (to the one before), assign pinned to the
    newer one, assign unpinned (back to the current one, so the next push reaches the camera).
    """
    current = registry.current(MODEL)
    kind = ("push", "rollback", "assign", "assign")[i % 4]
    if kind == "push":
        data = variant(base, i + 1)
        version = max(v.version for v in registry.versions(MODEL)) + 1
        return kind, f"{MODEL}@{version}", lambda: registry.push(MODEL, data)
    if kind == "rollback":
        return kind, f"{MODEL}@{current - 1}", lambda: registry.rollback(MODEL)
    if i % 4 == 2:
        return kind, f"{MODEL}@{current + 1}", lambda: registry.assign(camera, ModelRef(MODEL, current + 1))
    return kind, f"{MODEL}@{current}", lambda: registry.assign(camera, ModelRef(MODEL))

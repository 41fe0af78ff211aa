"""Helpers for the part inspection and bridge tests: a worker in a thread, frames after a trigger."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from support import wait_until
from worker_helpers import make_worker, push_frame, scores

from dfm_stream import keys


@contextmanager
def worker_thread(redis_url: str, artifact_path: Path, cameras: list[str]) -> Iterator[None]:
    """Run an in-process (not burst) worker on ``cameras`` in a thread until the block ends."""
    worker = make_worker(redis_url, artifact_path, cameras=cameras, burst=False)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="test-worker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)
        worker.client.close()


def warm_up(client: redis.Redis, camera: str, image, seq: int = 0) -> None:
    """Push one frame before any job and wait for its score (the camera exists, the model is loaded)."""
    before = len(scores(client, camera))
    push_frame(client, camera, image, seq, session="warm")
    wait_until(lambda: len(scores(client, camera)) > before, 120, 0.1, what=f"a score of {camera}")


def when_job_started(client: redis.Redis, camera: str, action, timeout: float = 120) -> threading.Thread:
    """In a thread: wait until a job holds ``camera``'s busy lock (the trigger happened), then act."""

    def run() -> None:
        wait_until(lambda: client.exists(keys.job_lock_key(camera)), timeout, 0.02, what="a job")
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread

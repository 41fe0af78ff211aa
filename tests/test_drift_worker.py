"""A real worker process exports the drift metrics and writes the drift hash; ``drift`` prints it (#19)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
from registry_helpers import tiny_artifact
from support import REPO, wait_until
from worker_helpers import push_frames

from dfm_stream import keys
from dfm_stream.artifact import load_artifact, save_artifact
from dfm_stream.drift import ImageStatsCollector
from dfm_stream.embedded_redis import free_port
from dfm_stream.images import IMAGENET_MEAN, IMAGENET_STD, preprocess
from dfm_stream.synthetic_parts import render_part

CAMERA = "camD"
SIZE = 64


def model_with_reference(tmp_path: Path, rng: np.random.Generator) -> Path:
    """The tiny model with a drift reference of synthetic parts and of its own scores on others."""
    fitted = load_artifact(tiny_artifact())
    train = preprocess([render_part(rng, SIZE)[0] for _ in range(60)], (SIZE, SIZE))
    collector = ImageStatsCollector(IMAGENET_MEAN, IMAGENET_STD)
    list(collector.tap([train]))
    held_out = preprocess([render_part(rng, SIZE)[0] for _ in range(60)], (SIZE, SIZE))
    scores = fitted.model(held_out).pred_score.double().numpy()
    reference = collector.reference().with_scores(scores)
    path = tmp_path / "ref.dfm"
    save_artifact(path, fitted.model, dataclasses.replace(fitted.info, drift=reference.to_json_dict()))
    return path


def dfm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dfm_stream.cli", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip


def test_a_worker_writes_the_drift_hash_and_metrics_and_drift_prints_them(
    redis_client, redis_url, procs, tmp_path
) -> None:
    rng = np.random.default_rng(11)
    model = model_with_reference(tmp_path, rng)
    push_frames(redis_client, CAMERA, [render_part(rng, SIZE)[0] for _ in range(120)])
    port = free_port()
    worker = procs.dfm(
        *("work", "--redis", redis_url, "--model", str(model), "--cameras", CAMERA, "--device", "cpu"),
        *("--max-wait-ms", "5", "--metrics-port", str(port)),
        name="worker",
    )
    key = keys.drift_key(CAMERA)

    def figures_written() -> bool:
        assert worker.poll() is None, procs.log(worker)
        return redis_client.hget(key, "verdict") in (b"ok", b"drift")

    wait_until(figures_written, 60, interval=0.2, what="drift figures in " + key)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    for name in ("dfm_drift_score_psi", "dfm_drift_score_quantile_ratio", "dfm_drift_window_frames"):
        assert f'{name}{{camera="{CAMERA}"}}' in body, name
    assert f'dfm_drift_image_psi{{camera="{CAMERA}",stat="brightness"}}' in body

    shown = dfm("drift", "--redis", redis_url, "--camera", CAMERA)
    assert shown.returncode == 0, shown.stderr
    assert "score PSI" in shown.stdout and "brightness PSI" in shown.stdout
    assert shown.stdout.strip().splitlines()[-1].startswith("verdict: ")
    as_json = json.loads(dfm("drift", "--redis", redis_url, "--camera", CAMERA, "--json").stdout)
    assert as_json["camera"] == CAMERA and 100 <= int(as_json["frames"]) <= 120
    assert {f["name"] for f in as_json["figures"]} == {
        "score_psi", "score_quantile_ratio", "brightness_psi", "contrast_psi", "sharpness_psi",
    }  # fmt: skip
    assert procs.stop(worker) == 0

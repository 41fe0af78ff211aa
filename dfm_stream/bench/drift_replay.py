"""Drift watch against a light change, measured: ``python -m dfm_stream.bench.drift_replay``.

A resnet18/layer2 DFM model (random weights, no download) is fitted on synthetic good parts
(:mod:`dfm_stream.synthetic_parts`) with the drift reference recorded as ``fit`` and
``calibrate`` record it. Then, at the drift-module level (no Redis, no worker: the window is fed
the scores and image statistics directly, as the worker feeds it):

* **unshifted**: ``--frames`` (10,000) frames drawn at random from a pool of other good parts:
  the largest value each figure reached, and whether the verdict ever said ``drift``;
* **shifted**: from a full window of unshifted frames, the same pool 25 % brighter, then with
  gamma 0.7: after how many frames each figure passed its alert line (up to 300).

It also times :func:`dfm_stream.drift.image_stats` per frame against the model's own scoring.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dfm_stream.drift import ImageStatsCollector, Window, compare, image_stats
from dfm_stream.images import IMAGENET_MEAN, IMAGENET_STD, preprocess
from dfm_stream.model import Dfm
from dfm_stream.model.dfm import DFMModel
from dfm_stream.synthetic_parts import render_part

CHANGES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "brightness x1.25": lambda f: np.clip(f.astype(np.float32) * 1.25, 0, 255).astype(np.uint8),
    "gamma 0.7": lambda f: (255.0 * (f / 255.0) ** 0.7).round().astype(np.uint8),
}


def _score(
    model: DFMModel, frames: list[np.ndarray], size: int
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Return scores, image statistics and seconds spent in each, for ``frames`` in batches of 16."""
    scores, stats, t_model, t_stats = [], [], 0.0, 0.0
    for i in range(0, len(frames), 16):
        batch = preprocess(frames[i : i + 16], (size, size))
        t0 = time.perf_counter()
        with torch.inference_mode():
            scores.append(model(batch).pred_score.double().numpy())
        t1 = time.perf_counter()
        stats.append(image_stats(batch, IMAGENET_MEAN, IMAGENET_STD))
        t_model, t_stats = t_model + t1 - t0, t_stats + time.perf_counter() - t1
    return np.concatenate(scores), np.concatenate(stats), t_model, t_stats


def _first_crossings(window: Window, reference: Any, scores: np.ndarray, stats: np.ndarray, rng: Any) -> dict:
    crossed: dict[str, int] = {}
    verdict_at = None
    for n, i in enumerate(rng.integers(0, len(scores), 300), start=1):
        window.add(scores[i : i + 1], stats[i : i + 1])
        figures = compare(window, reference)
        for f in figures.figures:
            if f.past_alert and f.name not in crossed:
                crossed[f.name] = n
        if verdict_at is None and figures.verdict == "drift":
            verdict_at = n
    after = {f.name: round(f.value or 0, 3) for f in compare(window, reference).figures}
    return {"verdict_drift_after_frames": verdict_at, "figure_past_line_after_frames": crossed,
            "after_300": after}  # fmt: skip


def drift_replay(
    size: int = 128,
    n_train: int = 200,
    n_calib: int = 200,
    n_pool: int = 1000,
    frames: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the measurement; return its figures as a JSON-ready dict."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    train, calib, pool = ([render_part(rng, size)[0] for _ in range(n)] for n in (n_train, n_calib, n_pool))
    trainer = Dfm(
        backbone="resnet18", layer="layer2", pre_trained=False, pooling_kernel_size=4, pca_level=0.97
    )
    collector = ImageStatsCollector(IMAGENET_MEAN, IMAGENET_STD)
    model = trainer.fit(
        collector.tap(preprocess(train[i : i + 16], (size, size)) for i in range(0, n_train, 16))
    )
    calib_scores = _score(model, calib, size)[0]
    reference = collector.reference().with_scores(calib_scores)
    scores, stats, t_model, t_stats = _score(model, pool, size)
    window, drift_frames = Window(), 0
    worst: dict[str, float] = {}
    for i in rng.integers(0, n_pool, frames):
        window.add(scores[i : i + 1], stats[i : i + 1])
        figures = compare(window, reference)
        drift_frames += figures.verdict == "drift"
        for f in figures.figures:
            worst[f.name] = max(worst.get(f.name, 0.0), f.value or 0.0)
    shifted = {}
    for name, change in CHANGES.items():
        s_scores, s_stats, _, _ = _score(model, [change(f) for f in pool], size)
        full = Window()
        full.add(scores[rng.integers(0, n_pool, full.size)], stats[rng.integers(0, n_pool, full.size)])
        shifted[name] = _first_crossings(full, reference, s_scores, s_stats, rng)
    return {
        "settings": {"size": size, "n_train": n_train, "n_calib": n_calib, "n_pool": n_pool, "frames": frames,
                     "seed": seed, "model": "resnet18/layer2 random weights, pooling 4, pca 0.97",
                     "torch_threads": torch.get_num_threads()},
        "unshifted": {"frames": frames, "frames_with_verdict_drift": drift_frames,
                      "max": {k: round(v, 3) for k, v in worst.items()}},
        "shifted": shifted,
        "cost_per_frame_ms": {"image_stats": round(1000 * t_stats / n_pool, 3),
                              "model": round(1000 * t_model / n_pool, 3)},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run :func:`drift_replay` and print its JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--pool", type=int, default=1000)
    p.add_argument("--frames", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(drift_replay(args.size, n_pool=args.pool, frames=args.frames, seed=args.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

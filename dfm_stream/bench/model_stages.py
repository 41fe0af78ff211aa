"""Benchmark stages that run the model in this process, on pre-made tensors.

* ``backbone``: the bare feature extractor, run exactly as the worker's :class:`Engine` runs it
  (same backend, memory layout and precision): the ceiling of the service.
* ``dfm``: features + PCA score through :meth:`Engine.score`, the worker's own model step.
* ``backends``: the same backbone under every execution backend of :mod:`dfm_stream.backends`,
  each checked against fp32 eager scores (within :data:`~dfm_stream.backends.SCORE_RTOL`).
* ``fit``: fitting on generated 256x256 images in a fresh process, for its time and peak memory.

The bench model has random backbone weights (nothing to download) and a PCA fitted on a few
generated parts: the arithmetic per image is the same as with ImageNet weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from dfm_stream import backends
from dfm_stream.errors import BackendError, DfmStreamError
from dfm_stream.images import preprocess
from dfm_stream.inference import Engine
from dfm_stream.model.dfm import DFMModel
from dfm_stream.synthetic_parts import DEFECT_TYPES, render_part

log = logging.getLogger(__name__)

FIT_BATCHES = 3
"""How many batches of generated parts the bench model's PCA is fitted on."""


@dataclass
class BenchModel:
    """A fitted bench model (fp32, contiguous, on the device) and pre-made normalised batches."""

    model: DFMModel
    image_size: tuple[int, int]
    batch: torch.Tensor
    check_batch: torch.Tensor
    n_train: int


def synthetic_frames(n: int, size: int, seed: int, defect_every: int = 0) -> list[np.ndarray]:
    """Render ``n`` BGR parts of ``size`` px; every ``defect_every``-th has a defect (0: none)."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        defect = DEFECT_TYPES[i % len(DEFECT_TYPES)] if defect_every and i % defect_every == 0 else None
        frames.append(render_part(rng, size, defect)[0])
    return frames


def make_bench_model(
    backbone: str, layer: str, image_size: int, batch_size: int, device: torch.device
) -> BenchModel:
    """Build a random-weights DFM model, fit its PCA on a few generated batches, pre-make batches."""
    size = (image_size, image_size)
    torch.manual_seed(0)
    model = DFMModel(backbone=backbone, layer=layer, pre_trained=False, n_comps=0.97).to(device).eval()
    n_train = max(FIT_BATCHES * batch_size, 8)
    train = preprocess(synthetic_frames(n_train, image_size, seed=1), size)
    chunks = [model.get_features(part.to(device))[0] for part in torch.split(train, batch_size)]
    model.fit(torch.cat(chunks))
    batch = preprocess(synthetic_frames(batch_size, image_size, seed=2, defect_every=3), size).to(device)
    check = preprocess(synthetic_frames(max(batch_size, 4), image_size, seed=3, defect_every=2), size)
    return BenchModel(model, size, batch, check.to(device), n_train)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Rate:
    """A throughput: over the whole window (``rate``), and from the median and the fastest call.

    On a machine shared with other processes the per-call figures show what the code does when
    it has the cores (``best_rate``) and what it typically gets (``median_rate``).
    """

    rate: float
    median_rate: float
    best_rate: float
    calls: int

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a dict (for the JSON details)."""
        return dataclasses.asdict(self)


def time_rate(fn: Callable[[], object], n_per_call: int, duration: float, device: torch.device) -> Rate:
    """Call ``fn`` (after two warm-up calls) until ``duration`` s passed; return items per second."""
    for _ in range(2):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        now = time.perf_counter()
        times.append(now - t0)
        if now - start >= duration:
            return Rate(
                rate=len(times) * n_per_call / (now - start),
                median_rate=n_per_call / statistics.median(times),
                best_rate=n_per_call / min(times),
                calls=len(times),
            )


class ModelStages:
    """The in-process stages over one :class:`BenchModel`; runners are built once, timed per repeat."""

    def __init__(self, bench: BenchModel, engine: Engine) -> None:
        self.bench = bench
        self.engine = engine
        self.device = engine.device
        self._engine_model = engine.prepare(copy.deepcopy(bench.model), bench.image_size)
        self._runner = engine.runner(self._engine_model.feature_extractor, bench.image_size)
        self.backend = self._runner.backend
        self._backends: dict[str, backends.BackboneRunner] = {}
        self.backend_info: dict[str, dict[str, Any]] = {}

    def backbone(self, duration: float) -> Rate:
        """Return images/s of the bare backbone on the pre-made batch (engine's backend, precision)."""
        batch = self.bench.batch

        def call() -> None:
            with self.engine.autocast_scope():
                self._runner(batch)

        return time_rate(call, len(batch), duration, self.device)

    def dfm(self, duration: float) -> Rate:
        """Return images/s of features + PCA score through the worker's ``Engine.score``."""
        batch = self.bench.batch
        return time_rate(
            lambda: self.engine.score(self._engine_model, batch), len(batch), duration, self.device
        )

    def prepare_backends(self, names: list[str]) -> None:
        """Build each backend's runner once (export/compile) and check its scores against fp32 eager."""
        model = self.bench.model
        check = self.bench.check_batch
        reference_map = backends.build_backbone_runner(model.feature_extractor, "eager", check)(check)
        reference = score_feature_map(model, reference_map)
        for name in names:
            info: dict[str, Any] = {"available": backends.is_available(name, self.device)}
            self.backend_info[name] = info
            if not info["available"]:
                info["error"] = "not installed here (or not for this device)"
                continue
            start = time.perf_counter()
            try:
                runner = backends.build_backbone_runner(model.feature_extractor, name, self.bench.batch)
                feature_map = runner(check)
            except BackendError as e:
                info.update(available=False, error=str(e))
                log.warning("backend %s skipped: %s", name, e)
                continue
            info["build_s"] = time.perf_counter() - start
            info["score_max_rel_diff"] = backends.max_relative_difference(
                reference, score_feature_map(model, feature_map)
            )
            scale = float(reference_map.abs().max().item()) or 1.0
            info["feature_max_abs_diff"] = float((feature_map - reference_map).abs().max().item())
            info["feature_max_abs_diff_rel_to_max"] = info["feature_max_abs_diff"] / scale
            info["passes"] = info["score_max_rel_diff"] <= backends.SCORE_RTOL
            self._backends[name] = runner

    def prepared_backends(self) -> list[str]:
        """Return the backends :meth:`prepare_backends` could build, in order."""
        return list(self._backends)

    def backend_rate(self, name: str, duration: float) -> Rate:
        """Return images/s of one prepared backend on the pre-made batch."""
        runner, batch = self._backends[name], self.bench.batch
        return time_rate(lambda: runner(batch), len(batch), duration, self.device)


def score_feature_map(model: DFMModel, feature_map: torch.Tensor) -> torch.Tensor:
    """Pool a backbone feature map as the model does and return its DFM scores (fp32 math)."""
    with torch.inference_mode():
        features = feature_map.float().to(model.device)
        if model.pooling_kernel_size > 1:
            features = F.avg_pool2d(features, kernel_size=model.pooling_kernel_size)
        shapes = features.shape
        return model.score(features.reshape(shapes[0], -1), shapes).pred_score


FIT_CHILD = """
import json, sys
from dfm_stream.bench.model_stages import fit_child
print(json.dumps(fit_child(json.loads(sys.argv[1]))))
"""


def run_fit(
    workdir: Path, n_images: int, image_size: int, batch_size: int, backbone: str, layer: str, device: str
) -> dict[str, Any]:
    """Generate ``n_images`` training parts, fit a model on them in a fresh process, report time and RSS."""
    from dfm_stream.synthetic_parts import make_dataset

    root = workdir / f"fit-{n_images}-{image_size}"
    start = time.perf_counter()
    if not (root / "train" / "good").is_dir():
        make_dataset(root, n_train=n_images, n_test_good=0, n_test_defect=0, size=image_size, seed=7)
    generate_s = time.perf_counter() - start
    args = {
        "folder": str(root / "train" / "good"),
        "image_size": image_size,
        "batch_size": batch_size,
        "backbone": backbone,
        "layer": layer,
        "device": device,
    }
    proc = subprocess.run(
        [sys.executable, "-c", FIT_CHILD, json.dumps(args)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise DfmStreamError(f"bench fit stage failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["generate_s"] = generate_s
    return result


def fit_child(args: dict[str, Any]) -> dict[str, Any]:
    """Fit in this (fresh) process and measure; run by :func:`run_fit` through ``python -c``."""
    from dfm_stream.bench.env import read_proc_status_kib, reset_peak_rss
    from dfm_stream.images import iter_batches, list_images
    from dfm_stream.inference import resolve_device
    from dfm_stream.model.trainer import Dfm

    device = resolve_device(args["device"])
    trainer = Dfm(backbone=args["backbone"], layer=args["layer"], pre_trained=False, device=device)
    paths = list_images(args["folder"])
    size = (args["image_size"], args["image_size"])
    model_rss = read_proc_status_kib("VmRSS") or 0
    peak_reset = reset_peak_rss()
    start = time.perf_counter()
    model = trainer.fit(batch for _, batch in iter_batches(paths, args["batch_size"], size))
    seconds = time.perf_counter() - start
    peak = read_proc_status_kib("VmHWM") or 0
    return {
        "images": len(paths),
        "image_size": args["image_size"],
        "seconds": seconds,
        "images_per_s": len(paths) / seconds,
        "n_components": model.pca_model.k,
        "rss_after_model_bytes": model_rss * 1024,
        "peak_rss_bytes": peak * 1024,
        "peak_beyond_model_bytes": max(0, peak - model_rss) * 1024,
        "peak_reset": peak_reset,
    }

"""The demo's model: which backbone for this machine, which weights, and the warm-up fit + calibration.

The warm-up frames come from the same synthetic conveyor the cameras show (another seed, no
defects), rendered in-process without pacing, so fitting takes seconds instead of a minute of
waiting for the cameras. The threshold is the highest score of held-out good frames times a safety
margin (``--margin``), stored in the artifact with the score statistics, exactly as
``dfm-stream calibrate`` stores them.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dfm_stream.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from dfm_stream.demo.app import DemoSettings
    from dfm_stream.model import DFMModel

BATCH = 16
CPU_DEFAULTS = ("resnet18", "layer2", 128)
GPU_DEFAULTS = ("resnet50", "layer3", 256)
POOLING = 4
PCA_LEVEL = 0.97


@dataclass(frozen=True)
class ModelPlan:
    """What the demo fits: backbone, layer, image size, device and where the weights come from."""

    backbone: str
    layer: str
    size: int
    device: str
    pre_trained: bool
    weights: Path | None
    weights_note: str


def resolve_device(name: str) -> str:
    """Return ``cuda`` or ``cpu`` for ``auto``/``cpu``/``cuda``; a clear error for cuda without a GPU."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available: use auto or cpu")
    return name


def cached_imagenet_weights(backbone: str) -> Path | None:
    """Return torchvision's cached ImageNet weights file of ``backbone`` (under TORCH_HOME), if present."""
    import torch

    from dfm_stream.model.backbone import SUPPORTED_BACKBONES

    if backbone not in SUPPORTED_BACKBONES:
        return None
    url = SUPPORTED_BACKBONES[backbone][1].DEFAULT.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return path if path.is_file() else None


def plan_model(settings: "DemoSettings") -> ModelPlan:
    """Pick the model for this machine: resnet18/layer2/128 px on CPU, resnet50/layer3/256 px on GPU."""
    device = resolve_device(settings.device)
    backbone, layer, size = CPU_DEFAULTS if device == "cpu" else GPU_DEFAULTS
    backbone = settings.backbone or backbone
    layer = settings.layer or layer
    size = settings.size or size
    if settings.weights is not None:
        if not settings.weights.is_file():
            raise ConfigError(f"--weights {settings.weights}: no such file (a torchvision state dict)")
        note = f"backbone weights from {settings.weights}"
        return ModelPlan(backbone, layer, size, device, False, settings.weights, note)
    cached = cached_imagenet_weights(backbone)
    if cached is not None:
        note = f"ImageNet weights from torchvision's cache ({cached})"
        return ModelPlan(backbone, layer, size, device, True, None, note)
    note = (
        "random backbone weights (pre_trained=False): no --weights FILE given and no ImageNet weights"
        " in torchvision's cache (TORCH_HOME). That is enough for the synthetic parts; for real images"
        " use --weights FILE or pre-trained weights (see the README)"
    )
    return ModelPlan(backbone, layer, size, device, False, None, note)


def _frames(seed: int, count: int, settings: "DemoSettings", size: int) -> "list[np.ndarray]":
    from dfm_stream.sources.synthetic import SyntheticSource

    source = SyntheticSource(seed=seed, defect_rate=0.0, fps=settings.fps, size=(size, size))
    source.open()
    try:
        return [source.read().image for _ in range(count)]
    finally:
        source.close()


def _scores(model: "DFMModel", frames: "list[np.ndarray]", size: int, progress: Progress) -> list[float]:
    import torch

    from dfm_stream.images import preprocess

    task = progress.add_task("calibrating on held-out good frames", total=len(frames))
    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(frames), BATCH):
            chunk = frames[i : i + BATCH]
            out += model(preprocess(chunk, (size, size)).to(model.device)).pred_score.tolist()
            progress.advance(task, len(chunk))
    return out


def fit_demo_model(plan: ModelPlan, settings: "DemoSettings", out: Path, console: Console) -> dict[str, Any]:
    """Fit on good warm-up frames, calibrate, write the artifact to ``out``; return what to report."""
    import time

    from dfm_stream.artifact import ArtifactInfo, save_artifact, update_calibration
    from dfm_stream.evaluate import quantile_threshold
    from dfm_stream.images import preprocess
    from dfm_stream.model import Dfm

    console.print(f"model: DFM on {plan.backbone}/{plan.layer}, {plan.size}x{plan.size} px, {plan.device}")
    console.print(f"weights: {plan.weights_note}")
    size = plan.size
    train = _frames(settings.seed + 1000, settings.warmup, settings, size)
    held_out = _frames(settings.seed + 2000, settings.calibration, settings, size)
    trainer = Dfm(
        backbone=plan.backbone,
        layer=plan.layer,
        pre_trained=plan.pre_trained,
        pooling_kernel_size=POOLING,
        pca_level=PCA_LEVEL,
        weights=plan.weights,
        device=plan.device,
    )
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("fitting on good warm-up frames", total=len(train))
        batches = (preprocess(train[i : i + BATCH], (size, size)) for i in range(0, len(train), BATCH))
        model = trainer.fit(batches, on_batch=lambda n: progress.advance(task, n))
        scores = _scores(model, held_out, size, progress)
    info = ArtifactInfo.for_model(model, (size, size), trainer.n_train)
    save_artifact(out, model, info)
    threshold = quantile_threshold(scores, 0.0) * settings.margin
    info = update_calibration(out, threshold, min(scores), max(scores))
    elapsed = time.perf_counter() - started
    console.print(
        f"fitted on {trainer.n_train} frames (k={model.pca_model.k} components) in {elapsed:.1f} s;"
        f" threshold {threshold:.4g} = highest of {len(scores)} held-out good scores x {settings.margin}"
    )
    return {
        "path": str(out),
        "backbone": plan.backbone,
        "layer": plan.layer,
        "image_size": size,
        "device": plan.device,
        "pre_trained": plan.pre_trained,
        "weights": str(plan.weights) if plan.weights else None,
        "weights_note": plan.weights_note,
        "n_train": trainer.n_train,
        "n_components": model.pca_model.k,
        "threshold": info.threshold,
        "fit_seconds": round(elapsed, 2),
    }

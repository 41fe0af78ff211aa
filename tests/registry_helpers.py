"""Tiny fitted artifacts for the registry, CLI and hot-reload tests (resnet18, random weights, 64 px)."""

from __future__ import annotations

import dataclasses
import functools

import torch

from dfm_stream.artifact import ArtifactInfo, artifact_to_bytes
from dfm_stream.model import DFMModel


@functools.cache
def tiny_artifact(
    layer: str = "layer1", seed: int = 0, threshold: float | None = None, data_seed: int | None = None
) -> bytes:
    """Artifact bytes of a resnet18 DFM model fitted on 10 random 64 px images (cached per arguments).

    ``seed`` draws the backbone's random weights; ``data_seed`` (default ``seed + 1``) the images
    the PCA is fitted on, so two artifacts with one ``seed`` share a backbone and differ in the fit.
    """
    torch.manual_seed(seed)
    model = DFMModel("resnet18", layer, pre_trained=False, pooling_kernel_size=4, n_comps=0.9).eval()
    gen = torch.Generator().manual_seed(seed + 1 if data_seed is None else data_seed)
    features, _ = model.get_features(torch.randn(10, 3, 64, 64, generator=gen))
    model.fit(features)
    info = ArtifactInfo.for_model(model, (64, 64), n_train=10)
    if threshold is not None:
        info = dataclasses.replace(info, threshold=float(threshold))
    return artifact_to_bytes(model, info)

"""Small helpers shared by the model, artifact and CLI tests (tiny resnet18 models, random weights)."""

from __future__ import annotations

import torch

from dfm_stream.model import DFMModel

TINY = {"backbone": "resnet18", "layer": "layer2", "pre_trained": False, "pooling_kernel_size": 2}


def tiny_model(score_type: str = "fre", n_comps: float = 0.9, seed: int = 0) -> DFMModel:
    """A resnet18/layer2 model with seeded random weights."""
    torch.manual_seed(seed)
    return DFMModel(**TINY, n_comps=n_comps, score_type=score_type).eval()


def image_batch(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """A seeded batch of normalised-looking images."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen)


def fitted_tiny_model(score_type: str = "fre", n_train: int = 24, seed: int = 0) -> DFMModel:
    """A tiny model fitted on random images."""
    model = tiny_model(score_type=score_type, seed=seed)
    features, _ = model.get_features(image_batch(n_train, seed=seed + 1))
    model.fit(features)
    return model

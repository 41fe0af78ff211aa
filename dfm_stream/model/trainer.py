"""``Dfm``: the high-level trainer. One pass over image batches, no optimiser, a fitted model."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from dfm_stream.errors import ModelConfigError
from dfm_stream.model.dfm import DFMModel, ScoreType

logger = logging.getLogger(__name__)


def _images_of(batch: Any) -> torch.Tensor:
    """Accept a tensor, a mapping with an ``"image"`` entry, or an object with an ``image`` attribute."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping) and "image" in batch:
        return batch["image"]
    if isinstance(getattr(batch, "image", None), torch.Tensor):
        return batch.image
    msg = f"a training batch must be an image tensor (N, 3, H, W) or have an 'image' entry, got {type(batch)}"
    raise ModelConfigError(msg)


class LearningType(enum.StrEnum):
    """What kind of training data a model needs."""

    ONE_CLASS = "one_class"


class Dfm:
    """Fit a :class:`DFMModel` from an iterable of normalised image batches ``(N, 3, H, W)``.

    A batch may also be a mapping with an ``"image"`` entry or an object with an ``image``
    attribute (as in the reference's data loaders).

    Features are collected in one pass (only feature vectors are kept, never the images), then
    PCA (and the Gaussian for ``nll``) is fitted. ``pca_level`` is the reference's name for
    ``n_comps``.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        layer: str = "layer3",
        pre_trained: bool = True,
        pooling_kernel_size: int = 4,
        pca_level: float = 0.97,
        score_type: str | ScoreType = "fre",
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = DFMModel(
            backbone=backbone,
            layer=layer,
            pre_trained=pre_trained,
            pooling_kernel_size=pooling_kernel_size,
            n_comps=pca_level,
            score_type=score_type,
            weights=weights,
        ).to(device)
        self.n_train = 0

    @property
    def learning_type(self) -> LearningType:
        """DFM learns from good images only."""
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """One epoch, no gradient clipping, no sanity checks (kept for users of the reference)."""
        return {"gradient_clip_val": 0, "max_epochs": 1, "num_sanity_val_steps": 0}

    @staticmethod
    def configure_optimizers() -> None:
        """DFM needs no optimiser."""
        return

    def collect_features(
        self,
        batches: Iterable[torch.Tensor],
        on_batch: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Run the backbone over ``batches`` once and return the stacked ``(N, D)`` features."""
        chunks: list[torch.Tensor] = []
        for batch in batches:
            features, _ = self.model.get_features(_images_of(batch))
            chunks.append(features)
            if on_batch is not None:
                on_batch(len(features))
        if not chunks:
            msg = "no training images: the training batches were empty"
            raise ModelConfigError(msg)
        features = torch.cat(chunks)
        chunks.clear()
        return features

    def fit(
        self,
        batches: Iterable[torch.Tensor],
        on_batch: Callable[[int], None] | None = None,
    ) -> DFMModel:
        """Collect features from ``batches``, fit and return the model (in eval mode).

        ``on_batch(n)`` is called after each batch with its number of images (for progress bars).
        """
        features = self.collect_features(batches, on_batch)
        self.n_train = len(features)
        if self.n_train < 2:
            msg = f"DFM needs at least 2 training images, got {self.n_train}"
            raise ModelConfigError(msg)
        self.model.fit(features)
        logger.info(
            "fitted DFM on %d images: %d features, k=%d",
            self.n_train,
            features.shape[1],
            self.model.pca_model.k,
        )
        return self.model.eval()

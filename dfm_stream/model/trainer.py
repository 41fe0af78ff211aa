"""``Dfm``: the high-level trainer. One pass over image batches, no optimiser, a fitted model.

Two ways to train, both ending in the same fitted :class:`DFMModel`:

- ``fit(batches)``: the trainer iterates the batches itself (the CLI, the demo);
- the reference's loop: ``training_step(batch)`` for each training batch (features go into the
  memory bank), then ``fit()`` (PCA, and the Gaussian for ``nll``, on the whole bank), then
  ``validation_step(batch)`` for each batch to score.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from dfm_stream.errors import ModelConfigError, NotFittedError
from dfm_stream.model.dfm import DFMModel, ScoreType

logger = logging.getLogger(__name__)

_BATCH_KINDS = "an image tensor, a mapping with an 'image' entry or an object with an 'image' attribute"


def _images_of(batch: Any) -> torch.Tensor:
    """Return the ``(N, 3, H, W)`` float images of a tensor, a mapping or an object with ``image``."""
    images: object
    if isinstance(batch, torch.Tensor):
        images = batch
    elif isinstance(batch, Mapping):
        images = batch.get("image")
    else:
        images = getattr(batch, "image", None)
    if images is None:
        msg = f"a batch must be {_BATCH_KINDS}; got a {type(batch).__name__} without images"
        raise ModelConfigError(msg)
    if not isinstance(images, torch.Tensor):
        msg = f"batch images must be a float tensor (N, 3, H, W), got a {type(images).__name__}"
        raise ModelConfigError(msg)
    if images.ndim != 4 or images.shape[1] != 3:
        msg = f"batch images must be a float tensor (N, 3, H, W), got shape {tuple(images.shape)}"
        raise ModelConfigError(msg)
    if not images.is_floating_point():
        msg = (
            f"batch images must be normalised floats (N, 3, H, W), got dtype {images.dtype}: "
            "normalise them first (dfm_stream.images.preprocess)"
        )
        raise ModelConfigError(msg)
    return images


def _check_feature_width(chunks: list[torch.Tensor], features: torch.Tensor, images: torch.Tensor) -> None:
    """Refuse a batch whose feature length differs from the batches collected before it."""
    if chunks and features.shape[1] != chunks[0].shape[1]:
        msg = (
            f"a batch of {tuple(images.shape[-2:])} px images gives {features.shape[1]} features, "
            f"earlier batches gave {chunks[0].shape[1]}: give every training image the same size"
        )
        raise ModelConfigError(msg)


def _with_predictions(batch: Any, predictions: dict[str, torch.Tensor]) -> Any:
    """Return ``batch`` of the same kind with ``predictions`` added; ``batch`` is not modified.

    A mapping gives a new ``dict``; a dataclass a :func:`dataclasses.replace` copy (predictions
    that are not fields are set as attributes on the copy); any other object a shallow copy with
    the predictions set as attributes.
    """
    if isinstance(batch, Mapping):
        return {**batch, **predictions}
    rest = dict(predictions)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        names = {f.name for f in dataclasses.fields(batch) if f.init}
        out = dataclasses.replace(batch, **{k: rest.pop(k) for k in predictions if k in names})
    else:
        out = copy.copy(batch)
    for name, value in rest.items():
        try:
            setattr(out, name, value)
        except (AttributeError, TypeError) as e:  # frozen dataclass, __slots__, read-only property
            msg = (
                f"cannot add {name!r} to a {type(batch).__name__} batch ({e}): "
                f"give it a {name!r} field or pass a mapping"
            )
            raise ModelConfigError(msg) from e
    return out


class LearningType(enum.StrEnum):
    """What kind of training data a model needs."""

    ONE_CLASS = "one_class"


class Dfm:
    """Fit a :class:`DFMModel` from normalised image batches ``(N, 3, H, W)``.

    A batch may also be a mapping with an ``"image"`` entry or an object with an ``image``
    attribute (as in the reference's data loaders).

    Only feature vectors are kept, never the images: ``fit(batches)`` collects them in one pass;
    ``training_step(batch)`` appends them to :attr:`memory_bank` (a list of ``(N, D)`` tensors,
    concatenated by ``fit()``). Then PCA (and the Gaussian for ``nll``) is fitted.
    ``pca_level`` is the reference's name for ``n_comps``.
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
        self.memory_bank: list[torch.Tensor] = []

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
        batches: Iterable[Any],
        on_batch: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Run the backbone over ``batches`` once and return the stacked ``(N, D)`` features."""
        chunks: list[torch.Tensor] = []
        for batch in batches:
            images = _images_of(batch)
            features, _ = self.model.get_features(images)
            _check_feature_width(chunks, features, images)
            chunks.append(features)
            if on_batch is not None:
                on_batch(len(features))
        if not chunks:
            msg = "no training images: the training batches were empty"
            raise ModelConfigError(msg)
        features = torch.cat(chunks)
        chunks.clear()
        return features

    def training_step(self, batch: Any, *args: Any, **kwargs: Any) -> None:
        """Extract the backbone features of ``batch`` and append them to :attr:`memory_bank`.

        Nothing is fitted until :meth:`fit` is called. ``args`` and ``kwargs`` (the batch index
        the reference's loops pass) are ignored. A bad batch raises :class:`ModelConfigError` and
        leaves the memory bank as it was.
        """
        del args, kwargs
        images = _images_of(batch)
        features, _ = self.model.get_features(images)
        _check_feature_width(self.memory_bank, features, images)
        self.memory_bank.append(features)

    def validation_step(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        """Score ``batch`` and return it with the predictions added; ``batch`` is not modified.

        The predictions are ``pred_score`` ``(N,)`` and, for ``fre``, ``anomaly_map``
        ``(N, 1, H, W)`` at the input size. A mapping comes back as a new ``dict``, a dataclass
        as a :func:`dataclasses.replace` copy, another object as a shallow copy with the
        predictions set as attributes. Runs in eval mode without gradients (the model's mode is
        restored afterwards); :class:`NotFittedError` before :meth:`fit`.
        """
        del args, kwargs
        if not self.model.fitted:
            msg = "validation_step before fit: call training_step() on the training batches, then fit()"
            raise NotFittedError(msg)
        images = _images_of(batch)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                result = self.model(images)
        finally:
            self.model.train(was_training)
        predictions = {"pred_score": result.pred_score}
        if result.anomaly_map is not None:
            predictions["anomaly_map"] = result.anomaly_map
        return _with_predictions(batch, predictions)

    def fit(
        self,
        batches: Iterable[Any] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> DFMModel:
        """Fit and return the model (in eval mode) from ``batches``, or from the memory bank.

        ``fit(batches)`` collects features from ``batches``; ``on_batch(n)`` is called after each
        batch with its number of images (for progress bars). ``fit()`` fits on everything
        :meth:`training_step` put in :attr:`memory_bank`, as the reference does, and empties the
        bank once the fit succeeded (after a failure the bank is kept, so more batches can be
        added and ``fit()`` tried again). Giving ``batches`` while the bank holds features is
        refused with :class:`ModelConfigError` (the two ways of training are not mixed; the
        bank is kept): call ``fit()`` for the bank, or clear ``memory_bank`` first.
        """
        if batches is None:
            if not self.memory_bank:
                msg = (
                    "fit() with no batches fits the memory bank, but it is empty: "
                    "call training_step(batch) for each training batch first, or pass fit(batches)"
                )
                raise ModelConfigError(msg)
            features = torch.cat(self.memory_bank)
        else:
            if self.memory_bank:
                msg = (
                    f"fit(batches) while the memory bank holds {sum(len(f) for f in self.memory_bank)} "
                    "images from training_step(): call fit() to fit the bank, or clear "
                    "memory_bank before fit(batches)"
                )
                raise ModelConfigError(msg)
            features = self.collect_features(batches, on_batch)
        self._fit_features(features)
        self.memory_bank.clear()
        return self.model.eval()

    def _fit_features(self, features: torch.Tensor) -> None:
        """Fit the model on ``(N, D)`` features; at least 2 images are needed."""
        if len(features) < 2:
            msg = f"DFM needs at least 2 training images, got {len(features)}"
            raise ModelConfigError(msg)
        self.model.fit(features)
        self.n_train = len(features)
        logger.info(
            "fitted DFM on %d images: %d features, k=%d",
            self.n_train,
            features.shape[1],
            self.model.pca_model.k,
        )

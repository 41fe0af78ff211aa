"""DFM (Deep Feature Modeling): backbone features -> PCA -> reconstruction error or Gaussian NLL.

Pure PyTorch. Module and buffer names mirror the reference (anomalib's ``DFMModel``) so that
state dicts line up: ``feature_extractor.*`` holds torchvision-named backbone weights,
``pca_model.{singular_vectors,singular_values,mean,num_components}`` and
``gaussian_model.{mean_vec,u_mat,sigma_mat}`` the fitted statistics.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from dfm_stream.errors import ModelConfigError, NotFittedError, ScoreTypeError
from dfm_stream.model.backbone import build_feature_extractor
from dfm_stream.model.gaussian import SingleClassGaussian
from dfm_stream.model.pca import PCA

__all__ = ["DFMModel", "DFMResult", "ScoreType", "SingleClassGaussian"]


class ScoreType(enum.StrEnum):
    """How an image is scored: feature reconstruction error or Gaussian negative log-likelihood."""

    FRE = "fre"
    NLL = "nll"

    @classmethod
    def parse(cls, value: str | ScoreType) -> ScoreType:
        """Validate ``value`` (``"fre"`` or ``"nll"``) into a :class:`ScoreType`."""
        try:
            return cls(str(value).lower())
        except ValueError as e:
            msg = f"unknown score type {value!r}: choose 'fre' or 'nll'"
            raise ModelConfigError(msg) from e


class DFMResult(NamedTuple):
    """Scores of a batch: ``pred_score`` (N,) and, for ``fre``, ``anomaly_map`` (N, 1, H, W)."""

    pred_score: torch.Tensor
    anomaly_map: torch.Tensor | None


class DFMModel(nn.Module):
    """Deep Feature Modeling anomaly detector.

    Args:
        backbone: torchvision ResNet-family name (see ``SUPPORTED_BACKBONES``).
        layer: ``layer1`` .. ``layer4``: the stage whose output is the feature map.
        pre_trained: load torchvision's ImageNet weights (``False``: random weights).
        pooling_kernel_size: average pooling kernel (and stride) applied to the feature map.
        n_comps: PCA level, a variance ratio (``<= 1``) or a number of components (``> 1``).
        score_type: ``"fre"`` (reconstruction error, with anomaly maps) or ``"nll"``.
        weights: path of a local torchvision state dict; takes precedence over ``pre_trained``.

    The backbone always runs in eval mode without gradients; ``train()``/``eval()`` do not change
    what any method returns.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        layer: str = "layer3",
        pre_trained: bool = True,
        pooling_kernel_size: int = 4,
        n_comps: float = 0.97,
        score_type: str | ScoreType = "fre",
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        if int(pooling_kernel_size) < 1:
            msg = f"pooling_kernel_size must be >= 1, got {pooling_kernel_size}"
            raise ModelConfigError(msg)
        self.backbone = backbone
        self.layer = layer
        self.pooling_kernel_size = int(pooling_kernel_size)
        self.n_components = n_comps
        self.score_type = ScoreType.parse(score_type)
        self.pca_model = PCA(n_components=n_comps)
        self.gaussian_model = SingleClassGaussian()
        self.feature_extractor, self.weights_id = build_feature_extractor(
            backbone, layer, pre_trained=pre_trained, weights=weights
        )
        self.feature_extractor.requires_grad_(False)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load a state dict of ours or of the reference implementation.

        The reference nests its backbone one level deeper (``feature_extractor.feature_extractor.*``),
        keeps backbone stages past ``layer`` and does not store ``pca_model.singular_values``
        (scoring never uses them); such a state dict is mapped onto ours, so weights and fitted
        statistics carry over in both directions.
        """
        return super().load_state_dict(_from_reference_layout(state_dict, self), strict=strict, assign=assign)

    def train(self, mode: bool = True) -> DFMModel:
        """Set the training flag; the backbone stays in eval mode (frozen batch-norm statistics)."""
        super().train(mode)
        self.feature_extractor.eval()
        return self

    @property
    def device(self) -> torch.device:
        """The device of the model's tensors."""
        return next(self.feature_extractor.parameters()).device

    @property
    def fitted(self) -> bool:
        """Whether the PCA (and, for ``nll``, the Gaussian) has been fitted."""
        if not self.pca_model.fitted:
            return False
        return self.score_type is ScoreType.FRE or self.gaussian_model.fitted

    def get_features(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        """Return ``(features (N, C*H'*W'), feature_shapes (N, C, H', W'))`` for a normalised batch.

        Any memory layout works (channels_last, non-contiguous views); the flattening order is
        always channel-major.
        """
        with torch.no_grad():
            batch = batch.to(self.device, torch.float32)
            features = self.feature_extractor(batch)
            if self.pooling_kernel_size > 1:
                features = F.avg_pool2d(features, kernel_size=self.pooling_kernel_size)
            feature_shapes = features.shape
            features = features.reshape(feature_shapes[0], -1)
        return features, feature_shapes

    def fit(self, features: torch.Tensor) -> None:
        """Fit the PCA (and, for ``nll``, the Gaussian on the projected features) on ``(N, D)``."""
        features = features.to(self.device)
        self.pca_model.fit(features)
        if self.score_type is ScoreType.NLL:
            if self.pca_model.k == 0:
                msg = f"nll: PCA level {self.n_components} keeps 0 components; raise n_comps"
                raise ModelConfigError(msg)
            self.gaussian_model.fit(self.pca_model.transform(features).T)

    def _check_fitted(self) -> None:
        if not self.fitted:
            msg = "DFMModel is not fitted: call fit() with training features, or load an artifact"
            raise NotFittedError(msg)

    def score(self, features: torch.Tensor, feature_shapes: torch.Size | tuple[int, ...]) -> DFMResult:
        """Score ``(N, D)`` features.

        Returns a :class:`DFMResult`; for ``fre`` its ``anomaly_map`` is at feature resolution
        ``(N, 1, H', W')`` (:meth:`forward` upsamples it to the input size); for ``nll`` it is None.
        """
        self._check_fitted()
        with torch.no_grad():
            features = features.reshape(features.shape[0], -1)
            if self.score_type is ScoreType.NLL:
                projected = self.pca_model.transform(features)
                return DFMResult(self.gaussian_model.score_samples(projected), None)
            centred = features - self.pca_model.mean
            vectors = self.pca_model.singular_vectors
            error = torch.square(centred - (centred @ vectors) @ vectors.T)
            score = error.sum(dim=1)
            score_map = error.reshape(tuple(feature_shapes)).sum(dim=1, keepdim=True)
        return DFMResult(score, score_map)

    def forward(self, batch: torch.Tensor) -> DFMResult:
        """Score a normalised ``(N, 3, H, W)`` batch; ``fre`` maps are upsampled to ``(H, W)``."""
        self._check_fitted()
        features, feature_shapes = self.get_features(batch)
        result = self.score(features, feature_shapes)
        if result.anomaly_map is None:
            return result
        anomaly_map = F.interpolate(
            result.anomaly_map, size=tuple(batch.shape[-2:]), mode="bilinear", align_corners=False
        )
        return DFMResult(result.pred_score, anomaly_map)

    def anomaly_maps(self, batch: torch.Tensor) -> torch.Tensor:
        """Return ``(N, 1, H, W)`` anomaly maps; a :class:`ScoreTypeError` for ``nll`` models."""
        if self.score_type is not ScoreType.FRE:
            msg = "anomaly maps need score_type 'fre'; this model scores with 'nll' (image scores only)"
            raise ScoreTypeError(msg)
        anomaly_map = self.forward(batch).anomaly_map
        assert anomaly_map is not None
        return anomaly_map


_REFERENCE_BACKBONE_PREFIX = "feature_extractor.feature_extractor."


def _from_reference_layout(state_dict: Mapping[str, Any], model: DFMModel) -> dict[str, Any]:
    """Map the reference implementation's state-dict layout onto ours (ours passes unchanged)."""
    if not any(key.startswith(_REFERENCE_BACKBONE_PREFIX) for key in state_dict):
        return dict(state_dict)
    ours = set(model.state_dict())
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.startswith(_REFERENCE_BACKBONE_PREFIX):
            key = "feature_extractor." + key[len(_REFERENCE_BACKBONE_PREFIX) :]  # noqa: PLW2901
            if key not in ours:  # stages after ``layer`` or the classifier: not part of our backbone
                continue
        out[key] = value
    if "pca_model.singular_values" not in out and "pca_model.singular_vectors" in out:
        out["pca_model.singular_values"] = torch.empty(0)
    return out

"""Incremental DFM fitting: feature moments accumulated batch by batch, then PCA from them.

:meth:`DFMModel.fit` needs every training feature vector at once (an ``N x D`` matrix, then its
float64 copy for the SVD). :class:`FeatureMoments` keeps only what the PCA needs, in float64: the
count, the sum of the vectors and the sum of their outer products. Its memory is ``8 D^2`` bytes
whatever the number of images (``D`` = features per image: 16,384 for resnet50/layer3 at 256 px,
so 2 GiB; 1,024 at 64 px with resnet18/layer2 and kernel 2, so 8 MiB), and
:func:`fit_from_moments` gives the model :meth:`DFMModel.fit` would give on the same features:
the same component count, singular values and mean, singular vectors up to sign, and the same
scores (FRE and NLL are sign-invariant).

The centred scatter is formed as ``sum x x^T - N m m^T`` after subtracting a shift (the first
batch's mean) from every vector, so the subtraction does not cancel the digits float64 keeps.
"""

from __future__ import annotations

import torch

from dfm_stream.errors import ModelConfigError
from dfm_stream.model.dfm import DFMModel, ScoreType


class FeatureMoments:
    """Running count, sum and sum of outer products (float64) of ``(N, D)`` feature batches."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        """Features per vector (0 before the first batch)."""
        return 0 if self.total is None else int(self.total.shape[0])

    @staticmethod
    def bytes_for(dim: int) -> int:
        """Memory the accumulator holds for vectors of ``dim`` features."""
        return 8 * dim * (dim + 2)

    def add(self, features: torch.Tensor) -> None:
        """Add an ``(n, D)`` batch; a batch of another width is refused with :class:`ModelConfigError`."""
        if features.ndim != 2 or features.shape[0] == 0:
            msg = f"feature batches must be (n, D) with n >= 1, got shape {tuple(features.shape)}"
            raise ModelConfigError(msg)
        batch = features.detach().to(torch.float64)
        if self.shift is None:
            self.shift = batch.mean(dim=0)
            dim = batch.shape[1]
            self.total = torch.zeros(dim, dtype=torch.float64, device=batch.device)
            self.outer = torch.zeros((dim, dim), dtype=torch.float64, device=batch.device)
        elif batch.shape[1] != self.dim:
            msg = (
                f"a batch gives {batch.shape[1]} features per image, earlier batches gave {self.dim}: "
                "give every training image the same size"
            )
            raise ModelConfigError(msg)
        assert self.total is not None and self.outer is not None
        centred = batch - self.shift
        self.total += centred.sum(dim=0)
        self.outer.addmm_(centred.T, centred)
        self.count += int(batch.shape[0])

    def mean_and_scatter(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the mean ``(D,)`` and the centred scatter ``(X - m)^T (X - m)`` ``(D, D)``, float64."""
        if self.count < 2 or self.total is None or self.outer is None or self.shift is None:
            msg = f"DFM needs at least 2 training images, got {self.count}"
            raise ModelConfigError(msg)
        offset = self.total / self.count
        scatter = self.outer - self.count * torch.outer(offset, offset)
        scatter = (scatter + scatter.T) / 2
        return self.shift + offset, scatter


def fit_from_moments(model: DFMModel, moments: FeatureMoments) -> DFMModel:
    """Fit ``model``'s PCA (and, for ``nll``, its Gaussian) from ``moments``; return it in eval mode."""
    mean, scatter = moments.mean_and_scatter()
    device = model.device
    values = model.pca_model.fit_scatter(moments.count, mean.to(device), scatter.to(device))
    if model.score_type is ScoreType.NLL:
        if model.pca_model.k == 0:
            msg = f"nll: PCA level {model.n_components} keeps 0 components; raise n_comps"
            raise ModelConfigError(msg)
        model.gaussian_model.fit_pca_projection(values / moments.count)
    return model.eval()

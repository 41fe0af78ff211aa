"""Principal component analysis in PyTorch, fitted statistics kept as buffers.

The number of kept components follows the reference rule so that published results carry over:
for a ratio ``n_components <= 1`` it is the 0-based index of the first cumulative
explained-variance ratio that is ``>= n_components`` (one fewer than scikit-learn keeps for the
same level); for ``n_components > 1`` it is ``int(n_components)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dfm_stream.errors import ModelConfigError, NotFittedError


class ResizableBuffers(nn.Module):
    """A module whose buffers take the shape of the state dict they are loaded from.

    Fitted statistics start as empty tensors; their shape is only known after fitting, so a
    freshly built module must accept the fitted shapes when loading a state dict.
    """

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name, buffer in self._buffers.items():
            key = prefix + name
            if buffer is not None and key in state_dict and state_dict[key].shape != buffer.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buffer.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class PCA(ResizableBuffers):
    """PCA fitted by a float64 SVD of the centred data; never forms a D x D matrix.

    Buffers: ``singular_vectors`` (D, k) float32, ``singular_values`` (k,), ``mean`` (D,),
    ``num_components`` (1,) holding k.
    """

    singular_vectors: torch.Tensor
    singular_values: torch.Tensor
    mean: torch.Tensor
    num_components: torch.Tensor

    def __init__(self, n_components: float) -> None:
        super().__init__()
        if n_components <= 0:
            msg = f"n_comps must be > 0 (a variance ratio <= 1 or a number of components), got {n_components}"
            raise ModelConfigError(msg)
        self.n_components = n_components
        self.register_buffer("singular_vectors", torch.empty(0))
        self.register_buffer("singular_values", torch.empty(0))
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("num_components", torch.empty(0))

    @property
    def k(self) -> int:
        """The number of kept components (0 before fitting)."""
        return int(self.num_components.item()) if self.num_components.numel() else 0

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` has been called (or fitted buffers were loaded)."""
        return self.mean.numel() > 0

    def fit(self, dataset: torch.Tensor) -> None:
        """Fit on ``dataset`` of shape ``(N, D)``; the input is not modified."""
        if dataset.ndim != 2 or dataset.shape[0] < 2:
            msg = f"PCA needs at least 2 feature vectors of shape (N, D), got shape {tuple(dataset.shape)}"
            raise ModelConfigError(msg)
        data = dataset.detach().to(torch.float64)
        mean = data.mean(dim=0)
        _, sig, v_h = torch.linalg.svd(data - mean, full_matrices=False)
        k = self._components_for(sig, max_rank=min(data.shape))
        self.num_components = torch.tensor([float(k)], device=dataset.device)
        self.singular_vectors = v_h[:k].T.contiguous().float()
        self.singular_values = sig[:k].float()
        self.mean = mean.float()

    def fit_scatter(self, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
        """Fit from moments: ``count`` vectors with ``mean`` (D,) and centred ``scatter`` (D, D), float64.

        ``scatter`` is ``(X - mean)^T (X - mean)``, whose eigenvalues are the squared singular values
        of the centred data and whose eigenvectors are its right singular vectors, so the fit is the
        one :meth:`fit` makes on ``X`` (same component rule, singular vectors up to sign). Only the
        top ``min(count, D)`` eigenvalues count, as :meth:`fit` sees at most that many singular
        values. Returns the kept eigenvalues (k,) in float64 (the Gaussian of ``nll`` needs them).
        """
        if count < 2 or mean.ndim != 1 or scatter.shape != (mean.shape[0], mean.shape[0]):
            msg = f"PCA needs moments of at least 2 feature vectors, got {count} (mean {tuple(mean.shape)})"
            raise ModelConfigError(msg)
        values, vectors = torch.linalg.eigh(scatter.to(torch.float64))
        rank = min(count, mean.shape[0])
        values = values.flip(0)[:rank].clamp_min(0.0)
        vectors = vectors.flip(1)[:, :rank]
        sig = values.sqrt()
        k = self._components_for(sig, max_rank=rank)
        self.num_components = torch.tensor([float(k)], device=mean.device)
        self.singular_vectors = vectors[:, :k].contiguous().float()
        self.singular_values = sig[:k].float()
        self.mean = mean.float()
        return values[:k]

    def _components_for(self, sig: torch.Tensor, max_rank: int) -> int:
        if self.n_components <= 1:
            energy = sig * sig
            ratios = torch.cumsum(energy, dim=0) / torch.sum(energy)
            hits = torch.nonzero(ratios >= self.n_components)
            # Rounding can leave the last ratio a hair below 1.0: keep everything then.
            return int(hits[0].item()) if len(hits) else len(sig) - 1
        k = int(self.n_components)
        if k > max_rank:
            msg = (
                f"n_comps={k} components asked for, but the training features have rank at most "
                f"{max_rank}: use more training images or fewer components"
            )
            raise ModelConfigError(msg)
        return k

    def _check_fitted(self) -> None:
        if not self.fitted:
            msg = "PCA is not fitted: call fit() first or load a fitted artifact"
            raise NotFittedError(msg)

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Project ``(N, D)`` features onto the kept components: ``(N, k)``."""
        self._check_fitted()
        return (features - self.mean) @ self.singular_vectors

    def inverse_transform(self, projected: torch.Tensor) -> torch.Tensor:
        """Map ``(N, k)`` projections back to the feature space: ``(N, D)``."""
        self._check_fitted()
        return projected @ self.singular_vectors.T + self.mean

    def fit_transform(self, dataset: torch.Tensor) -> torch.Tensor:
        """Fit on ``dataset`` and return its projection."""
        self.fit(dataset)
        return self.transform(dataset)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project features, like :meth:`transform`."""
        return self.transform(features)

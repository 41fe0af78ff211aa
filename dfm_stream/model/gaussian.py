"""A single Gaussian over feature vectors, represented by the SVD of the centred data."""

from __future__ import annotations

import math

import torch

from dfm_stream.errors import ModelConfigError, NotFittedError
from dfm_stream.model.pca import ResizableBuffers


class SingleClassGaussian(ResizableBuffers):
    """Gaussian density over a set of points; scores are negative log-likelihoods (up to a constant).

    The covariance ``C = X X^T / N`` of the centred data ``X`` is never formed: with the SVD
    ``X / sqrt(N) = U S V^T`` it is ``U S^2 U^T``, so
    ``nll(z) = ||(z - m)^T U / S||^2 + 2 * sum(log S)``.

    Buffers: ``mean_vec`` (k,), ``u_mat`` (k, r), ``sigma_mat`` (r,).
    """

    mean_vec: torch.Tensor
    u_mat: torch.Tensor
    sigma_mat: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean_vec", torch.empty(0))
        self.register_buffer("u_mat", torch.empty(0))
        self.register_buffer("sigma_mat", torch.empty(0))

    @property
    def fitted(self) -> bool:
        """Whether the Gaussian has been fitted (or fitted buffers were loaded)."""
        return self.sigma_mat.numel() > 0 or self.mean_vec.numel() > 0

    def fit(self, dataset: torch.Tensor) -> None:
        """Fit on ``dataset`` of shape ``(n_features, n_samples)`` (the reference's layout).

        Raises :class:`ModelConfigError` when the data are degenerate (a zero singular value,
        e.g. fewer samples than features), since the density would be infinite.
        """
        num_samples = dataset.shape[1]
        data = dataset.detach()
        mean = data.mean(dim=1)
        centred = (data - mean.reshape(-1, 1)) / math.sqrt(num_samples)
        u_mat, sigma, _ = torch.linalg.svd(centred, full_matrices=False)
        if sigma.numel() and float(sigma.min()) <= float(sigma.max()) * 1e-6:
            msg = (
                f"nll: the {dataset.shape[0]} projected features of {num_samples} training images are "
                "degenerate (a zero variance direction); use more training images or fewer components"
            )
            raise ModelConfigError(msg)
        self.mean_vec = mean
        self.u_mat = u_mat
        self.sigma_mat = sigma

    def fit_pca_projection(self, variances: torch.Tensor) -> None:
        """Fit on the PCA projection of the training data, known only by its per-component variances.

        Projected onto the principal components, centred training data have mean 0 and a diagonal
        covariance whose entries are ``variances`` (eigenvalue / N): exactly what :meth:`fit` finds
        on those projections, up to the signs of ``u_mat``'s columns, which no score depends on.
        """
        sigma = variances.to(torch.float64).clamp_min(0.0).sqrt().float()
        if sigma.numel() and float(sigma.min()) <= float(sigma.max()) * 1e-6:
            msg = (
                f"nll: the {sigma.numel()} projected features of the training images are degenerate "
                "(a zero variance direction); use more training images or fewer components"
            )
            raise ModelConfigError(msg)
        self.mean_vec = torch.zeros(sigma.numel(), device=variances.device)
        self.u_mat = torch.eye(sigma.numel(), device=variances.device)
        self.sigma_mat = sigma.to(variances.device)

    def score_samples(self, features: torch.Tensor) -> torch.Tensor:
        """Return the NLL score of each row of ``features`` ``(n_samples, n_features)``."""
        if not self.fitted:
            msg = "SingleClassGaussian is not fitted: call fit() first or load a fitted artifact"
            raise NotFittedError(msg)
        whitened = (features - self.mean_vec) @ (self.u_mat / self.sigma_mat)
        return torch.sum(whitened * whitened, dim=1) + 2 * torch.sum(torch.log(self.sigma_mat))

    def forward(self, dataset: torch.Tensor) -> None:
        """Fit the model, like :meth:`fit` (the reference's API)."""
        self.fit(dataset)

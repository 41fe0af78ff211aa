"""The incremental fit (feature moments in float64, then PCA) equals the one-shot fit on the same features.

The one-shot fit (:meth:`DFMModel.fit`, SVD of the centred features) keeps the reference's numerical
rules; enrolment must give the same model batch by batch: same component count, singular values,
mean, singular vectors up to sign, and the same FRE and NLL scores.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dfm_stream.errors import ModelConfigError
from dfm_stream.model import DFMModel
from dfm_stream.model.moments import FeatureMoments, fit_from_moments


def _pair(score_type: str, level: float, offset: float = 0.0) -> tuple[DFMModel, DFMModel, torch.Tensor]:
    torch.manual_seed(0)
    model = DFMModel(
        "resnet18", "layer2", pre_trained=False, pooling_kernel_size=4, n_comps=level, score_type=score_type
    )
    gen = torch.Generator().manual_seed(1)
    features, _ = model.get_features(torch.randn(50, 3, 64, 64, generator=gen))
    features = features + offset
    reference, incremental = copy.deepcopy(model).eval(), copy.deepcopy(model)
    reference.fit(features)
    moments = FeatureMoments()
    for start in range(0, len(features), 7):  # uneven batches, the last one short
        moments.add(features[start : start + 7])
    fit_from_moments(incremental, moments)
    return reference, incremental, features


@pytest.mark.parametrize("score_type", ["fre", "nll"])
@pytest.mark.parametrize("level", [0.9, 0.97, 0.999, 12])
def test_incremental_fit_equals_the_one_shot_fit(score_type: str, level: float) -> None:
    reference, incremental, _ = _pair(score_type, level)
    ref_pca, inc_pca = reference.pca_model, incremental.pca_model
    assert inc_pca.k == ref_pca.k
    torch.testing.assert_close(inc_pca.mean, ref_pca.mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(inc_pca.singular_values, ref_pca.singular_values, rtol=1e-5, atol=1e-6)
    alignment = (ref_pca.singular_vectors.T @ inc_pca.singular_vectors).diagonal().abs()
    torch.testing.assert_close(alignment, torch.ones_like(alignment), rtol=0, atol=1e-4)
    probe = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, got = reference(probe).pred_score, incremental(probe).pred_score
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_features_far_from_zero_keep_their_precision() -> None:
    """A large common offset must not cancel the digits of the scatter (the shift is taken out first)."""
    reference, incremental, _ = _pair("fre", 0.97, offset=1e6)
    assert incremental.pca_model.k == reference.pca_model.k
    torch.testing.assert_close(
        incremental.pca_model.singular_values, reference.pca_model.singular_values, rtol=1e-4, atol=1e-4
    )


def test_memory_does_not_grow_with_the_number_of_images() -> None:
    moments = FeatureMoments()
    for _ in range(20):
        moments.add(torch.randn(16, 64))
    held = [t for t in (moments.shift, moments.total, moments.outer) if t is not None]
    assert sum(t.numel() * t.element_size() for t in held) == FeatureMoments.bytes_for(64)
    assert moments.count == 320


def test_a_batch_of_another_width_is_refused_by_name() -> None:
    moments = FeatureMoments()
    moments.add(torch.randn(4, 32))
    with pytest.raises(ModelConfigError, match="33 features per image, earlier batches gave 32"):
        moments.add(torch.randn(4, 33))


def test_one_image_is_not_enough() -> None:
    moments = FeatureMoments()
    moments.add(torch.randn(1, 8))
    model = DFMModel("resnet18", "layer1", pre_trained=False)
    with pytest.raises(ModelConfigError, match="at least 2 training images, got 1"):
        fit_from_moments(model, moments)

"""DFM math against independent computations (numpy / scikit-learn), layouts, and API contracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import fitted_tiny_model, image_batch, tiny_model
from sklearn.decomposition import PCA as SkPCA  # noqa: N811
from torch.nn import functional as F  # noqa: N812

from dfm_stream.errors import ModelConfigError, NotFittedError, ScoreTypeError
from dfm_stream.model import PCA, Dfm, DFMModel, DFMResult, LearningType, ScoreType, SingleClassGaussian


def _low_rank_features(n: int, d: int, rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.linspace(5.0, 0.5, rank)
    latent = rng.standard_normal((n, rank)) * scales
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].T
    return (latent @ basis + 0.05 * rng.standard_normal((n, d)) + 3.0).astype(np.float32)


def _reference_k(data: np.ndarray, level: float) -> int:
    centred = data.astype(np.float64) - data.astype(np.float64).mean(axis=0)
    sig = np.linalg.svd(centred, compute_uv=False)
    ratios = np.cumsum(sig**2) / np.sum(sig**2)
    return int(np.argmax(ratios >= level))


@pytest.mark.parametrize("level", [0.5, 0.8, 0.97])
def test_pca_component_count_follows_reference_rule(level: float) -> None:
    data = _low_rank_features(40, 300, rank=8, seed=1)
    pca = PCA(level)
    pca.fit(torch.from_numpy(data))
    sk_k = SkPCA(n_components=level, svd_solver="full").fit(data.astype(np.float64)).n_components_
    assert pca.k == _reference_k(data, level)
    assert pca.k == sk_k - 1
    assert pca.num_components.tolist() == [float(pca.k)]
    assert pca.singular_vectors.shape == (300, pca.k)
    assert pca.singular_vectors.dtype == torch.float32


def test_pca_integer_level_keeps_that_many_components() -> None:
    data = torch.from_numpy(_low_rank_features(30, 100, rank=6, seed=2))
    pca = PCA(5)
    pca.fit(data)
    assert pca.k == 5
    with pytest.raises(ModelConfigError, match="rank at most"):
        PCA(31).fit(data)


def test_pca_fit_does_not_modify_input() -> None:
    data = torch.from_numpy(_low_rank_features(10, 20, rank=3, seed=3))
    copy = data.clone()
    PCA(0.9).fit(data)
    assert torch.equal(data, copy)


def test_fre_score_matches_sklearn_reconstruction_error() -> None:
    train = _low_rank_features(50, 400, rank=10, seed=4)
    test = _low_rank_features(7, 400, rank=10, seed=5) + np.random.default_rng(6).normal(0, 0.3, (7, 400))
    test = test.astype(np.float32)
    model = tiny_model("fre", n_comps=0.9)
    model.fit(torch.from_numpy(train))
    k = model.pca_model.k
    sk = SkPCA(n_components=k, svd_solver="full").fit(train.astype(np.float64))
    expected = ((test - sk.inverse_transform(sk.transform(test.astype(np.float64)))) ** 2).sum(axis=1)
    result = model.score(torch.from_numpy(test), (7, 400, 1, 1))
    assert isinstance(result, DFMResult)
    np.testing.assert_allclose(result.pred_score.numpy(), expected, rtol=1e-3)
    assert result.anomaly_map is not None
    np.testing.assert_allclose(result.anomaly_map.reshape(7).numpy(), expected, rtol=1e-3)


def test_fre_anomaly_map_is_channel_sum_of_error_at_feature_resolution() -> None:
    train = _low_rank_features(30, 4 * 3 * 5, rank=4, seed=7)
    test = torch.from_numpy(_low_rank_features(3, 60, rank=4, seed=8) + 1.0)
    model = tiny_model("fre", n_comps=3)
    model.fit(torch.from_numpy(train))
    result = model.score(test, (3, 4, 3, 5))
    v = model.pca_model.singular_vectors.double()
    centred = test.double() - model.pca_model.mean.double()
    error = (centred - centred @ v @ v.T) ** 2
    expected_map = error.reshape(3, 4, 3, 5).sum(dim=1, keepdim=True)
    assert result.anomaly_map is not None
    torch.testing.assert_close(result.anomaly_map.double(), expected_map, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.pred_score.double(), error.sum(dim=1), rtol=1e-4, atol=1e-6)


def _closed_form_nll(train_z: np.ndarray, z: np.ndarray) -> np.ndarray:
    mean = train_z.mean(axis=0)
    cov = (train_z - mean).T @ (train_z - mean) / len(train_z)
    diff = z - mean
    mahalanobis = np.einsum("ij,jk,ik->i", diff, np.linalg.inv(cov), diff)
    return mahalanobis + np.linalg.slogdet(cov)[1]


def test_nll_score_matches_closed_form_gaussian() -> None:
    train = _low_rank_features(60, 200, rank=6, seed=9)
    test = _low_rank_features(5, 200, rank=6, seed=10)
    model = tiny_model("nll", n_comps=5)
    model.fit(torch.from_numpy(train))
    sk = SkPCA(n_components=5, svd_solver="full").fit(train.astype(np.float64))
    # The NLL does not depend on the sign/rotation of the PCA basis, only on the subspace.
    expected = _closed_form_nll(sk.transform(train.astype(np.float64)), sk.transform(test.astype(np.float64)))
    result = model.score(torch.from_numpy(test), (5, 200, 1, 1))
    assert result.anomaly_map is None
    np.testing.assert_allclose(result.pred_score.numpy(), expected, rtol=1e-3, atol=1e-2)


def test_single_class_gaussian_uses_reference_layout_and_names() -> None:
    rng = np.random.default_rng(11)
    data = rng.standard_normal((100, 4)) @ rng.standard_normal((4, 4))
    gaussian = SingleClassGaussian()
    gaussian(torch.from_numpy(data.T.copy()))  # forward == fit, (n_features, n_samples)
    assert set(gaussian.state_dict()) == {"mean_vec", "u_mat", "sigma_mat"}
    scores = gaussian.score_samples(torch.from_numpy(data[:5]))
    np.testing.assert_allclose(scores.numpy(), _closed_form_nll(data, data[:5]), rtol=1e-6)


def test_gaussian_rejects_degenerate_data() -> None:
    with pytest.raises(ModelConfigError, match="degenerate"):
        SingleClassGaussian().fit(torch.ones(3, 10, dtype=torch.float64))


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_channels_last_and_non_contiguous_inputs_score_like_contiguous(score_type: str) -> None:
    model = fitted_tiny_model(score_type)
    batch = image_batch(4, seed=3)
    reference = model(batch)
    channels_last = model(batch.to(memory_format=torch.channels_last))
    wide = image_batch(4, size=128, seed=3)
    wide[:, :, ::2, ::2] = batch
    strided = wide[:, :, ::2, ::2]
    assert not strided.is_contiguous()
    permuted = batch.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    for other in (channels_last, model(strided), model(permuted)):
        torch.testing.assert_close(other.pred_score, reference.pred_score, rtol=1e-4, atol=1e-4)
        if score_type == "fre":
            torch.testing.assert_close(other.anomaly_map, reference.anomaly_map, rtol=1e-4, atol=1e-4)


def test_forward_returns_one_type_in_train_and_eval_mode() -> None:
    model = fitted_tiny_model("fre")
    batch = image_batch(2, seed=5)
    eval_result = model.eval()(batch)
    train_result = model.train()(batch)
    assert isinstance(eval_result, DFMResult)
    assert isinstance(train_result, DFMResult)
    assert not model.feature_extractor.training
    torch.testing.assert_close(train_result.pred_score, eval_result.pred_score)
    assert eval_result.anomaly_map is not None
    assert eval_result.anomaly_map.shape == (2, 1, 64, 64)


def test_forward_upsamples_feature_map_bilinearly() -> None:
    model = fitted_tiny_model("fre")
    batch = image_batch(2, seed=6)
    features, shapes = model.get_features(batch)
    small = model.score(features, shapes).anomaly_map
    expected = F.interpolate(small, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model(batch).anomaly_map, expected)


def test_get_features_flattens_pooled_layer_output_channel_major() -> None:
    model = tiny_model()
    batch = image_batch(2)
    features, shapes = model.get_features(batch)
    with torch.no_grad():
        x = batch
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2"):
            x = getattr(model.feature_extractor, name)(x)
        expected = F.avg_pool2d(x, kernel_size=2)
    assert shapes == expected.shape == (2, 128, 4, 4)
    torch.testing.assert_close(features, expected.reshape(2, -1))


def test_nll_model_refuses_anomaly_maps() -> None:
    model = fitted_tiny_model("nll")
    assert model(image_batch(2)).anomaly_map is None
    with pytest.raises(ScoreTypeError, match="fre"):
        model.anomaly_maps(image_batch(2))


def test_state_dict_names_mirror_the_reference() -> None:
    model = fitted_tiny_model("nll")
    keys = set(model.state_dict())
    assert {"feature_extractor.conv1.weight", "feature_extractor.layer1.0.conv1.weight"} <= keys
    assert {
        f"pca_model.{n}" for n in ("singular_vectors", "singular_values", "mean", "num_components")
    } <= keys
    assert {f"gaussian_model.{n}" for n in ("mean_vec", "u_mat", "sigma_mat")} <= keys
    assert not any(k.startswith("feature_extractor.layer3") for k in keys)
    assert model.score_type is ScoreType.NLL
    assert model.score_type == "nll"
    assert (model.n_components, model.pooling_kernel_size) == (0.9, 2)


def test_unfitted_model_refuses_to_score() -> None:
    with pytest.raises(NotFittedError):
        tiny_model()(image_batch(1))


@pytest.mark.parametrize(
    ("backbone", "layer", "score_type", "named"),
    [
        ("vgg16", "layer3", "fre", "backbone"),
        ("resnet18", "layer7", "fre", "layer"),
        ("resnet18", "layer2", "mahalanobis", "score type"),
    ],
)
def test_bad_model_setting_is_named_in_the_error(
    backbone: str, layer: str, score_type: str, named: str
) -> None:
    with pytest.raises(ModelConfigError, match=named):
        DFMModel(backbone, layer, pre_trained=False, score_type=score_type)


def test_trainer_fits_in_one_pass_from_batches() -> None:
    torch.manual_seed(0)
    trainer = Dfm(
        backbone="resnet18", layer="layer2", pre_trained=False, pooling_kernel_size=2, pca_level=0.9
    )
    assert trainer.learning_type is LearningType.ONE_CLASS
    assert trainer.configure_optimizers() is None
    seen: list[int] = []
    batches = (image_batch(5, seed=s) for s in range(4))
    model = trainer.fit(batches, on_batch=seen.append)
    assert seen == [5, 5, 5, 5]
    assert trainer.n_train == 20
    assert model.fitted and not model.training
    assert model(image_batch(3)).pred_score.shape == (3,)


def test_fit_handles_few_samples_of_many_features() -> None:
    model = tiny_model("fre", n_comps=0.97)
    features = torch.randn(8, 16_384)
    model.fit(features)
    assert model.pca_model.singular_vectors.shape == (16_384, model.pca_model.k)
    assert 0 < model.pca_model.k < 8


def test_trainer_accepts_reference_style_dict_batches() -> None:
    torch.manual_seed(0)
    trainer = Dfm(backbone="resnet18", layer="layer2", pre_trained=False, pooling_kernel_size=2, pca_level=3)
    model = trainer.fit({"image": image_batch(4, seed=s)} for s in range(2))
    assert model.pca_model.k == 3
    with pytest.raises(ModelConfigError, match="image"):
        trainer.fit(["not a batch"])


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_state_dict_in_the_reference_layout_loads_and_scores_identically(score_type: str) -> None:
    fitted = fitted_tiny_model(score_type)
    reference_layout = {}
    for key, value in fitted.state_dict().items():
        if key == "pca_model.singular_values":
            continue  # the reference keeps these outside its state dict
        nested = "feature_extractor." + key if key.startswith("feature_extractor.") else key
        reference_layout[nested] = value
    reference_layout["feature_extractor.feature_extractor.fc.weight"] = torch.zeros(10, 512)
    fresh = tiny_model(score_type)
    fresh.load_state_dict(reference_layout)
    batch = image_batch(4, seed=9)
    torch.testing.assert_close(fresh(batch).pred_score, fitted(batch).pred_score, rtol=0, atol=0)

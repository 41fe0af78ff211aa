"""Backbone weights: local files (safetensors / torch), ImageNet download failures, fingerprints."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from model_helpers import image_batch
from safetensors.torch import save_file

from dfm_stream.errors import WeightsError
from dfm_stream.model import DFMModel, weights_fingerprint


def _resnet18_state(prefix: str = "") -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    state = torchvision.models.resnet18().state_dict()
    return {f"{prefix}{k}": v.clone().contiguous() for k, v in state.items()}


def _assert_backbone_equals(model: DFMModel, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    for key, value in model.feature_extractor.state_dict().items():
        assert torch.equal(value, state[prefix + key]), key


@pytest.mark.parametrize("prefix", ["", "module."])
def test_safetensors_weights_file_loads_with_prefix_and_classifier(tmp_path: Path, prefix: str) -> None:
    state = _resnet18_state(prefix)
    assert f"{prefix}fc.weight" in state
    path = tmp_path / "resnet18.safetensors"
    save_file(state, str(path))
    model = DFMModel("resnet18", "layer3", weights=path, pooling_kernel_size=2)
    _assert_backbone_equals(model, state, prefix)
    assert model.weights_id.startswith("file:") and len(model.weights_id) == 5 + 64


def test_torch_weights_file_loads_with_weights_only(tmp_path: Path) -> None:
    state = _resnet18_state("module.")
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = DFMModel("resnet18", "layer2", weights=path)
    _assert_backbone_equals(model, state, "module.")


def test_pickled_object_in_weights_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Path("/etc")}, path)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        DFMModel("resnet18", "layer2", weights=path)


def test_weights_of_another_architecture_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.safetensors"
    save_file(_resnet18_state(), str(path))
    with pytest.raises(WeightsError, match="do not fit"):
        DFMModel("resnet50", "layer2", weights=path)


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        DFMModel("resnet18", "layer2", weights=tmp_path / "nope.safetensors")


def test_offline_imagenet_download_names_both_ways_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as info:
        DFMModel("resnet18", "layer2", pre_trained=True)
    assert "--weights" in str(info.value)
    assert "--no-pretrained" in str(info.value)


def test_same_weights_give_same_features_and_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_resnet18_state(), str(path))
    a = DFMModel("resnet18", "layer2", weights=path)
    b = DFMModel("resnet18", "layer2", weights=path)
    c = DFMModel("resnet18", "layer2", pre_trained=False)
    fa, fb = (
        weights_fingerprint(a.feature_extractor.state_dict()),
        weights_fingerprint(b.feature_extractor.state_dict()),
    )
    assert fa == fb != weights_fingerprint(c.feature_extractor.state_dict())
    batch = image_batch(2)
    assert torch.equal(a.get_features(batch)[0], b.get_features(batch)[0])
    assert c.weights_id == "random"

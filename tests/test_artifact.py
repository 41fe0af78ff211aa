"""The model artifact: round trip, calibration updates, and rejection of bad files."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch
from model_helpers import fitted_tiny_model, image_batch, tiny_model
from safetensors.torch import save as st_save

from dfm_stream.artifact import (
    ArtifactInfo,
    FittedModel,
    artifact_to_bytes,
    load_artifact,
    normalize_score,
    read_info,
    save_artifact,
    update_calibration,
)
from dfm_stream.errors import ArtifactError


def _info(model, **changes) -> ArtifactInfo:
    return dataclasses.replace(ArtifactInfo.for_model(model, (64, 64), n_train=24), **changes)


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_round_trip_gives_identical_scores(tmp_path: Path, score_type: str) -> None:
    model = fitted_tiny_model(score_type)
    path = tmp_path / "model.dfm"
    content_hash = save_artifact(path, model, _info(model))
    loaded = load_artifact(path)
    assert isinstance(loaded, FittedModel)
    assert loaded.info.content_hash == content_hash
    assert loaded.info.score_type == score_type
    assert loaded.info.n_components == model.pca_model.k
    assert loaded.info.image_size == (64, 64)
    batch = image_batch(3, seed=9)
    before, after = model(batch), loaded.model(batch)
    assert torch.equal(before.pred_score, after.pred_score)
    if score_type == "fre":
        assert torch.equal(before.anomaly_map, after.anomaly_map)
    else:
        assert after.anomaly_map is None


def test_bytes_and_file_forms_are_the_same_artifact(tmp_path: Path) -> None:
    model = fitted_tiny_model()
    info = _info(model, created_at="2024-01-01T00:00:00+00:00")
    data = artifact_to_bytes(model, info)
    save_artifact(tmp_path / "a.dfm", model, info)
    assert (tmp_path / "a.dfm").read_bytes() == data
    assert load_artifact(data).info == read_info(tmp_path / "a.dfm")


def test_loading_does_not_download_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fitted_tiny_model()
    save_artifact(tmp_path / "m.dfm", model, _info(model))

    def no_download(*args, **kwargs):
        raise AssertionError("load_artifact must not download weights")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", no_download)
    assert load_artifact(tmp_path / "m.dfm").model.fitted


def test_tampered_tensor_bytes_are_rejected(tmp_path: Path) -> None:
    model = fitted_tiny_model()
    path = tmp_path / "m.dfm"
    save_artifact(path, model, _info(model))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="content hash"):
        load_artifact(path)


def test_tampered_metadata_is_rejected(tmp_path: Path) -> None:
    model = fitted_tiny_model()
    data = artifact_to_bytes(model, _info(model, threshold=5.0))
    forged = data.replace(b'\\"threshold\\": 5.0', b'\\"threshold\\": 9.0')
    assert forged != data and len(forged) == len(data)
    with pytest.raises(ArtifactError, match="content hash"):
        load_artifact(forged)


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    model = fitted_tiny_model()
    data = artifact_to_bytes(model, _info(model))
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(ArtifactError, match=r"truncated|corrupt|not a dfm-stream"):
            load_artifact(data[:cut])


def test_foreign_safetensors_file_is_rejected() -> None:
    data = st_save({"x": torch.zeros(3)})
    with pytest.raises(ArtifactError, match="not a dfm-stream artifact"):
        load_artifact(data)


def _rewrite_meta(data: bytes, change) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["dfm_stream"])
    change(meta)
    header["__metadata__"]["dfm_stream"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def test_unsupported_format_version_is_rejected() -> None:
    data = artifact_to_bytes(fitted_tiny_model(), _info(fitted_tiny_model()))
    newer = _rewrite_meta(data, lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format_version 99"):
        load_artifact(newer)


def test_mismatched_settings_are_rejected() -> None:
    model = fitted_tiny_model()
    data = artifact_to_bytes(model, _info(model, layer="layer3"))
    with pytest.raises(ArtifactError, match="does not match"):
        load_artifact(data)


def test_unfitted_model_cannot_be_saved(tmp_path: Path) -> None:
    model = tiny_model()
    with pytest.raises(ArtifactError, match="unfitted"):
        save_artifact(tmp_path / "m.dfm", model, _info(model))


def test_update_calibration_rewrites_a_valid_artifact(tmp_path: Path) -> None:
    model = fitted_tiny_model()
    path = tmp_path / "m.dfm"
    first_hash = save_artifact(path, model, _info(model))
    info = update_calibration(path, threshold=4.0, score_min=1.0, score_max=9.0)
    loaded = load_artifact(path)
    assert loaded.info == info
    assert (info.threshold, info.score_min, info.score_max) == (4.0, 1.0, 9.0)
    assert info.content_hash != first_hash
    batch = image_batch(2)
    assert torch.equal(loaded.model(batch).pred_score, model(batch).pred_score)


def test_normalized_score_is_half_at_threshold_and_clipped() -> None:
    info = _info(fitted_tiny_model(), threshold=4.0, score_min=1.0, score_max=9.0)
    assert normalize_score(4.0, info) == 0.5
    assert normalize_score(6.0, info) == pytest.approx(0.75)
    assert normalize_score(100.0, info) == 1.0
    assert normalize_score(-100.0, info) == 0.0
    assert normalize_score(4.0, dataclasses.replace(info, threshold=None)) is None

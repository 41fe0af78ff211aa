"""``Dfm.training_step`` / ``fit()`` / ``validation_step`` driven the way the reference's loop does."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from model_helpers import TINY, image_batch, tiny_model

from dfm_stream.errors import ModelConfigError, NotFittedError
from dfm_stream.model import Dfm, DFMModel

PCA_LEVEL = 0.9


@dataclasses.dataclass
class ImageBatch:
    """Like the reference's batch dataclass: images plus prediction fields."""

    image: torch.Tensor
    label: int = 0
    pred_score: torch.Tensor | None = None
    anomaly_map: torch.Tensor | None = None


@dataclasses.dataclass
class ImageOnlyBatch:
    """A dataclass with images and nothing else."""

    image: torch.Tensor


def _trainer(score_type: str = "fre", seed: int = 0) -> Dfm:
    torch.manual_seed(seed)
    return Dfm(**TINY, pca_level=PCA_LEVEL, score_type=score_type)


def _fitted_trainer(score_type: str = "fre") -> Dfm:
    trainer = _trainer(score_type)
    for seed in range(3):
        trainer.training_step({"image": image_batch(6, seed=seed)}, seed)
    trainer.fit()
    return trainer


def _direct_model(train: list[torch.Tensor], score_type: str) -> DFMModel:
    """The same weights fitted with DFMModel alone: get_features on the same batches, fit."""
    model = tiny_model(score_type, n_comps=PCA_LEVEL, seed=0)
    model.fit(torch.cat([model.get_features(images)[0] for images in train]))
    return model


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_reference_loop_scores_exactly_like_dfm_model(score_type: str) -> None:
    train = [image_batch(6, seed=s) for s in range(3)]
    trainer = _trainer(score_type)
    for index, images in enumerate(train):
        assert trainer.training_step({"image": images}, index) is None
    assert trainer.n_train == 0  # nothing fitted until fit()
    model = trainer.fit()
    assert model is trainer.model and model.fitted
    assert trainer.n_train == 18
    direct = _direct_model(train, score_type)
    assert trainer.model.pca_model.k == direct.pca_model.k
    for seed in (10, 11):
        images = image_batch(4, seed=seed)
        out = trainer.validation_step({"image": images}, seed)
        expected = direct(images)
        torch.testing.assert_close(out["pred_score"], expected.pred_score, rtol=0, atol=0)
        if score_type == "fre":
            assert out["anomaly_map"].shape == (4, 1, 64, 64)
            torch.testing.assert_close(out["anomaly_map"], expected.anomaly_map, rtol=0, atol=0)
        else:
            assert "anomaly_map" not in out


def test_fit_empties_the_memory_bank() -> None:
    trainer = _trainer()
    trainer.training_step({"image": image_batch(4, seed=1)})
    trainer.training_step({"image": image_batch(4, seed=2)})
    assert [len(f) for f in trainer.memory_bank] == [4, 4]
    trainer.fit()
    assert trainer.memory_bank == []


def test_validation_step_returns_a_new_dict_with_the_other_entries() -> None:
    trainer = _fitted_trainer()
    images = image_batch(2, seed=5)
    batch = {"image": images, "image_path": ["a.png", "b.png"]}
    out = trainer.validation_step(batch)
    assert type(out) is dict and out is not batch
    assert set(batch) == {"image", "image_path"}  # the input is not modified
    assert out["image"] is images and out["image_path"] == ["a.png", "b.png"]
    assert out["pred_score"].shape == (2,)


def test_validation_step_returns_a_replaced_dataclass_of_the_same_type() -> None:
    trainer = _fitted_trainer()
    batch = ImageBatch(image=image_batch(3, seed=6), label=1)
    out = trainer.validation_step(batch)
    assert type(out) is ImageBatch and out is not batch
    assert batch.pred_score is None and batch.anomaly_map is None
    assert out.label == 1 and out.image is batch.image
    torch.testing.assert_close(out.pred_score, trainer.model(batch.image).pred_score, rtol=0, atol=0)
    assert out.anomaly_map.shape == (3, 1, 64, 64)


def test_validation_step_sets_predictions_on_a_dataclass_without_those_fields() -> None:
    trainer = _fitted_trainer()
    out = trainer.validation_step(ImageOnlyBatch(image=image_batch(2, seed=7)))
    assert type(out) is ImageOnlyBatch
    assert out.pred_score.shape == (2,) and out.anomaly_map.shape == (2, 1, 64, 64)


def test_validation_step_returns_a_copy_of_a_plain_object_with_predictions() -> None:
    trainer = _fitted_trainer()
    batch = SimpleNamespace(image=image_batch(2, seed=8))
    out = trainer.validation_step(batch)
    assert type(out) is SimpleNamespace and out is not batch
    assert not hasattr(batch, "pred_score")
    assert out.pred_score.shape == (2,) and out.anomaly_map.shape == (2, 1, 64, 64)


def test_validation_step_runs_in_eval_mode_without_gradients() -> None:
    trainer = _fitted_trainer()
    seen: list[tuple[bool, bool]] = []
    trainer.model.register_forward_pre_hook(lambda m, _: seen.append((m.training, torch.is_grad_enabled())))
    trainer.model.train()
    with torch.enable_grad():
        out = trainer.validation_step({"image": image_batch(2, seed=9)})
    assert seen == [(False, False)]
    assert not out["pred_score"].requires_grad
    assert trainer.model.training  # the caller's mode is restored


def test_fit_with_an_empty_memory_bank_is_refused() -> None:
    with pytest.raises(ModelConfigError, match=r"memory bank.*empty.*training_step"):
        _trainer().fit()


def test_fit_with_batches_is_refused_while_the_bank_holds_features() -> None:
    trainer = _trainer()
    trainer.training_step({"image": image_batch(3, seed=1)})
    with pytest.raises(ModelConfigError, match="memory bank holds 3 images"):
        trainer.fit([image_batch(4, seed=2)])
    assert [len(f) for f in trainer.memory_bank] == [3]
    assert not trainer.model.fitted


def test_failed_fit_keeps_the_bank_for_more_batches() -> None:
    trainer = _trainer()
    trainer.training_step({"image": image_batch(1, seed=1)})
    with pytest.raises(ModelConfigError, match="at least 2"):
        trainer.fit()
    assert [len(f) for f in trainer.memory_bank] == [1]
    trainer.training_step({"image": image_batch(4, seed=2)})
    trainer.fit()
    assert trainer.n_train == 5 and trainer.model.fitted


def test_validation_before_fit_is_refused() -> None:
    trainer = _trainer()
    trainer.training_step({"image": image_batch(2, seed=1)})
    with pytest.raises(NotFittedError, match=r"before fit.*training_step.*fit"):
        trainer.validation_step({"image": image_batch(2, seed=2)})


BAD_BATCHES = {
    "no image entry": ({"label": torch.zeros(2)}, r"'image' entry.*without images"),
    "object without image": (SimpleNamespace(label=1), r"'image' attribute.*without images"),
    "rank 3": ({"image": torch.zeros(3, 64, 64)}, r"\(N, 3, H, W\), got shape \(3, 64, 64\)"),
    "one channel": ({"image": torch.zeros(2, 1, 64, 64)}, r"got shape \(2, 1, 64, 64\)"),
    "uint8": ({"image": torch.zeros(2, 3, 64, 64, dtype=torch.uint8)}, "normalise"),
    "not a tensor": ({"image": [[0.0]]}, r"float tensor.*got a list"),
}


@pytest.mark.parametrize("name", list(BAD_BATCHES))
def test_training_step_refuses_a_bad_batch_and_keeps_the_bank(name: str) -> None:
    batch, match = BAD_BATCHES[name]
    trainer = _trainer()
    trainer.training_step({"image": image_batch(2, seed=1)})
    with pytest.raises(ModelConfigError, match=match):
        trainer.training_step(batch)
    assert [len(f) for f in trainer.memory_bank] == [2]


@pytest.mark.parametrize("name", ["no image entry", "rank 3"])
def test_validation_step_refuses_a_bad_batch(name: str) -> None:
    batch, match = BAD_BATCHES[name]
    with pytest.raises(ModelConfigError, match=match):
        _fitted_trainer().validation_step(batch)


def test_training_step_refuses_images_of_another_size_than_the_bank() -> None:
    trainer = _trainer()
    trainer.training_step({"image": image_batch(2, size=64, seed=1)})
    with pytest.raises(ModelConfigError, match="same size"):
        trainer.training_step({"image": image_batch(2, size=96, seed=2)})
    assert [len(f) for f in trainer.memory_bank] == [2]

"""Image folders, the MVTec layout and pre-processing (the reference's resize + ImageNet normalisation)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from dfm_stream.errors import ImageReadError
from dfm_stream.images import (
    collect_image_paths,
    iter_batches,
    list_images,
    mvtec_test_set,
    preprocess,
    preprocess_tensor,
    read_image,
)
from dfm_stream.synthetic_parts import make_dataset


def _reference_preprocess(rgb_uint8: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    image = torch.from_numpy(rgb_uint8).permute(2, 0, 1)
    pipeline = v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize(size, antialias=True),
            v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    return pipeline(image)


def test_preprocess_matches_torchvision_resize_and_normalize() -> None:
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    batch = preprocess([bgr, bgr[:, ::-1].copy()], (64, 48))
    assert batch.shape == (2, 3, 64, 48) and batch.dtype == torch.float32
    expected = _reference_preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (64, 48))
    torch.testing.assert_close(batch[0], expected, rtol=1e-5, atol=1e-5)


def test_preprocess_accepts_grayscale_and_mixed_sizes() -> None:
    gray = np.full((40, 50), 128, np.uint8)
    colour = np.full((30, 30, 3), 128, np.uint8)
    batch = preprocess([gray, colour], (32, 32))
    assert batch.shape == (2, 3, 32, 32)
    torch.testing.assert_close(batch[0], batch[1])


def test_preprocess_tensor_equals_preprocess_on_rgb_tensors() -> None:
    rng = np.random.default_rng(1)
    bgr = rng.integers(0, 256, (2, 70, 70, 3), dtype=np.uint8)
    rgb = torch.from_numpy(bgr[..., ::-1].copy()).permute(0, 3, 1, 2)
    torch.testing.assert_close(preprocess_tensor(rgb, (64, 64)), preprocess(list(bgr), (64, 64)))


def test_list_images_is_sorted_and_clear_about_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ImageReadError, match="holds no images"):
        list_images(tmp_path)
    for name in ("b.png", "a.jpg"):
        cv2.imwrite(str(tmp_path / name), np.zeros((8, 8, 3), np.uint8))
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    assert len(collect_image_paths([tmp_path, tmp_path / "b.png"])) == 3


def test_corrupt_image_is_named_and_can_be_skipped(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.zeros((16, 16, 3), np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:20])
    with pytest.raises(ImageReadError, match=r"bad\.png"):
        read_image(bad)
    with pytest.raises(ImageReadError, match=r"bad\.png"):
        list(iter_batches([good, bad], 4, (32, 32)))
    skipped: list[tuple[Path, str]] = []
    batches = list(iter_batches([good, bad, good], 2, (32, 32), on_error="skip", skipped=skipped))
    assert [len(p) for p, _ in batches] == [2]
    assert batches[0][1].shape == (2, 3, 32, 32)
    assert [p for p, _ in skipped] == [bad]


def test_mvtec_test_set_lists_labels_and_masks(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", n_train=1, n_test_good=2, n_test_defect=4, size=48)
    samples = mvtec_test_set(root)
    assert [s.label for s in samples].count(0) == 2
    defects = [s for s in samples if s.label == 1]
    assert {s.defect_type for s in defects} == {"scratch", "spot"}
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in defects)
    with pytest.raises(ImageReadError, match="MVTec"):
        mvtec_test_set(tmp_path / "d" / "train")

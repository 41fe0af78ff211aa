"""Decode at model size (issue 21): JPEG frames read at 1/2, 1/4 or 1/8 scale by libjpeg."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from dfm_stream.frame_codec import decode_frame, encode_frame, jpeg_reduction
from dfm_stream.images import preprocess_tensor
from dfm_stream.inference import Decoder, Engine
from dfm_stream.model import DFMModel
from dfm_stream.precision_check import spearman
from dfm_stream.synthetic_parts import render_part
from dfm_stream.worker import WorkerSettings

SIZE = (64, 64)


@pytest.mark.parametrize(
    ("width", "height", "model", "factor"),
    [
        (1280, 720, (256, 256), 2),  # 640x360 still covers 256; 320x180 would not
        (256, 256, (256, 256), 1),
        (2048, 2048, (256, 256), 8),
        (1000, 1000, (128, 128), 4),  # 1000/8 rounds up to 125 < 128
        (1001, 1001, (126, 126), 8),  # libjpeg rounds up: ceil(1001 / 8) = 126
        (1280, 720, (720, 400), 1),  # the height does not allow any reduction
    ],
)
def test_reduction_is_the_largest_that_keeps_both_sides_at_least_the_model_input(
    width: int, height: int, model: tuple[int, int], factor: int
) -> None:
    assert jpeg_reduction(width, height, model) == factor
    assert jpeg_reduction(width, height, None) == 1


def _frame(width: int, height: int, gray: bool = False) -> np.ndarray:
    part = render_part(np.random.default_rng(3), height)[0]
    image = cv2.copyMakeBorder(part, 0, 0, 0, width - height, cv2.BORDER_REPLICATE)
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if gray else image


@pytest.mark.parametrize("gray", [False, True])
def test_a_large_jpeg_decodes_smaller_with_its_aspect_ratio_and_raw_frames_do_not(gray: bool) -> None:
    msg = encode_frame(_frame(1280, 720, gray), "cam", 0, "s")
    full = decode_frame(msg)
    reduced = decode_frame(msg, min_size=(256, 256))
    assert full.shape == (720, 1280, 3)
    assert reduced.shape == (360, 640, 3)
    small = cv2.resize(full, (640, 360), interpolation=cv2.INTER_AREA).astype(np.int16)
    assert np.abs(reduced.astype(np.int16) - small).mean() < 2.0  # the same picture, smaller
    raw = encode_frame(_frame(1280, 720, gray), "cam", 0, "s", enc="raw")
    assert decode_frame(raw, min_size=(256, 256)).shape == (720, 1280, 3)


def test_decoder_reads_at_model_size_only_when_asked_and_the_worker_default_is_full_size() -> None:
    msg = encode_frame(_frame(1280, 720), "cam", 0, "s")
    decoder = Decoder(torch.device("cpu"))
    try:
        full, reduced = decoder.decode([(None, msg), (None, msg)]), decoder.decode([(None, msg)], (256, 256))  # type: ignore[list-item]
    finally:
        decoder.close()
    assert [d.image.shape for d in full] == [(720, 1280, 3)] * 2  # type: ignore[union-attr]
    assert reduced[0].image.shape == (360, 640, 3)  # type: ignore[union-attr]
    assert WorkerSettings().decode_at_model_size is False


def test_scores_after_decode_at_model_size_rank_frames_as_after_a_full_decode() -> None:
    # Measured, not the 1e-3 the issue hoped for: libjpeg's DCT scaling filters differently from
    # the antialiased resize of a full frame, so scores move by a few % (random weights); the
    # ranking of good and defective frames is what is asserted.
    torch.manual_seed(0)
    model = DFMModel(
        backbone="resnet18", layer="layer2", pre_trained=False, pooling_kernel_size=2, n_comps=0.97
    )
    model.eval()
    rng = np.random.default_rng(5)
    train = [cv2.cvtColor(render_part(rng, 720)[0], cv2.COLOR_BGR2RGB) for _ in range(12)]
    batch = torch.cat([preprocess_tensor(torch.from_numpy(t).permute(2, 0, 1)[None], SIZE) for t in train])
    model.fit(model.get_features(batch)[0])
    frames = [encode_frame(render_part(rng, 720, d)[0], "c", 0, "s") for d in (None, "scratch", "spot") * 4]
    engine = Engine("cpu", "fp32", "fused")
    scores = []
    for min_size in (None, SIZE):
        images = [decode_frame(f, min_size=min_size) for f in frames]
        scores.append(engine.score(model, engine.to_tensor(images, SIZE), want_maps=False).scores)
    assert images[0].shape == (90, 90, 3)  # 720 / 8
    assert spearman(scores[0], scores[1]) >= 0.99
    assert not np.array_equal(scores[0], scores[1])  # it did decode differently

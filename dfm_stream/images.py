"""Reading image folders and the MVTec AD layout, and pre-processing frames for the model.

Pre-processing (the reference's rule): RGB, scale to [0, 1], resize to ``image_size`` with
antialiased bilinear interpolation, normalise with the ImageNet mean and std.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import cv2
import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from dfm_stream.errors import ImageReadError

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE: tuple[int, int] = (256, 256)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

OnError = Literal["stop", "skip"]


class MvtecSample(NamedTuple):
    """One test image of an MVTec-layout set: label 0 = good, 1 = defective."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None


def preprocess_tensor(batch: torch.Tensor, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """Turn a uint8 RGB ``(N, 3, H, W)`` tensor (any device) into a normalised float32 batch.

    Memory: the result is allocated once at the model's size and scaled and normalised in place.
    Resizing runs one image and one channel at a time, so the only float32 copy at the frame's own
    size is one channel of one frame (4 bytes per pixel, freed before the next); the values are
    the reference rule's (resize in float, then scale) to float32 rounding.
    """
    if batch.ndim != 4 or batch.shape[1] != 3:
        msg = f"expected a uint8 RGB batch of shape (N, 3, H, W), got {tuple(batch.shape)}"
        raise ValueError(msg)
    size = (int(image_size[0]), int(image_size[1]))
    out = torch.empty((batch.shape[0], 3, *size), dtype=torch.float32, device=batch.device)
    if tuple(batch.shape[-2:]) == size:
        out.copy_(batch)
    else:
        for i in range(batch.shape[0]):
            for c in range(3):
                plane = batch[i, c][None, None].to(torch.float32)
                out[i, c] = F.interpolate(
                    plane, size=size, mode="bilinear", align_corners=False, antialias=True
                )[0, 0]
                del plane
    mean = torch.tensor(IMAGENET_MEAN, device=out.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=out.device).view(1, 3, 1, 1)
    return out.div_(255.0).sub_(mean).div_(std)


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    if frame.dtype != np.uint8:
        msg = f"expected a uint8 image, got dtype {frame.dtype}"
        raise ValueError(msg)
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.ndim == 3 and frame.shape[2] == 3:
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    if frame.ndim == 3 and frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    msg = f"expected an HxW or HxWx3 image, got shape {frame.shape}"
    raise ValueError(msg)


def preprocess(
    frames_bgr: Sequence[np.ndarray], image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
) -> torch.Tensor:
    """Turn BGR uint8 ``HxWx3`` (or grayscale ``HxW``) frames into a normalised ``(N, 3, H, W)`` batch."""
    if not frames_bgr:
        return torch.empty((0, 3, *image_size), dtype=torch.float32)
    rgb = [_to_rgb(f) for f in frames_bgr]
    if len({f.shape for f in rgb}) == 1:
        stacked = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2)
        return preprocess_tensor(stacked, image_size)
    parts = [preprocess_tensor(torch.from_numpy(f).permute(2, 0, 1)[None], image_size) for f in rgb]
    return torch.cat(parts)


def list_images(directory: str | Path) -> list[Path]:
    """Return the image files directly in ``directory``, sorted; a clear error if none."""
    directory = Path(directory)
    if not directory.is_dir():
        msg = f"image folder {directory} does not exist or is not a folder"
        raise ImageReadError(msg)
    paths = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        msg = f"image folder {directory} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        raise ImageReadError(msg)
    return paths


def collect_image_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (their images, sorted) into one list of image paths."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(list_images(path))
        elif path.is_file():
            paths.append(path)
        else:
            msg = f"{path} is neither an image file nor a folder"
            raise ImageReadError(msg)
    return paths


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as BGR uint8 ``HxWx3``; :class:`ImageReadError` naming the file if it fails."""
    return _decode_file(Path(path), cv2.IMREAD_COLOR, "image")


def _decode_file(path: Path, flag: int, what: str) -> np.ndarray:
    """Read and decode one image file with ``flag``; :class:`ImageReadError` naming the file."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        msg = f"cannot read {what} {path}: {e.strerror or e}"
        raise ImageReadError(msg) from e
    image = cv2.imdecode(data, flag) if data.size else None
    if image is None:
        msg = f"cannot decode {what} {path}: the file is empty, truncated or not an image"
        raise ImageReadError(msg)
    return image


def iter_batches(
    paths: Sequence[Path],
    batch_size: int,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    on_error: OnError = "stop",
    skipped: list[tuple[Path, str]] | None = None,
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Yield ``(paths, normalised batch)`` of at most ``batch_size`` images.

    A file that cannot be read raises :class:`ImageReadError` (``on_error="stop"``) or is logged,
    appended to ``skipped`` as ``(path, reason)`` and left out (``on_error="skip"``).
    """
    if batch_size < 1:
        msg = f"batch size must be >= 1, got {batch_size}"
        raise ValueError(msg)
    batch_paths: list[Path] = []
    frames: list[np.ndarray] = []
    for path in paths:
        try:
            frames.append(read_image(path))
        except ImageReadError as e:
            if on_error == "stop":
                raise
            logger.warning("skipping %s: %s", path, e)
            if skipped is not None:
                skipped.append((Path(path), str(e)))
            continue
        batch_paths.append(Path(path))
        if len(frames) == batch_size:
            yield batch_paths, preprocess(frames, image_size)
            batch_paths, frames = [], []
    if frames:
        yield batch_paths, preprocess(frames, image_size)


def mvtec_test_set(root: str | Path) -> list[MvtecSample]:
    """List ``root/test/<type>/*`` as samples; masks from ``root/ground_truth/<type>/<stem>_mask.png``."""
    root = Path(root)
    test_dir = root / "test"
    if not test_dir.is_dir():
        msg = (
            f"{root} is not in the MVTec AD layout: no folder {test_dir} (expected test/good, test/<defect>)"
        )
        raise ImageReadError(msg)
    samples: list[MvtecSample] = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect_type = type_dir.name
        label = 0 if defect_type == "good" else 1
        for path in list_images(type_dir):
            mask = root / "ground_truth" / defect_type / f"{path.stem}_mask.png"
            samples.append(MvtecSample(path, label, defect_type, mask if label and mask.is_file() else None))
    if not samples:
        msg = f"MVTec test folder {test_dir} holds no image folders"
        raise ImageReadError(msg)
    return samples


def read_mask(path: str | Path, image_size: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask as a boolean ``image_size`` array (nearest-neighbour resize)."""
    mask = _decode_file(Path(path), cv2.IMREAD_GRAYSCALE, "mask")
    height, width = image_size
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST) > 127

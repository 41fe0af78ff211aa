"""INT8 backbones: ONNX Runtime static quantization, calibrated on images, cached on disk by hash.

The fp32 backbone is exported to ONNX (:func:`dfm_stream.backends.export_onnx`, deterministic
for the same weights and input size), then quantized with ``quantize_static``: QDQ format,
per-channel int8 weights, uint8 activations whose ranges come from calibration batches
(normalised images, e.g. a model's fit images). PCA and the Gaussian stay in fp32 in PyTorch.

The result is cached under :func:`cache_dir` as ``<key>.onnx``, where the key is a sha256 of the
fp32 ONNX bytes, the ONNX Runtime version and :data:`RECIPE`: a worker that loads the same
backbone at the same input size finds it without calibration data. ``<key>.json`` beside it is
the :class:`Int8Record`: how it was built and, once :mod:`dfm_stream.precision_check` has compared
it with fp32 on an evaluation set, the accuracy figures and whether they are within bounds
(``--precision auto`` uses int8 only then).

The stem convolution (the first, on the normalised pixels, about 3 % of a resnet50's work to
layer3) stays fp32: quantizing it cost the most accuracy on the evaluation sets (Spearman 0.968
against 0.997 with it in fp32, resnet18/layer2, random weights); 7-bit weights (``reduce_range``,
ONNX Runtime's advice for u8s8 on CPUs without VNNI) measured worse there too (0.986), so they
are not used: the precision check, not the recipe, is what decides whether a build may serve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dfm_stream.errors import BackendError
from dfm_stream.files import write_atomic

log = logging.getLogger(__name__)

RECIPE = "ort-static-qdq-perchannel-u8s8-minmax-fp32stem-v1"
"""What the key stands for besides the fp32 model: change it when the quantization recipe changes."""
CACHE_ENV = "DFM_STREAM_CACHE"
"""Environment variable naming the cache folder (default ``~/.cache/dfm-stream``)."""


@dataclass(frozen=True)
class Int8Record:
    """How one cached int8 backbone was built and, once checked, how close it is to fp32."""

    key: str
    recipe: str
    reduce_range: bool
    calibration_images: int
    input_size: tuple[int, int]
    validated: bool = False
    checks: tuple[dict[str, Any], ...] = ()
    """One :meth:`dfm_stream.precision_check.PrecisionCheck.as_dict` per evaluation set."""

    def to_json(self) -> bytes:
        """Return the record as JSON bytes."""
        data = dataclasses.asdict(self)
        data["input_size"] = list(self.input_size)
        data["checks"] = list(self.checks)
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, source: str) -> Int8Record:
        """Read a record written by :meth:`to_json`; :class:`BackendError` naming ``source`` if bad."""
        try:
            raw = json.loads(data)
            return cls(
                key=str(raw["key"]),
                recipe=str(raw["recipe"]),
                reduce_range=bool(raw["reduce_range"]),
                calibration_images=int(raw["calibration_images"]),
                input_size=(int(raw["input_size"][0]), int(raw["input_size"][1])),
                validated=bool(raw.get("validated", False)),
                checks=tuple(dict(c) for c in raw.get("checks", ())),
            )
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise BackendError(
                f"int8 record {source} is unreadable ({e}): delete it and quantize again"
            ) from e


def cache_dir() -> Path:
    """Return the folder of cached int8 backbones (``$DFM_STREAM_CACHE/int8``)."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "dfm-stream")
    return Path(root) / "int8"


def backbone_key(fp32_onnx: bytes) -> str:
    """Return the cache key of the int8 build of the fp32 ONNX model ``fp32_onnx``."""
    import onnxruntime as ort

    digest = hashlib.sha256()
    for part in (RECIPE.encode(), ort.__version__.encode(), fp32_onnx):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def model_path(key: str) -> Path:
    """Return where the int8 model of ``key`` is cached."""
    return cache_dir() / f"{key}.onnx"


def record_path(key: str) -> Path:
    """Return where the :class:`Int8Record` of ``key`` is cached."""
    return cache_dir() / f"{key}.json"


def cached(key: str) -> tuple[bytes, Int8Record] | None:
    """Return the cached int8 model and its record for ``key``, or None when there is none."""
    model, record = model_path(key), record_path(key)
    if not model.is_file() or not record.is_file():
        return None
    return model.read_bytes(), Int8Record.from_json(record.read_bytes(), str(record))


def save_record(record: Int8Record) -> None:
    """Write ``record`` beside its model (after a precision check)."""
    write_atomic(record_path(record.key), record.to_json())


class _Batches:
    """ONNX Runtime's calibration data reader over normalised ``(N, 3, H, W)`` float32 arrays."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"images": np.ascontiguousarray(batch, dtype=np.float32)}


def build_int8(fp32_onnx: bytes, calibration: Iterable[np.ndarray], input_size: tuple[int, int]) -> bytes:
    """Quantize ``fp32_onnx`` with ranges from ``calibration`` batches, cache it, return its bytes.

    ``calibration`` yields normalised float32 batches of ``input_size``; at least one image is
    needed. The record written beside the model is not validated yet.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [np.asarray(b, dtype=np.float32) for b in calibration]
    n_images = sum(int(b.shape[0]) for b in batches)
    if n_images == 0:
        raise BackendError("int8 calibration needs at least one image (the model's fit images, say)")
    for b in batches:
        if b.ndim != 4 or b.shape[1] != 3 or tuple(b.shape[2:]) != tuple(input_size):
            raise BackendError(
                f"int8 calibration batch of shape {tuple(b.shape)}: expected (N, 3, {input_size[0]}, "
                f"{input_size[1]}), the model's input"
            )
    key = backbone_key(fp32_onnx)
    reduce_range = False
    with tempfile.TemporaryDirectory(prefix="dfm-int8-") as tmp:
        src, prepared, out = Path(tmp) / "fp32.onnx", Path(tmp) / "prep.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32_onnx)
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        stem = _first_conv(prepared)
        with _root_warnings_muted():
            quantize_static(
                str(prepared),
                str(out),
                _Batches(batches),  # a duck-typed CalibrationDataReader
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=stem,
            )
        data = out.read_bytes()
    record = Int8Record(key, RECIPE, reduce_range, n_images, (int(input_size[0]), int(input_size[1])))
    write_atomic(model_path(key), data)
    save_record(record)
    log.info("int8 backbone %s built from %d calibration images -> %s", key[:12], n_images, model_path(key))
    return data


def _first_conv(path: Path) -> list[str]:
    import onnx

    for node in onnx.load(str(path)).graph.node:
        if node.op_type == "Conv":
            return [node.name]
    return []


@contextlib.contextmanager
def _root_warnings_muted() -> Iterator[None]:
    # quantize_static warns on the root logger about every fused conv bias it sees as a Constant
    # and suggests pre-processing (done above): nothing a user can act on. Restored afterwards.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)

"""One file per fitted model: safetensors tensors plus JSON metadata, hashed; nothing is unpickled.

Layout: a standard safetensors file whose tensors are the model's state dict (backbone weights,
PCA and Gaussian buffers) and whose ``__metadata__`` header holds one entry, ``dfm_stream``, the
JSON of :class:`ArtifactInfo`. ``content_hash`` is a sha256 over every tensor (name, dtype, shape,
bytes, sorted by name) and the canonical JSON of the metadata without the hash itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dfm_stream.drift import DriftReference, check_reference_json, reference_of
from dfm_stream.errors import ArtifactError, DfmStreamError
from dfm_stream.files import write_atomic
from dfm_stream.images import IMAGENET_MEAN, IMAGENET_STD
from dfm_stream.model.backbone import SUPPORTED_BACKBONES, SUPPORTED_LAYERS
from dfm_stream.model.dfm import DFMModel, ScoreType

FORMAT_VERSION = 1
_META_KEY = "dfm_stream"

#: Largest image side (px) an artifact may ask for. It bounds what one artifact can make a worker
#: allocate, and the bound is set by the backbone, not by the input: per batch slot, fp32, the input
#: is 12 bytes per model pixel (4096 x 4096 x 3 x 4 = 192 MiB) but the ResNet stem's output and its
#: batch-norm copy (2 x 64 channels at half the side, 4 bytes each) add 128 more, so about
#: 140 x h x w bytes: ~2.2 GiB per slot at 4096 x 4096 (at load, when the runner is built for
#: ``--batch-size`` slots, and for every batch after), ~9 MiB at 256 x 256. The content hash is a
#: checksum, not a signature, so a forged artifact asking for 100000 x 100000 px (~1.3 TB per slot)
#: must be refused here, not by the worker's allocator.
MAX_IMAGE_SIDE = 4096
#: Smallest image side (px): below this a ResNet's deeper layers have no spatial extent left.
MIN_IMAGE_SIDE = 16
#: Largest average-pooling kernel a model may use.
MAX_POOLING_KERNEL = 64
_REPR_MAX = 60


@dataclass(frozen=True)
class ArtifactInfo:
    """Everything a worker needs to know about a fitted model besides its tensors."""

    backbone: str
    layer: str
    pooling_kernel_size: int
    image_size: tuple[int, int]
    score_type: ScoreType
    n_comps: float
    n_components: int
    n_train: int
    weights_id: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    threshold: float | None = None
    score_min: float | None = None
    score_max: float | None = None
    created_at: str = ""
    library_version: str = ""
    content_hash: str = ""
    format_version: int = FORMAT_VERSION
    drift: dict[str, Any] | None = None
    """What the good frames looked like (:class:`dfm_stream.drift.DriftReference` JSON); None in
    artifacts made before drift watch, and then left out of the metadata, so their hash holds."""

    @classmethod
    def for_model(
        cls,
        model: DFMModel,
        image_size: tuple[int, int],
        n_train: int,
        drift: dict[str, Any] | None = None,
    ) -> ArtifactInfo:
        """Describe a freshly fitted ``model`` (no calibration yet), with its drift reference if given."""
        return cls(
            drift=drift,
            backbone=model.backbone,
            layer=model.layer,
            pooling_kernel_size=model.pooling_kernel_size,
            image_size=(int(image_size[0]), int(image_size[1])),
            score_type=model.score_type,
            n_comps=float(model.n_components),
            n_components=model.pca_model.k,
            n_train=int(n_train),
            weights_id=model.weights_id,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            library_version=_library_version(),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """Return the metadata as a JSON-ready dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        for key in ("image_size", "mean", "std"):
            data[key] = list(data[key])
        if data["drift"] is None:
            del data["drift"]
        return data

    @classmethod
    def from_json_dict(cls, data: Any, source: str = "<metadata>") -> ArtifactInfo:
        """Rebuild from :meth:`to_json_dict` output, checking every field's type and range.

        Unknown, missing or out-of-range fields raise :class:`ArtifactError` naming ``source``, the
        field and its (truncated) value; values are not coerced, so the content hash still matches.
        """
        if not isinstance(data, dict):
            msg = f"artifact {source}: metadata is not a JSON object: re-export it with dfm-stream"
            raise ArtifactError(msg)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            msg = (
                f"artifact {source}: unknown metadata fields {_short(unknown)}: re-export it with dfm-stream"
            )
            raise ArtifactError(msg)
        required = (n for n, f in fields.items() if f.default is dataclasses.MISSING)
        missing = sorted(n for n in required if n not in data)
        if missing:
            msg = f"artifact {source}: missing metadata fields {missing}: re-export it with dfm-stream"
            raise ArtifactError(msg)
        for name, value in data.items():
            reason = _VALIDATORS[name](value)
            if reason:
                raise _bad_field(name, value, reason, source)
        values = dict(data)
        for key in ("image_size", "mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        values["score_type"] = ScoreType(values["score_type"])
        info = cls(**values)
        _check_consistency(info, source)
        return info


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_MAX else text[: _REPR_MAX - 3] + "..."


def _bad_field(name: str, value: Any, reason: str, source: str) -> ArtifactError:
    msg = f"artifact {source}: bad metadata field {name}={_short(value)}: {reason}; re-export it"
    return ArtifactError(msg)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """Tell whether ``value`` is a finite int or float (JSON may carry NaN / Infinity; bools are not)."""
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int_in(low: int, high: int | None = None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if _is_int(value) and value >= low and (high is None or value <= high):
            return None
        return (
            f"must be an integer in [{low}, {high}]" if high is not None else f"must be an integer >= {low}"
        )

    return check


def _one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if isinstance(value, str) and value in options else f"must be one of {', '.join(options)}"

    return check


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _optional_number(value: Any) -> str | None:
    return None if value is None or _is_number(value) else "must be null or a finite number"


def _positive_number(value: Any) -> str | None:
    return None if _is_number(value) and value > 0 else "must be a finite number > 0"


def _image_size(value: Any) -> str | None:
    pair = isinstance(value, list | tuple) and len(value) == 2 and all(_is_int(v) for v in value)
    if pair and all(MIN_IMAGE_SIDE <= v <= MAX_IMAGE_SIDE for v in value):
        return None
    return f"must be two integers in [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}]"


def _rgb(positive: bool) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        triple = isinstance(value, list | tuple) and len(value) == 3 and all(_is_number(v) for v in value)
        if triple and (not positive or all(v > 0 for v in value)):
            return None
        return "must be three finite numbers" + (" > 0" if positive else "")

    return check


_VALIDATORS: dict[str, Callable[[Any], str | None]] = {
    "backbone": _one_of(tuple(SUPPORTED_BACKBONES)),
    "layer": _one_of(SUPPORTED_LAYERS),
    "pooling_kernel_size": _int_in(1, MAX_POOLING_KERNEL),
    "image_size": _image_size,
    "score_type": _one_of(tuple(t.value for t in ScoreType)),
    "n_comps": _positive_number,
    "n_components": _int_in(0),
    "n_train": _int_in(0),
    "weights_id": _string,
    "mean": _rgb(positive=False),
    "std": _rgb(positive=True),
    "threshold": _optional_number,
    "score_min": _optional_number,
    "score_max": _optional_number,
    "created_at": _string,
    "library_version": _string,
    "content_hash": _string,
    "format_version": _int_in(1),
    "drift": check_reference_json,
}


def _check_consistency(info: ArtifactInfo, source: str) -> None:
    """Relations between fields that each look fine on their own."""
    if info.n_comps > 1 and info.n_components != int(info.n_comps):
        reason = f"n_comps={info.n_comps} keeps exactly {int(info.n_comps)} components"
        raise _bad_field("n_components", info.n_components, reason, source)


class FittedModel(NamedTuple):
    """A loaded artifact: the ready-to-score model (eval mode) and its metadata."""

    model: DFMModel
    info: ArtifactInfo


def _library_version() -> str:
    import dfm_stream

    return str(getattr(dfm_stream, "__version__", "0+unknown"))


def _content_hash(tensors: dict[str, torch.Tensor], info: ArtifactInfo) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    meta = info.to_json_dict()
    meta.pop("content_hash")
    digest.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def _model_tensors(model: DFMModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _encode(tensors: dict[str, torch.Tensor], info: ArtifactInfo) -> tuple[bytes, str]:
    content_hash = _content_hash(tensors, info)
    stamped = dataclasses.replace(info, content_hash=content_hash)
    meta = {_META_KEY: json.dumps(stamped.to_json_dict(), sort_keys=True)}
    return st_save(tensors, metadata=meta), content_hash


def artifact_to_bytes(model: DFMModel, info: ArtifactInfo) -> bytes:
    """Serialise a fitted model and its metadata into artifact bytes."""
    if not model.fitted:
        msg = "cannot save an unfitted model: fit it first"
        raise ArtifactError(msg)
    return _encode(_model_tensors(model), info)[0]


def save_artifact(path: str | Path, model: DFMModel, info: ArtifactInfo) -> str:
    """Write the artifact to ``path`` (atomically, mode 0666 minus the umask); return its content hash."""
    if not model.fitted:
        msg = f"cannot save an unfitted model to {path}: fit it first"
        raise ArtifactError(msg)
    data, content_hash = _encode(_model_tensors(model), info)
    write_atomic(path, data)
    return content_hash


def _read_header(data: bytes, source: str) -> dict[str, Any]:
    if len(data) < 8:
        msg = f"artifact {source} is truncated ({len(data)} bytes): re-copy or re-export it"
        raise ArtifactError(msg)
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        msg = f"artifact {source} is truncated or not a dfm-stream artifact: re-copy or re-export it"
        raise ArtifactError(msg)
    try:
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        # ValueError covers JSONDecodeError and UnicodeDecodeError; RecursionError a deeply nested header.
        msg = f"{source} is not a dfm-stream artifact (no readable '{_META_KEY}' metadata)"
        raise ArtifactError(msg) from e
    if not isinstance(meta, dict):
        msg = f"{source}: metadata is not a JSON object"
        raise ArtifactError(msg)
    return meta


_BASIC_BLOCK_BACKBONES = ("resnet18", "resnet34")


def _feature_dim(info: ArtifactInfo) -> int:
    """Length of the feature vector the backbone produces for ``info.image_size`` (torchvision ResNets).

    The stem halves the side twice (7x7/2 conv, 3x3/2 max-pool), each of layer2..4 halves it once
    (3x3/2 conv, padding 1); then ``avg_pool2d`` divides it by the kernel (floor). The channel
    count doubles per layer from 64, times 4 for bottleneck backbones.
    """
    depth = SUPPORTED_LAYERS.index(info.layer)
    sides = []
    for image_side in info.image_size:
        side = (image_side - 1) // 2 + 1  # conv1
        for _ in range(1 + depth):  # maxpool, then the stride-2 layers past layer1
            side = (side - 1) // 2 + 1
        sides.append(side // info.pooling_kernel_size if info.pooling_kernel_size > 1 else side)
    channels = 64 * 2**depth * (1 if info.backbone in _BASIC_BLOCK_BACKBONES else 4)
    return channels * sides[0] * sides[1]


def _check_tensors(tensors: dict[str, torch.Tensor], info: ArtifactInfo, source: str) -> None:
    """Check the fitted statistics' shapes against each other and the metadata (cheap, no model built)."""
    k = info.n_components
    dim = _feature_dim(info)
    expected: dict[str, tuple[int, ...]] = {
        "pca_model.mean": (dim,),
        "pca_model.singular_vectors": (dim, k),
        "pca_model.singular_values": (k,),
        "pca_model.num_components": (1,),
    }
    if info.score_type == ScoreType.NLL:
        rank = tensors["gaussian_model.sigma_mat"].shape if "gaussian_model.sigma_mat" in tensors else ()
        rank_value = rank[0] if len(rank) == 1 and rank[0] > 0 else -1
        expected |= {
            "gaussian_model.mean_vec": (k,),
            "gaussian_model.u_mat": (k, rank_value),
            "gaussian_model.sigma_mat": (rank_value,),
        }
    for name, shape in expected.items():
        tensor = tensors.get(name)
        if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
            got = "missing" if tensor is None else f"{tensor.dtype} {tuple(tensor.shape)}"
            msg = (
                f"artifact {source} does not match its own settings: tensor {name} is {got}, "
                f"expected float32 {shape} for {info.backbone}/{info.layer} at {info.image_size} px "
                f"with {k} components: re-export it"
            )
            raise ArtifactError(msg)
    if float(tensors["pca_model.num_components"][0]) != k:
        value = float(tensors["pca_model.num_components"][0])
        msg = (
            f"artifact {source} does not match its own settings: tensor pca_model.num_components "
            f"holds {value}, metadata n_components {k}: re-export it"
        )
        raise ArtifactError(msg)


def _decode(data: bytes, source: str) -> tuple[dict[str, torch.Tensor], ArtifactInfo]:
    meta = _read_header(data, source)
    version = meta.get("format_version")
    if not _is_int(version):
        raise _bad_field("format_version", version, f"must be the integer {FORMAT_VERSION}", source)
    if version != FORMAT_VERSION:
        msg = (
            f"artifact {source} has format_version {_short(version)}; this dfm-stream "
            f"({_library_version()}) reads version {FORMAT_VERSION}: re-fit or upgrade dfm-stream"
        )
        raise ArtifactError(msg)
    info = ArtifactInfo.from_json_dict(meta, source)
    try:
        tensors = st_load(data)
    except Exception as e:
        msg = f"artifact {source} is truncated or corrupt ({e}): re-copy or re-export it"
        raise ArtifactError(msg) from e
    if _content_hash(tensors, info) != info.content_hash:
        msg = f"artifact {source} failed its content hash check: it was modified or corrupted after saving"
        raise ArtifactError(msg)
    _check_tensors(tensors, info, source)
    return tensors, info


def read_info(path_or_bytes: str | Path | bytes) -> ArtifactInfo:
    """Return an artifact's verified metadata without building the model."""
    data, source = _read_bytes(path_or_bytes)
    return _decode(data, source)[1]


def _read_bytes(path_or_bytes: str | Path | bytes) -> tuple[bytes, str]:
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        return bytes(path_or_bytes), "<bytes>"
    path = Path(path_or_bytes)
    try:
        return path.read_bytes(), str(path)
    except OSError as e:
        msg = f"cannot read artifact {path}: {e.strerror or e}"
        raise ArtifactError(msg) from e


def load_artifact(path_or_bytes: str | Path | bytes, device: str | torch.device = "cpu") -> FittedModel:
    """Load and verify an artifact; the model is built without downloading anything."""
    data, source = _read_bytes(path_or_bytes)
    tensors, info = _decode(data, source)
    try:
        with torch.device("meta"):  # no random init of weights the artifact replaces (seconds for resnet50)
            model = DFMModel(
                backbone=info.backbone,
                layer=info.layer,
                pre_trained=False,
                pooling_kernel_size=info.pooling_kernel_size,
                n_comps=info.n_comps if info.n_comps <= 1 else int(info.n_comps),
                score_type=info.score_type,
            )
        model.load_state_dict(tensors, strict=True, assign=True)
    except (DfmStreamError, RuntimeError) as e:
        msg = f"artifact {source} does not match its own settings ({info.backbone}/{info.layer}): {e}"
        raise ArtifactError(msg) from e
    model.weights_id = info.weights_id
    return FittedModel(model.to(device).eval(), info)


def update_calibration(
    path: str | Path,
    threshold: float,
    score_min: float | None,
    score_max: float | None,
    good_scores: Sequence[float] | None = None,
) -> ArtifactInfo:
    """Rewrite the artifact at ``path`` with a new threshold and score statistics; return the new info.

    ``good_scores`` (the held-out good images' scores) become the score part of its drift reference.
    """
    for name, value in (("threshold", threshold), ("score_min", score_min), ("score_max", score_max)):
        if value is not None and not math.isfinite(float(value)):
            raise _bad_field(name, value, "must be a finite number", str(path))
    data, source = _read_bytes(path)
    tensors, info = _decode(data, source)
    new_info = dataclasses.replace(
        info,
        threshold=float(threshold),
        score_min=None if score_min is None else float(score_min),
        score_max=None if score_max is None else float(score_max),
    )
    if good_scores is not None:
        reference = reference_of(info.drift, source) or DriftReference()
        new_info = dataclasses.replace(new_info, drift=reference.with_scores(good_scores).to_json_dict())
    encoded, content_hash = _encode(tensors, new_info)
    write_atomic(path, encoded)
    return dataclasses.replace(new_info, content_hash=content_hash)


def normalize_score(score: float, info: ArtifactInfo) -> float | None:
    """Map ``score`` to [0, 1] with 0.5 at the threshold; None when the model is not calibrated."""
    if info.threshold is None or info.score_min is None or info.score_max is None:
        return None
    spread = info.score_max - info.score_min
    if spread <= 0:
        return 1.0 if score > info.threshold else 0.0
    return float(min(1.0, max(0.0, (score - info.threshold) / spread + 0.5)))

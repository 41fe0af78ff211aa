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
import os
import struct
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dfm_stream.errors import ArtifactError, DfmStreamError
from dfm_stream.images import IMAGENET_MEAN, IMAGENET_STD
from dfm_stream.model.dfm import DFMModel

FORMAT_VERSION = 1
_META_KEY = "dfm_stream"


@dataclass(frozen=True)
class ArtifactInfo:
    """Everything a worker needs to know about a fitted model besides its tensors."""

    backbone: str
    layer: str
    pooling_kernel_size: int
    image_size: tuple[int, int]
    score_type: str
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

    @classmethod
    def for_model(cls, model: DFMModel, image_size: tuple[int, int], n_train: int) -> ArtifactInfo:
        """Describe a freshly fitted ``model`` (no calibration yet)."""
        return cls(
            backbone=model.backbone,
            layer=model.layer,
            pooling_kernel_size=model.pooling_kernel_size,
            image_size=(int(image_size[0]), int(image_size[1])),
            score_type=str(model.score_type),
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
        return data

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> ArtifactInfo:
        """Rebuild from :meth:`to_json_dict` output; unknown or missing fields are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            msg = f"unknown metadata fields {unknown}"
            raise ArtifactError(msg)
        try:
            values = dict(data)
            for key in ("image_size", "mean", "std"):
                if key in values:
                    values[key] = tuple(values[key])
            return cls(**values)
        except TypeError as e:
            msg = f"bad metadata: {e}"
            raise ArtifactError(msg) from e


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


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_artifact(path: str | Path, model: DFMModel, info: ArtifactInfo) -> str:
    """Write the artifact to ``path`` (atomically) and return its content hash."""
    if not model.fitted:
        msg = f"cannot save an unfitted model to {path}: fit it first"
        raise ArtifactError(msg)
    data, content_hash = _encode(_model_tensors(model), info)
    _write_atomic(Path(path), data)
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
    except (ValueError, KeyError, TypeError) as e:
        msg = f"{source} is not a dfm-stream artifact (no '{_META_KEY}' metadata)"
        raise ArtifactError(msg) from e
    if not isinstance(meta, dict):
        msg = f"{source}: metadata is not a JSON object"
        raise ArtifactError(msg)
    return meta


def _decode(data: bytes, source: str) -> tuple[dict[str, torch.Tensor], ArtifactInfo]:
    meta = _read_header(data, source)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        msg = (
            f"artifact {source} has format_version {version}; this dfm-stream "
            f"({_library_version()}) reads version {FORMAT_VERSION}: re-fit or upgrade dfm-stream"
        )
        raise ArtifactError(msg)
    try:
        info = ArtifactInfo.from_json_dict(meta)
    except ArtifactError as e:
        msg = f"artifact {source}: {e}"
        raise ArtifactError(msg) from e
    try:
        tensors = st_load(data)
    except Exception as e:
        msg = f"artifact {source} is truncated or corrupt ({e}): re-copy or re-export it"
        raise ArtifactError(msg) from e
    if _content_hash(tensors, info) != info.content_hash:
        msg = f"artifact {source} failed its content hash check: it was modified or corrupted after saving"
        raise ArtifactError(msg)
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
        model = DFMModel(
            backbone=info.backbone,
            layer=info.layer,
            pre_trained=False,
            pooling_kernel_size=info.pooling_kernel_size,
            n_comps=info.n_comps if info.n_comps <= 1 else int(info.n_comps),
            score_type=info.score_type,
        )
        model.load_state_dict(tensors, strict=True)
    except (DfmStreamError, RuntimeError) as e:
        msg = f"artifact {source} does not match its own settings ({info.backbone}/{info.layer}): {e}"
        raise ArtifactError(msg) from e
    model.weights_id = info.weights_id
    return FittedModel(model.to(device).eval(), info)


def update_calibration(
    path: str | Path, threshold: float, score_min: float | None, score_max: float | None
) -> ArtifactInfo:
    """Rewrite the artifact at ``path`` with a new threshold and score statistics; return the new info."""
    data, source = _read_bytes(path)
    tensors, info = _decode(data, source)
    new_info = dataclasses.replace(
        info,
        threshold=float(threshold),
        score_min=None if score_min is None else float(score_min),
        score_max=None if score_max is None else float(score_max),
    )
    encoded, content_hash = _encode(tensors, new_info)
    _write_atomic(Path(path), encoded)
    return dataclasses.replace(new_info, content_hash=content_hash)


def normalize_score(score: float, info: ArtifactInfo) -> float | None:
    """Map ``score`` to [0, 1] with 0.5 at the threshold; None when the model is not calibrated."""
    if info.threshold is None or info.score_min is None or info.score_max is None:
        return None
    spread = info.score_max - info.score_min
    if spread <= 0:
        return 1.0 if score > info.threshold else 0.0
    return float(min(1.0, max(0.0, (score - info.threshold) / spread + 0.5)))

"""ResNet-family feature extractor with torchvision key names, and how its weights are obtained.

Three ways to get weights, never a silent fallback:

- ``pre_trained=True``: torchvision's ImageNet weights, through torchvision's own cache
  (``$TORCH_HOME``); a failed download is a :class:`~dfm_stream.errors.WeightsError` that names the
  two ways out.
- ``weights=PATH``: a local state dict (safetensors, or a torch file read with
  ``weights_only=True``) with torchvision's key names; a common prefix such as ``module.`` and the
  classifier (``fc.*``) are tolerated. This is how an air-gapped factory deploys.
- ``pre_trained=False``: random weights, asked for explicitly.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from dfm_stream.errors import ModelConfigError, WeightsError

logger = logging.getLogger(__name__)

#: Backbone name -> (torchvision constructor, torchvision default weights enum).
SUPPORTED_BACKBONES: dict[str, tuple[Callable[..., nn.Module], type[models.WeightsEnum]]] = {
    "resnet18": (models.resnet18, models.ResNet18_Weights),
    "resnet34": (models.resnet34, models.ResNet34_Weights),
    "resnet50": (models.resnet50, models.ResNet50_Weights),
    "resnet101": (models.resnet101, models.ResNet101_Weights),
    "resnet152": (models.resnet152, models.ResNet152_Weights),
    "wide_resnet50_2": (models.wide_resnet50_2, models.Wide_ResNet50_2_Weights),
    "wide_resnet101_2": (models.wide_resnet101_2, models.Wide_ResNet101_2_Weights),
}

#: Layers whose output can be used as features.
SUPPORTED_LAYERS: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")

_STEM = ("conv1", "bn1", "relu", "maxpool")


def validate_backbone(backbone: str, layer: str) -> None:
    """Raise :class:`ModelConfigError` for an unknown backbone or layer name."""
    if backbone not in SUPPORTED_BACKBONES:
        msg = f"unknown backbone {backbone!r}: choose one of {', '.join(SUPPORTED_BACKBONES)}"
        raise ModelConfigError(msg)
    if layer not in SUPPORTED_LAYERS:
        msg = f"unknown layer {layer!r}: choose one of {', '.join(SUPPORTED_LAYERS)}"
        raise ModelConfigError(msg)


class ResNetFeatures(nn.Module):
    """The stem and residual stages of a torchvision ResNet, up to and including ``layer``.

    Children keep torchvision's names (``conv1``, ``bn1``, ``layer1`` ...), so torchvision state
    dicts load into it directly (without ``fc`` and the stages after ``layer``).
    """

    def __init__(self, resnet: nn.Module, layer: str) -> None:
        super().__init__()
        self.layer = layer
        last = SUPPORTED_LAYERS.index(layer)
        for name in (*_STEM, *SUPPORTED_LAYERS[: last + 1]):
            self.add_module(name, getattr(resnet, name))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Return the output of ``self.layer`` for an ``(N, 3, H, W)`` batch."""
        out = batch
        for module in self.children():
            out = module(out)
        return out


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a common key prefix (e.g. ``module.``) and drop the classifier (``fc.*``)."""
    keys = list(state_dict)
    prefix = ""
    anchor = next((k for k in keys if k.endswith("conv1.weight") and "layer" not in k), None)
    if anchor is not None:
        prefix = anchor[: -len("conv1.weight")]
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        if name.startswith("fc."):
            continue
        cleaned[name] = value
    return cleaned


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file or a torch file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        msg = f"weights file {path} does not exist: give the path of a torchvision state dict"
        raise WeightsError(msg)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = f"cannot read weights file {path}: {e} (expected a safetensors file or a torch state dict)"
        raise WeightsError(msg) from e
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"weights file {path} does not hold a state dict of tensors"
        raise WeightsError(msg)
    return dict(state)


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Return a sha256 over names, dtypes, shapes and values of ``state_dict`` (sorted by name).

    Two models whose backbones have the same fingerprint can share one backbone in a worker.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_imagenet(backbone: str) -> tuple[dict[str, torch.Tensor], str]:
    weights_enum = SUPPORTED_BACKBONES[backbone][1].DEFAULT
    try:
        state = weights_enum.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        msg = (
            f"cannot get torchvision's ImageNet weights for {backbone} ({e}). Either give a local "
            "weights file (--weights FILE / weights=PATH, a torchvision state dict as safetensors or "
            "torch file), or ask for random weights explicitly (--no-pretrained / pre_trained=False)"
        )
        raise WeightsError(msg) from e
    return dict(state), f"torchvision:{weights_enum.name}"


def build_feature_extractor(
    backbone: str,
    layer: str,
    pre_trained: bool = True,
    weights: str | Path | None = None,
) -> tuple[ResNetFeatures, str]:
    """Build the feature extractor and load its weights; return it with a weights id.

    The weights id is ``"torchvision:<enum name>"``, ``"file:<sha256 of the file>"`` or
    ``"random"``.
    """
    validate_backbone(backbone, layer)
    extractor = ResNetFeatures(SUPPORTED_BACKBONES[backbone][0](weights=None), layer)
    if weights is not None:
        state = clean_state_dict(read_weights_file(weights))
        weights_id = f"file:{_file_sha256(Path(weights))}"
        source = str(weights)
    elif pre_trained:
        state, weights_id = _download_imagenet(backbone)
        state = clean_state_dict(state)
        source = weights_id
    else:
        return extractor.eval(), "random"
    load_backbone_state(extractor, state, source)
    return extractor.eval(), weights_id


def load_backbone_state(extractor: ResNetFeatures, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load torchvision-named weights; keys of stages after ``extractor.layer`` are ignored."""
    wanted = extractor.state_dict()
    kept = {k: v for k, v in state.items() if k.split(".", 1)[0] in dict(extractor.named_children())}
    missing = sorted(set(wanted) - set(kept))
    if missing:
        msg = (
            f"weights from {source} do not fit this backbone: {len(missing)} missing keys "
            f"(first: {missing[:3]}); use a torchvision state dict of the same architecture"
        )
        raise WeightsError(msg)
    bad = [k for k, v in kept.items() if tuple(v.shape) != tuple(wanted[k].shape)]
    if bad:
        msg = f"weights from {source} do not fit this backbone: shape mismatch for {bad[:3]}"
        raise WeightsError(msg)
    extractor.load_state_dict(kept, strict=True)
    logger.debug("loaded %d backbone tensors from %s", len(kept), source)

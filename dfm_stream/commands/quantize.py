"""``dfm-stream quantize``: build a model's int8 backbone, check it against fp32, record the verdict."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dfm_stream.commands.argtypes import positive_int


def register(subparsers: Any) -> None:
    """Add ``quantize`` to ``subparsers``."""
    p = subparsers.add_parser(
        "quantize",
        help="build the int8 backbone of a model (CPU, ONNX Runtime) and validate it against fp32",
        description="Calibrate an int8 (static, QDQ, per-channel) ONNX Runtime build of the model's "
        "backbone on DATA/train/good, score DATA/test (and every --eval set) in fp32 and in int8, and "
        "record image/pixel AUROC deltas and score Spearman beside the cached build. Workers with "
        "--precision auto use int8 only when every set kept image AUROC within 0.005, pixel AUROC "
        "within 0.01 and Spearman >= 0.99; --precision int8 uses the build regardless.",
    )
    p.add_argument("model", help="artifact file (.safetensors)")
    p.add_argument(
        "data", help="MVTec-layout folder: train/good calibrates, test/ is the first evaluation set"
    )
    p.add_argument(
        "--eval", action="append", default=[], help="another MVTec-layout evaluation set (repeatable)"
    )
    p.add_argument(
        "--calibration-images",
        type=positive_int,
        default=64,
        help="fit images used to calibrate activation ranges (default %(default)s)",
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="default: %(default)s")
    p.add_argument("--json", dest="json_out", help="also write the record to this file")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Build, check and record; exit 0 when validated, 3 when a bound failed (the build stays cached)."""
    import dataclasses

    import torch

    from dfm_stream import backends, quantize
    from dfm_stream.artifact import load_artifact
    from dfm_stream.errors import ConfigError
    from dfm_stream.images import iter_batches, list_images
    from dfm_stream.inference import Engine
    from dfm_stream.precision_check import check_set

    model, info = load_artifact(args.model, device="cpu")
    model.eval()
    size = info.image_size
    train = list_images(Path(args.data) / "train" / "good")[: args.calibration_images]
    if not train:
        raise ConfigError(f"{args.data}: no images in train/good to calibrate the int8 backbone on")
    calibration = [batch for _, batch in iter_batches(train, args.batch_size, size)]
    example = torch.zeros((1, 3, *size))
    key = quantize.backbone_key(backends.export_onnx(model.feature_extractor, example))
    backends.build_backbone_runner(
        model.feature_extractor, "onnxruntime", example, precision="int8", calibration=calibration
    )
    reference = Engine("cpu", "fp32", "onnxruntime", batch_size=args.batch_size)
    reduced = Engine("cpu", "int8", "onnxruntime", batch_size=args.batch_size)
    sets = [("data", Path(args.data)), *((Path(e).name, Path(e)) for e in args.eval)]
    checks = [check_set(name, root, model, size, reference, reduced, args.batch_size) for name, root in sets]
    found = quantize.cached(key)
    if found is None:
        raise ConfigError(f"int8 build {key[:12]} vanished from {quantize.cache_dir()} while checking it")
    record = dataclasses.replace(
        found[1], validated=all(c.passed for c in checks), checks=tuple(c.as_dict() for c in checks)
    )
    quantize.save_record(record)
    for c in checks:
        print(
            f"{c.name}: {c.images} images, image AUROC {_fmt(c.image_auroc_fp32)} -> {_fmt(c.image_auroc)}, "
            f"pixel AUROC {_fmt(c.pixel_auroc_fp32)} -> {_fmt(c.pixel_auroc)}, Spearman {c.spearman:.4f}"
            f" ({'ok' if c.passed else 'OUT OF BOUNDS'})"
        )
    verdict = "validated: --precision auto uses it" if record.validated else "NOT validated: auto stays fp32"
    print(f"int8 backbone {key[:12]} ({quantize.model_path(key)}): {verdict}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(json.loads(record.to_json()), indent=2) + "\n")
    return 0 if record.validated else 3


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"

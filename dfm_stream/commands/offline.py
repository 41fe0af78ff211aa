"""Offline commands: ``fit``, ``score``, ``eval``, ``calibrate`` and ``make-dataset``.

Heavy imports (torch, OpenCV) happen inside the handlers so that ``dfm-stream --help`` stays quick.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfm_stream.commands.argtypes import check_writable_folder, int_at_least, non_negative_int, positive_int
from dfm_stream.errors import ConfigError, ImageReadError, ScoreTypeError

if TYPE_CHECKING:
    import numpy as np
    from rich.progress import Progress

    from dfm_stream.artifact import ArtifactInfo, FittedModel

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fit``, ``score``, ``eval``, ``calibrate`` and ``make-dataset`` to ``subparsers``."""
    _register_fit(subparsers)
    _register_score(subparsers)
    _register_eval(subparsers)
    _register_calibrate(subparsers)
    _register_make_dataset(subparsers)


def _add_runtime_args(parser: argparse.ArgumentParser, batch_size: int = 16) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, help="default: %(default)s")
    parser.add_argument(
        "--on-error",
        default="stop",
        choices=("stop", "skip"),
        help="an unreadable image stops the command (default) or is skipped and reported",
    )


def _image_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        size = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else None
    except ValueError:
        size = None
    if size is None or min(size) < 32:
        msg = f"bad image size {text!r}: give one number or HxW, at least 32 (e.g. 256 or 256x320)"
        raise argparse.ArgumentTypeError(msg)
    return size


def _register_fit(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fit", help="fit a DFM model on a folder of good images")
    p.add_argument("--train", required=True, type=Path, help="folder of good images (or an MVTec root)")
    p.add_argument("--out", required=True, type=Path, help="artifact file to write")
    p.add_argument("--backbone", default="resnet50", help="torchvision ResNet name (default: %(default)s)")
    p.add_argument("--layer", default="layer3", help="layer1..layer4 (default: %(default)s)")
    p.add_argument("--pooling-kernel-size", type=int, default=4, help="default: %(default)s")
    p.add_argument("--pca-level", type=float, default=0.97, help="variance ratio <= 1 or component count")
    p.add_argument("--score-type", default="fre", choices=("fre", "nll"), help="default: %(default)s")
    p.add_argument("--image-size", type=_image_size, default=(256, 256), help="N or HxW (default: 256)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", type=Path, help="local torchvision state dict (safetensors or torch)")
    weights.add_argument("--no-pretrained", action="store_true", help="random backbone weights")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_fit)


def _register_score(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("score", help="score images with a fitted model, one JSON line each")
    p.add_argument("--model", required=True, type=Path, help="artifact file")
    p.add_argument("--images", required=True, nargs="+", type=Path, help="image files and/or folders")
    p.add_argument("--out", required=True, type=Path, help="JSON lines file to write")
    p.add_argument("--heatmaps", type=Path, help="folder for colour overlay PNGs (fre models only)")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_score)


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on an MVTec-layout test set")
    p.add_argument("--model", required=True, type=Path, help="artifact file")
    p.add_argument("--data", required=True, type=Path, help="root with test/good, test/<defect>")
    p.add_argument("--out", required=True, type=Path, help="folder for report.json and plots")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_eval)


def _register_calibrate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="set a model's alarm threshold from held-out images")
    p.add_argument("--model", required=True, type=Path, help="artifact file (rewritten in place)")
    p.add_argument(
        "--data", required=True, type=Path, help="folder of held-out good images, or an MVTec-layout root"
    )
    p.add_argument(
        "--max-fpr", type=float, default=0.01, help="accepted false-alarm rate on good images (default 0.01)"
    )
    p.add_argument(
        "--margin",
        type=_positive_float,
        default=1.0,
        help="multiply the chosen threshold by this, as the demo does (e.g. 1.2; default 1: none)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="accept too few good images for --max-fpr: the threshold is then the highest good score",
    )
    _add_runtime_args(p)
    p.set_defaults(func=cmd_calibrate)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        msg = f"must be a number > 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _register_make_dataset(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("make-dataset", help="write a synthetic MVTec-layout data set")
    p.add_argument("--out", required=True, type=Path, help="folder to create")
    p.add_argument("--size", type=int_at_least(32), default=128, help="image side, px (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=positive_int, default=60)
    p.add_argument("--n-test-good", type=non_negative_int, default=20)
    p.add_argument("--n-test-defect", type=non_negative_int, default=20)
    p.set_defaults(func=cmd_make_dataset)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        msg = "--device cuda was asked for, but no CUDA device is available: use --device cpu or auto"
        raise ConfigError(msg)
    return name


def _progress() -> Progress:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=not sys.stderr.isatty(),
    )


def _report_skipped(skipped: list[tuple[Path, str]]) -> None:
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)


def _train_paths(train: Path) -> list[Path]:
    from dfm_stream.images import list_images

    mvtec_train = train / "train" / "good"
    return list_images(mvtec_train if mvtec_train.is_dir() else train)


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit a model on ``--train`` and write the artifact to ``--out``."""
    from dfm_stream.artifact import ArtifactInfo, save_artifact
    from dfm_stream.drift import ImageStatsCollector
    from dfm_stream.images import IMAGENET_MEAN, IMAGENET_STD, iter_batches
    from dfm_stream.model import Dfm

    check_writable_folder(args.out.parent, "--out")
    paths = _train_paths(args.train)
    device = _device(args.device)
    trainer = Dfm(
        backbone=args.backbone,
        layer=args.layer,
        pre_trained=not args.no_pretrained,
        pooling_kernel_size=args.pooling_kernel_size,
        pca_level=args.pca_level,
        score_type=args.score_type,
        weights=args.weights,
        device=device,
    )
    skipped: list[tuple[Path, str]] = []
    started = time.perf_counter()
    image_stats = ImageStatsCollector(IMAGENET_MEAN, IMAGENET_STD)
    with _progress() as progress:
        task = progress.add_task("features", total=len(paths))
        batches = iter_batches(paths, args.batch_size, args.image_size, args.on_error, skipped)
        model = trainer.fit(
            image_stats.tap(b for _, b in batches), on_batch=lambda n: progress.advance(task, n)
        )
    elapsed = time.perf_counter() - started
    _report_skipped(skipped)
    drift = image_stats.reference()
    info = ArtifactInfo.for_model(model, args.image_size, trainer.n_train, drift=drift.to_json_dict())
    content_hash = save_artifact(args.out, model, info)
    print(f"fitted on {trainer.n_train} images: k={model.pca_model.k} components, fit time {elapsed:.1f} s")
    print(f"artifact: {args.out}")
    _print_hashes(args.out, content_hash)
    return 0


def _print_hashes(path: Path, content_hash: str) -> None:
    """Print the artifact's two hashes under their names, as ``model push`` and the worker use them.

    The content hash covers the tensors and metadata (a worker given ``--model FILE`` labels the
    model ``STEM@`` + its first 8 digits); the file sha256 is over the bytes (the registry checks it).
    """
    import hashlib

    file_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"  content hash {content_hash} (worker label {path.stem}@{content_hash[:8]})")
    print(f"  file sha256  {file_sha256}")


def _load(path: Path, device: str) -> FittedModel:
    from dfm_stream.artifact import load_artifact

    return load_artifact(path, device=device)


def _score_paths(
    fitted: FittedModel,
    paths: Sequence[Path],
    args: argparse.Namespace,
    want_maps: bool,
    skipped: list[tuple[Path, str]],
) -> Iterator[tuple[list[Path], np.ndarray, np.ndarray | None]]:
    """Yield ``(paths, scores, maps or None)`` per batch, with a progress bar."""
    from dfm_stream.images import iter_batches

    model, info = fitted
    done = 0
    with _progress() as progress:
        task = progress.add_task("scoring", total=len(paths))
        for batch_paths, batch in iter_batches(
            paths, args.batch_size, info.image_size, args.on_error, skipped
        ):
            result = model(batch)
            maps = None
            if want_maps and result.anomaly_map is not None:
                maps = result.anomaly_map[:, 0].cpu().numpy()
            yield batch_paths, result.pred_score.cpu().numpy(), maps
            done += len(batch_paths)
            progress.update(task, completed=done + len(skipped))


def _score_line(path: Path, score: float, info: ArtifactInfo, heatmap: Path | None) -> dict[str, Any]:
    """One JSON line of ``score``: field names as in the wire format's score message."""
    from dfm_stream.artifact import normalize_score

    threshold = info.threshold
    line: dict[str, Any] = {
        "path": str(path),
        "score": float(score),
        "anomalous": None if threshold is None else bool(score > threshold),
        "threshold": threshold,
        "score_norm": normalize_score(float(score), info),
    }
    line["normalized_score"] = line["score_norm"]  # its earlier name, kept so existing readers still work
    if heatmap is not None:
        line["heatmap"] = str(heatmap)
    return line


def _write_heatmap(path: Path, source: Path, anomaly_map: np.ndarray, vmax: float) -> None:
    from dfm_stream.images import read_image
    from dfm_stream.plots import heatmap_overlay, write_png

    write_png(path, heatmap_overlay(read_image(source), anomaly_map, vmax))


def cmd_score(args: argparse.Namespace) -> int:
    """Score ``--images`` into ``--out`` (JSON lines), optionally with heatmap overlays."""
    from dfm_stream.heatmaps import heatmap_names, heatmap_scale
    from dfm_stream.images import collect_image_paths
    from dfm_stream.model.dfm import ScoreType

    check_writable_folder(args.out.parent, "--out")
    fitted = _load(args.model, _device(args.device))
    if args.heatmaps is not None and fitted.info.score_type != ScoreType.FRE:
        msg = f"--heatmaps needs a 'fre' model; {args.model} scores with '{fitted.info.score_type}'"
        raise ScoreTypeError(msg)
    paths = collect_image_paths(args.images)
    names = heatmap_names(paths) if args.heatmaps is not None else {}
    if args.heatmaps is not None:
        args.heatmaps.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    skipped: list[tuple[Path, str]] = []
    count = 0
    with args.out.open("w", encoding="utf-8") as out:
        for batch_paths, scores, maps in _score_paths(
            fitted, paths, args, args.heatmaps is not None, skipped
        ):
            for i, (path, score) in enumerate(zip(batch_paths, scores, strict=True)):
                heatmap = None
                if maps is not None:
                    heatmap = args.heatmaps / names[path]
                    vmax = heatmap_scale(fitted.info.threshold, maps[i], float(score))
                    _write_heatmap(heatmap, path, maps[i], vmax)
                out.write(json.dumps(_score_line(path, float(score), fitted.info, heatmap)) + "\n")
                count += 1
    _report_skipped(skipped)
    print(f"scored {count} images -> {args.out}" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate on an MVTec-layout set; write ``report.json``, ``roc.png`` and ``histogram.png``."""
    from dfm_stream.evaluate import EvalCollector, write_report
    from dfm_stream.images import mvtec_test_set
    from dfm_stream.model.dfm import ScoreType

    check_writable_folder(args.out, "--out")
    fitted = _load(args.model, _device(args.device))
    samples = {s.path: s for s in mvtec_test_set(args.data)}
    want_maps = fitted.info.score_type == ScoreType.FRE and any(s.mask_path for s in samples.values())
    collector = EvalCollector(fitted.info.image_size)
    skipped: list[tuple[Path, str]] = []
    for batch_paths, scores, maps in _score_paths(fitted, list(samples), args, want_maps, skipped):
        for i, (path, score) in enumerate(zip(batch_paths, scores, strict=True)):
            collector.add(samples[path], float(score), None if maps is None else maps[i])
    _report_skipped(skipped)
    report = write_report(args.out, collector, fitted.info, skipped)
    _print_report(report, args.out)
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _print_point(name: str, point: dict[str, Any]) -> None:
    recall = "n/a" if point["recall"] is None else f"{point['recall']:.3f}"
    fpr = "n/a" if point["false_alarm_rate"] is None else f"{point['false_alarm_rate']:.3f}"
    n_good = point["false_positives"] + point["true_negatives"]
    print(
        f"{name} {point['threshold']:.6g}: precision {point['precision']:.3f}, recall {recall}, "
        f"false-alarm rate {fpr} ({point['false_positives']}/{n_good} good), F1 {point['f1']:.3f}"
    )


def _print_report(report: dict[str, Any], out: Path) -> None:
    print(f"image AUROC: {_fmt(report['image_auroc'])}")
    for defect, value in report["image_auroc_per_defect"].items():
        print(f"  {defect}: {_fmt(value)}")
    if report["at_model_threshold"] is not None:
        _print_point("model threshold", report["at_model_threshold"])
    else:
        print("model threshold: none (not calibrated: run `dfm-stream calibrate`)")
    if report["f1_optimal"] is not None:
        _print_point("F1-optimal threshold", report["f1_optimal"])
    if report["pixel_auroc"] is not None:
        print(f"pixel AUROC: {_fmt(report['pixel_auroc'])}")
    print(f"report: {out / 'report.json'}")


def _calibration_set(data: Path) -> tuple[list[Path], list[int]]:
    from dfm_stream.images import list_images, mvtec_test_set

    if (data / "test").is_dir():
        samples = mvtec_test_set(data)
        return [s.path for s in samples], [s.label for s in samples]
    paths = list_images(data)
    return paths, [0] * len(paths)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Set the artifact's threshold and score statistics from ``--data``."""
    import numpy as np

    from dfm_stream.artifact import update_calibration
    from dfm_stream.calibration import choose_threshold

    fitted = _load(args.model, _device(args.device))
    check_writable_folder(args.model.parent, "--model (rewritten in place)")
    paths, labels = _calibration_set(args.data)
    label_of = dict(zip(paths, labels, strict=True))
    skipped: list[tuple[Path, str]] = []
    scored: list[tuple[float, int]] = []
    for batch_paths, scores, _ in _score_paths(fitted, paths, args, False, skipped):
        scored.extend((float(s), label_of[p]) for p, s in zip(batch_paths, scores, strict=True))
    _report_skipped(skipped)
    if not scored:
        msg = f"no readable calibration images in {args.data}"
        raise ImageReadError(msg)
    scores = np.array([s for s, _ in scored])
    y = np.array([label for _, label in scored])
    choice = choose_threshold(scores, y, args.max_fpr, args.margin, args.force)
    if choice.warning:
        print(f"warning: {choice.warning}", file=sys.stderr)
    good = scores[y == 0]
    info = update_calibration(args.model, choice.threshold, float(scores.min()), float(scores.max()), good)
    spread = f"{info.score_min:.6g} .. {info.score_max:.6g}"
    print(f"threshold {choice.threshold:.6g} ({choice.how}); scores {spread}")
    print(f"expected false-alarm rate: {choice.false_alarms}")
    print(f"artifact updated: {args.model}")
    _print_hashes(args.model, info.content_hash)
    return 0


def cmd_make_dataset(args: argparse.Namespace) -> int:
    """Write the synthetic data set."""
    from dfm_stream.synthetic_parts import make_dataset

    check_writable_folder(args.out, "--out")
    root = make_dataset(
        args.out,
        n_train=args.n_train,
        n_test_good=args.n_test_good,
        n_test_defect=args.n_test_defect,
        size=args.size,
        seed=args.seed,
    )
    print(f"wrote a synthetic MVTec-layout data set to {root}")
    return 0

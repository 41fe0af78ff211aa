"""``dfm-stream enrol``: refit a camera's model on its own recent good frames; push it as a candidate.

See :mod:`dfm_stream.learn.enrol` for the steps. The frames are read with XRANGE/XREVRANGE, never
through the workers' consumer group, so the workers neither wait for nor see the enrolment.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from dfm_stream.commands.argtypes import (
    check_writable_folder,
    float_at_least,
    fraction,
    non_negative_int,
    point_in_time,
    positive_int,
)
from dfm_stream.connect import RedisSettings, add_redis_args, connect
from dfm_stream.errors import ConfigError, RedisConnectError

if TYPE_CHECKING:
    from dfm_stream.learn.enrol import EnrolResult, ScoreSummary


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``enrol`` to ``subparsers``."""
    text = "fit a new version of a camera's model on its recent good frames and push it as a candidate"
    p = subparsers.add_parser("enrol", help=text, description=text)
    add_redis_args(p)
    p.add_argument("--camera", required=True, help="camera id whose frames to enrol")
    p.add_argument(
        "--model",
        required=True,
        help="model NAME in the registry: the version it replaces is its current one",
    )
    which = p.add_argument_group("which frames (default: the newest 300 frames scored not anomalous)")
    which.add_argument(
        "--frames",
        type=non_negative_int,
        default=None,
        help="how many stream frames at most (default 300; with --since/--until: all of the window; "
        "0: none, with --from-false-alarms only those)",
    )
    which.add_argument(
        "--since",
        type=point_in_time,
        help="vouched window start: ISO 8601 (UTC) or Unix s; every frame in the window is taken",
    )
    which.add_argument("--until", type=point_in_time, help="vouched window end (default: now)")
    which.add_argument(
        "--from-false-alarms",
        action="store_true",
        help="also take the frames operators marked false alarm in the console (within --since/--until)",
    )
    fit = p.add_argument_group("fit, calibration and comparison (default: as the current version)")
    fit.add_argument(
        "--holdout",
        type=fraction,
        default=0.35,
        help="fraction held out to calibrate and compare (default %(default)s)",
    )
    fit.add_argument("--seed", type=int, default=0, help="seed of the holdout split (default %(default)s)")
    fit.add_argument(
        "--max-fpr",
        type=fraction,
        default=0.01,
        help="false-alarm rate the threshold allows on the holdout (default %(default)s)",
    )
    fit.add_argument(
        "--margin",
        type=float_at_least(0.0, strict=True),
        default=1.0,
        help="multiply the threshold by this (default 1)",
    )
    fit.add_argument(
        "--force",
        action="store_true",
        help="accept a holdout too small for --max-fpr (threshold = highest holdout score)",
    )
    fit.add_argument(
        "--pca-level",
        type=float_at_least(0.0, strict=True),
        help="override the PCA level (ratio <= 1 or component count)",
    )
    fit.add_argument("--score-type", choices=("fre", "nll"), help="override the score type")
    fit.add_argument(
        "--image-size", type=positive_int, help="override the model input side, px (same backbone weights)"
    )
    fit.add_argument(
        "--fit",
        choices=("auto", "moments", "one-shot"),
        default="auto",
        help="moments: keep only float64 feature moments (8*D^2 bytes, any number of frames); one-shot: "
        "keep the features (4*N*D bytes) for one SVD; auto: moments when frames >= features per frame",
    )
    fit.add_argument(
        "--batch-size", type=positive_int, default=16, help="frames per backbone batch (default %(default)s)"
    )
    fit.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    p.add_argument(
        "--out",
        type=Path,
        help="folder to keep the frames and manifest.json in (default: ./enrol-CAMERA-UTCSTAMP)",
    )
    p.add_argument("--operator", help="who vouches for the frames (default: the login name)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_enrol)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for, but no CUDA device is available: use --device cpu or auto"
        )
    return name


def cmd_enrol(args: argparse.Namespace) -> int:
    """Collect, fit, calibrate, compare and push a candidate; print the comparison and the next step."""
    from dfm_stream.learn.collect import check_camera
    from dfm_stream.learn.enrol import FitSettings, Selection, enrol
    from dfm_stream.registry import ModelRef, ModelRegistry

    windowed = args.since is not None or args.until is not None
    if args.since is not None and args.until is not None and args.until < args.since:
        raise ConfigError("--until is before --since: give the window's start first")
    selection = Selection(
        frames=args.frames if (args.frames is not None or windowed) else 300,
        since_ms=args.since,
        until_ms=args.until,
        from_false_alarms=args.from_false_alarms,
    )
    if selection.frames == 0 and not args.from_false_alarms:
        raise ConfigError("--frames 0 selects no frames: give a count, or add --from-false-alarms")
    ref = ModelRef.parse(args.model)
    if ref.version is not None:
        raise ConfigError(
            f"--model {args.model}: give the model NAME; the candidate replaces its current version"
        )
    settings = RedisSettings.from_args(args)
    client = connect(settings)
    try:
        client.ping()
    except redis.RedisError as e:
        raise RedisConnectError(f"cannot reach Redis at {settings.safe_url()}: {e}") from e
    registry = ModelRegistry(client, prefix=settings.prefix)
    registry.current(ref.name)  # an unknown model is refused before any frame is read
    check_camera(client, args.camera, settings.prefix, settings.safe_url())
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = args.out if args.out is not None else Path(f"enrol-{args.camera}-{stamp}")
    check_writable_folder(folder, "--out")
    if any(folder.iterdir()):
        raise ConfigError(
            f"--out {folder} is not empty: give a new folder (the frames of an enrolment are kept apart)"
        )
    fit = FitSettings(
        holdout=args.holdout,
        seed=args.seed,
        max_fpr=args.max_fpr,
        margin=args.margin,
        force=args.force,
        batch_size=args.batch_size,
        device=_device(args.device),
        pca_level=args.pca_level,
        score_type=args.score_type,
        image_size=None if args.image_size is None else (args.image_size, args.image_size),
        fit=args.fit,
    )
    say = (lambda _: None) if args.json else print
    try:
        result = enrol(client, registry, args.camera, ref.name, selection, fit, folder, args.operator, say)
    finally:
        client.close()
    if args.json:
        print(json.dumps(_as_json(result), sort_keys=True))
    else:
        _print(result, args.camera)
    return 0


def _as_json(result: EnrolResult) -> dict[str, object]:
    return {
        "candidate": result.candidate.model,
        "created": result.push.created,
        "asked": result.asked,
        "found": result.found,
        "n_train": result.n_train,
        "n_holdout": result.n_holdout,
        "frames_folder": str(result.folder),
        "current": result.current.to_dict(),
        "new": result.candidate.to_dict(),
        "seconds": result.seconds,
        "peak_rss_bytes": result.peak_rss_bytes,
    }


def _line(summary: ScoreSummary) -> str:
    d = summary.to_dict()
    threshold = "none" if summary.threshold is None else f"{summary.threshold:.6g}"
    rate = "n/a (not calibrated)" if summary.false_alarms is None else str(summary.false_alarms)
    return (
        f"  {summary.model:<20} threshold {threshold:<10} scores median {d['score_median']:.6g}, "
        f"p99 {d['score_p99']:.6g}, max {d['score_max']:.6g}; false alarms: {rate}"
    )


def _print(result: EnrolResult, camera: str) -> None:
    asked = "all in the window" if result.asked is None else str(result.asked)
    print(f"frames: asked {asked}, found {result.found}")
    for name, tally in result.tallies.items():
        print(f"  {name}: {tally.describe()}")
    if result.asked and result.tallies.get("stream") and result.tallies["stream"].kept < result.asked:
        print(
            "  fewer than asked: the frame stream is trimmed (MAXLEN, about 10 s by default); "
            "run enrol again later or raise the camera's maxlen"
        )
    print(f"kept in {result.folder} (manifest.json: provenance of every frame)")
    print(f"fitted on {result.n_train} frames ({result.fit}, k={result.components})")
    print(f"calibrated on the {result.n_holdout} held-out frames: {result.calibration}")
    if result.warning:
        print(f"warning: {result.warning}")
    print(f"on the {result.n_holdout} held-out frames:")
    print(_line(result.current))
    print(_line(result.candidate))
    peak = result.peak_rss_bytes / 2**20
    print(f"time from enrol start to candidate: {result.seconds:.1f} s; peak memory (RSS): {peak:.0f} MiB")
    ref = result.candidate.model
    shadow = f"dfm-stream model shadow --camera {camera} --model {ref}"
    if result.push.created:
        print(f"candidate {ref} pushed (not current, assigned to no camera); next: {shadow}")
    else:
        print(f"identical to the stored version {ref}: nothing new stored; next: {shadow}")

"""``dfm-stream model ...``: push, list, show, roll back, assign and pull models in the Redis registry.

``shadow``, ``compare`` and ``promote`` try a candidate on a camera before it goes live
(:mod:`dfm_stream.promotion`, :mod:`dfm_stream.shadow`); ``rollback --camera`` undoes a promote.

Every subcommand takes the common Redis options (``--redis``, ``--cluster``, TLS, ``--prefix``) and
``--json`` for machine-readable output. Importing torch is left to ``push``, which validates the
artifact before storing it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from dfm_stream.commands.argtypes import positive_int
from dfm_stream.connect import RedisSettings, add_redis_args, connect
from dfm_stream.errors import RedisConnectError, RegistryError
from dfm_stream.files import write_atomic
from dfm_stream.promotion import Promotions, Switch
from dfm_stream.registry import ModelRef, ModelRegistry


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``model`` and its subcommands to ``subparsers``."""
    parser = subparsers.add_parser(
        "model", help="manage the model registry in Redis (push, assign, rollback)"
    )
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    p = _sub(sub, "push", "store an artifact as the next version of a model and make it current", cmd_push)
    p.add_argument("--name", required=True, help="model name (letters, digits, '_', '.', '-')")
    p.add_argument("--file", required=True, type=Path, help="artifact file written by `dfm-stream fit`")

    _sub(
        sub,
        "list",
        "list the models, their current version, candidates (from `enrol`) and the cameras using them",
        cmd_list,
    )

    p = _sub(sub, "show", "show every version of a model and the cameras assigned to it (JSON)", cmd_show)
    p.add_argument("name", help="model name")

    p = _sub(
        sub,
        "rollback",
        "make an older version of a model current (default: the one before current), or with --camera"
        " give a camera back its assignment from before its last assign or promote",
        cmd_rollback,
    )
    p.add_argument("name", nargs="?", help="model name (not with --camera)")
    p.add_argument("--camera", default=None, help="roll back this camera's last assign or promote")
    p.add_argument(
        "--to", type=positive_int, default=None, metavar="VERSION", help="the version to make current"
    )

    p = _sub(
        sub, "assign", "route a camera to a model (NAME: its current version; NAME@V: pinned)", cmd_assign
    )
    p.add_argument("--camera", required=True, help="camera id")
    p.add_argument("--model", required=True, help="NAME or NAME@VERSION")

    p = _sub(sub, "unassign", "remove a camera's model assignment", cmd_unassign)
    p.add_argument("--camera", required=True, help="camera id")

    p = _sub(
        sub,
        "shadow",
        "score a camera's frames with a candidate too, beside its live model (never alarms)",
        cmd_shadow,
    )
    p.add_argument("--camera", required=True, help="camera id")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="candidate NAME@VERSION (NAME: its current version, pinned now)")
    group.add_argument("--off", action="store_true", help="stop shadow scoring of the camera")

    p = _sub(sub, "compare", "compare a camera's shadow candidate with its live model", cmd_compare)
    p.add_argument("--camera", required=True, help="camera id")
    p.add_argument(
        "--show", type=positive_int, default=20, metavar="N", help="frame ids of disagreements to list"
    )

    p = _sub(
        sub,
        "promote",
        "make a camera's shadow candidate its live model (undo: model rollback --camera)",
        cmd_promote,
    )
    p.add_argument("--camera", required=True, help="camera id")

    p = _sub(sub, "pull", "write a stored version back to a file (checksum verified)", cmd_pull)
    p.add_argument("ref", metavar="NAME[@VERSION]", help="model, optionally pinned (default: current)")
    p.add_argument("--out", required=True, type=Path, help="file to write")


def _sub(
    sub: argparse._SubParsersAction, name: str, text: str, func: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=text, description=text)
    add_redis_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=func)
    return p


def _registry(args: argparse.Namespace) -> ModelRegistry:
    settings = RedisSettings.from_args(args)
    client = connect(settings)
    try:
        client.ping()
    except redis.RedisError as e:
        raise RedisConnectError(f"cannot reach Redis at {settings.safe_url()}: {e}") from e
    return ModelRegistry(client, prefix=settings.prefix)


def _emit(args: argparse.Namespace, data: Any, text: str) -> int:
    print(json.dumps(data, sort_keys=True) if args.json else text)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Validate ``--file`` and store it as the next version of ``--name``."""
    try:
        data = args.file.read_bytes()
    except OSError as e:
        raise RegistryError(f"cannot read artifact {args.file}: {e.strerror or e}") from e
    result = _registry(args).push_result(args.name, data, source=str(args.file))
    info = result.info
    names = f"file sha256 {info.sha256}, content hash {info.content_hash}"
    if result.created:
        text = (
            f"pushed {info.name} version {info.version} (now current): {info.size} bytes in {info.chunks}"
            f" chunk(s), {names}"
        )
    else:
        was = (
            "it was current already"
            if result.previous_current == info.version
            else f"now current again, was {result.previous_current}"
        )
        text = (
            f"{args.file} is byte-identical to {info.name} version {info.version}: no new version"
            f" stored ({was}); {names}"
        )
    data_out = {**info.to_dict(), "created": result.created, "previous_current": result.previous_current}
    return _emit(args, data_out, text)


def cmd_list(args: argparse.Namespace) -> int:
    """Print every model with its versions, current version and assigned cameras."""
    reg = _registry(args)
    assignments = reg.assignments()
    rows: list[dict[str, object]] = []
    lines = [f"{'MODEL':<24} {'CURRENT':>7} {'VERSIONS':<16} {'CANDIDATES':<12} CAMERAS"]
    for name in reg.names():
        infos = reg.versions(name)
        versions = [v.version for v in infos]
        candidates = [v.version for v in infos if v.status == "candidate"]
        cameras = sorted(cam for cam, ref in assignments.items() if ref.name == name)
        current = reg.current(name)
        rows.append(
            {
                "name": name,
                "current": current,
                "versions": versions,
                "candidates": candidates,
                "cameras": cameras,
            }
        )
        versions_text = ",".join(str(v) for v in versions)
        candidates_text = ",".join(str(v) for v in candidates) or "-"
        lines.append(
            f"{name:<24} {current:>7} {versions_text:<16} {candidates_text:<12} {','.join(cameras) or '-'}"
        )
    if not rows:
        lines = ["no models in the registry: push one with `dfm-stream model push --name NAME --file FILE`"]
    return _emit(args, rows, "\n".join(lines))


def cmd_show(args: argparse.Namespace) -> int:
    """Print a model's versions, current version and cameras as JSON."""
    data = _registry(args).show(args.name)
    return _emit(args, data, json.dumps(data, indent=2, sort_keys=True))


def cmd_rollback(args: argparse.Namespace) -> int:
    """Make an older (or any stored) version of a model current, or undo a camera's last assign."""
    if (args.name is None) == (args.camera is None):
        raise RegistryError("model rollback: name a model (NAME) or a camera (--camera CAM), not both")
    if args.camera is not None:
        if args.to is not None:
            raise RegistryError(
                "model rollback --camera restores the previous assignment: --to does not apply"
            )
        switch = Promotions(_registry(args)).rollback(args.camera)
        text = f"camera {args.camera} -> {switch.after or 'unassigned'} (was {switch.before or 'unassigned'})"
        return _emit(args, _switch_json(switch), text)
    reg = _registry(args)
    previous = reg.current(args.name)
    current = reg.rollback(args.name, args.to)
    text = f"{args.name}: current version is now {current} (was {previous})"
    return _emit(args, {"name": args.name, "current": current, "previous": previous}, text)


def cmd_assign(args: argparse.Namespace) -> int:
    """Route a camera to a model reference."""
    reg = _registry(args)
    ref = ModelRef.parse(args.model)
    reg.assign(args.camera, ref)
    resolved = reg.resolve(args.camera)
    pinned = "pinned" if ref.version is not None else "follows the current version"
    text = f"camera {args.camera} -> {ref} ({pinned}; now {resolved})"
    return _emit(args, {"camera": args.camera, "model": str(ref), "resolved": str(resolved)}, text)


def cmd_unassign(args: argparse.Namespace) -> int:
    """Remove a camera's assignment."""
    _registry(args).unassign(args.camera)
    return _emit(args, {"camera": args.camera, "model": None}, f"camera {args.camera} unassigned")


def _switch_json(switch: Switch) -> dict[str, Any]:
    return {
        "camera": switch.camera,
        "before": None if switch.before is None else str(switch.before),
        "model": None if switch.after is None else str(switch.after),
    }


def cmd_shadow(args: argparse.Namespace) -> int:
    """Start (``--model``) or stop (``--off``) shadow scoring of a camera."""
    promotions = Promotions(_registry(args))
    if args.off:
        ref = promotions.unshadow(args.camera)
        return _emit(
            args, {"camera": args.camera, "shadow": None}, f"camera {args.camera}: shadow {ref} stopped"
        )
    pinned = promotions.shadow(args.camera, ModelRef.parse(args.model))
    text = (
        f"camera {args.camera} is shadowed by {pinned}: see `dfm-stream model compare --camera"
        f" {args.camera}`, then `model promote --camera {args.camera}`"
    )
    return _emit(args, {"camera": args.camera, "shadow": str(pinned)}, text)


def cmd_compare(args: argparse.Namespace) -> int:
    """Print how a camera's shadow candidate compares with its live model."""
    from dfm_stream.shadow import read_comparison

    reg = _registry(args)
    shadow = Promotions(reg).shadow_of(args.camera)
    result = read_comparison(reg.client, args.camera, reg.prefix)
    data = {**result.to_dict(), "shadowing": None if shadow is None else str(shadow)}
    return _emit(args, data, format_comparison(result, shadow, args.show))


def format_comparison(result: Any, shadow: ModelRef | None, show: int) -> str:
    """Return the text ``model compare`` prints for a :class:`~dfm_stream.shadow.Comparison`."""
    now = f"now shadowed by {shadow}" if shadow else "not shadowed now"
    if not result.frames:
        return f"camera {result.camera}: no frame compared yet ({now})"

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        f"camera {result.camera}: candidate {result.model} vs live {result.live_model} ({now})",
        f"frames compared            {result.frames}",
        f"anomalous flag agreement   {result.agreement:.2%} ({result.agree} frames)",
        f"score correlation Pearson  {fmt(result.pearson)} (all frames compared)",
        f"score correlation Spearman {fmt(result.spearman)} (latest {result.spearman_frames} frames)",
        f"flagged by live only       {result.only_live}",
        f"flagged by candidate only  {result.only_shadow}",
    ]
    for item in result.disagreements[:show]:
        lines.append(f"  {item['frame_id']}  flagged by {item['flagged_by']} only")
    return "\n".join(lines)


def cmd_promote(args: argparse.Namespace) -> int:
    """Make a camera's shadow candidate its live model."""
    switch = Promotions(_registry(args)).promote(args.camera)
    text = (
        f"camera {args.camera} -> {switch.after} (was {switch.before or 'unassigned'}); shadow stopped;"
        f" undo with `dfm-stream model rollback --camera {args.camera}`"
    )
    return _emit(args, _switch_json(switch), text)


def cmd_pull(args: argparse.Namespace) -> int:
    """Write a stored version to ``--out`` after checking its checksum."""
    reg = _registry(args)
    ref = ModelRef.parse(args.ref)
    version = ref.version if ref.version is not None else reg.current(ref.name)
    data = reg.get_bytes(ref.name, version)
    _write_atomic(args.out, data)
    info = reg.version_info(ref.name, version)
    text = (
        f"wrote {args.out}: {ref.name}@{version}, {len(data)} bytes,"
        f" file sha256 {info.sha256}, content hash {info.content_hash}"
    )
    return _emit(args, {**info.to_dict(), "file": str(args.out)}, text)


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, data)
    except OSError as e:
        raise RegistryError(f"cannot write {path}: {e.strerror or e}") from e

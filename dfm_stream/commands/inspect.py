"""``dfm-stream alarms`` and ``dfm-stream scores``: print the event and score streams as JSON lines.

``--since ID`` starts after that stream entry id (default: the start of the stream, or with
``--count N`` and no ``--since``, the last N entries); ``--follow`` keeps printing new entries until
interrupted. Each line is the decoded message plus ``id`` (the stream entry id). The image of a
``raised`` event is shown as ``image_bytes`` (its size), or written to ``--images DIR`` (then
``image_file`` names the file). An entry that cannot be decoded prints ``{"id", "error"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dfm_stream import keys, replies
from dfm_stream.commands.argtypes import positive_int, stream_id
from dfm_stream.connect import RedisClient, RedisSettings, add_redis_args, connect
from dfm_stream.errors import ConfigError, WireError
from dfm_stream.replies import text as _s
from dfm_stream.wire import FIELD, EventMsg, ScoreMsg

FOLLOW_BLOCK_MS = 1000
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``alarms`` and ``scores`` to ``subparsers``."""
    a = subparsers.add_parser("alarms", help="print alarm and health events as JSON lines")
    _common(a)
    a.add_argument("--images", help="write the JPEG of each raised event into this folder")
    a.set_defaults(func=run_alarms)
    s = subparsers.add_parser("scores", help="print a camera's scores as JSON lines")
    s.add_argument("--camera", required=True, help="camera id")
    _common(s)
    s.set_defaults(func=run_scores)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new entries")
    p.add_argument(
        "--since", type=stream_id, help="start after this stream entry id (default: the beginning)"
    )
    p.add_argument(
        "--count",
        type=positive_int,
        help="at most N entries (no --since: the last N; with --follow: the last N, then new ones)",
    )
    add_redis_args(p)


def _entries(
    client: RedisClient, key: str, args: argparse.Namespace
) -> Iterator[tuple[str, dict[bytes, bytes]]]:
    """Yield ``(entry id, fields)`` of ``key`` as the options ask."""
    remaining = None if args.follow else args.count
    rows: list[replies.Record] = []
    last = args.since or "0-0"
    if args.since is None and args.count is not None:
        rows = list(reversed(replies.xrevrange(client, key, count=args.count)))
    while True:
        for entry_id, fields in rows:
            last = _s(entry_id)
            yield last, fields
            if remaining is not None:
                remaining -= 1
                if remaining <= 0:
                    return
        if args.count is not None and args.since is None and not args.follow:
            return
        block = FOLLOW_BLOCK_MS if args.follow else None
        rows = replies.xread_one(client, key, last, count=500, block=block)
        if not rows and not args.follow:
            return


def _print(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def _event_line(entry_id: str, fields: dict[bytes, bytes], images: Path | None) -> dict[str, Any]:
    try:
        event = EventMsg.from_bytes(fields.get(FIELD.encode(), b""))
    except WireError as e:
        return {"id": entry_id, "error": str(e)}
    line = {"id": entry_id, **event.to_json_dict()}
    if event.image is not None and images is not None:
        try:
            line["image_file"] = str(save_event_image(images, event.camera, entry_id, event.image))
        except OSError as e:
            line["image_error"] = f"not saved: {e.strerror or e}"
            print(f"warning: event {entry_id}: image not saved ({e.strerror or e}); skipped", file=sys.stderr)
    return line


def image_file_name(camera: str, entry_id: str) -> str:
    """Return ``{camera}_{entry id}.jpg`` made of letters, digits, ``_``, ``.``, ``-`` only.

    Both parts come from Redis, i.e. from whoever can write the alarm stream: a camera named
    ``../x`` or ``/etc/x`` must not pick the file that is written.
    """
    stem = _UNSAFE.sub("_", f"{camera}_{entry_id}")[:120].lstrip(".")
    return f"{stem or 'event'}.jpg"


def save_event_image(folder: Path, camera: str, entry_id: str, image: bytes) -> Path:
    """Write ``image`` to ``folder`` under :func:`image_file_name`; never outside ``folder``."""
    path = folder / image_file_name(camera, entry_id)
    if path.parent.resolve() != folder.resolve():
        raise OSError(f"{path} is outside {folder}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(image)
    return path


def run_alarms(args: argparse.Namespace) -> int:
    """Print the alarm stream."""
    settings = RedisSettings.from_args(args)
    images = Path(args.images) if args.images else None
    if images is not None:
        try:
            images.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--images {images}: cannot create the folder ({e.strerror or e})") from e
    client = connect(settings)
    try:
        for entry_id, fields in _entries(client, keys.alarms_key(settings.prefix), args):
            _print(_event_line(entry_id, fields, images))
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()
    return 0


def run_scores(args: argparse.Namespace) -> int:
    """Print one camera's score stream."""
    return print_camera_stream(
        args, keys.scores_key, lambda data: ScoreMsg.from_bytes(data).__dict__, must_be_known=True
    )


def print_camera_stream(
    args: argparse.Namespace,
    key_of: Callable[[str, str], str],
    as_dict: Callable[[bytes], dict[str, Any]],
    must_be_known: bool = False,
) -> int:
    """Print ``args.camera``'s stream ``key_of(camera, prefix)`` as JSON lines, one per entry.

    ``as_dict`` decodes an entry's ``msg``; an entry it refuses is printed as ``{"id", "error"}``.
    With ``must_be_known``, a camera Redis has never heard of is an error naming those it has.
    """
    settings = RedisSettings.from_args(args)
    try:
        key = key_of(args.camera, settings.prefix)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    client = connect(settings)
    try:
        if must_be_known:
            _check_camera_known(client, args.camera, settings)
        for entry_id, fields in _entries(client, key, args):
            try:
                line = {"id": entry_id, **as_dict(fields.get(FIELD.encode(), b""))}
            except WireError as e:
                line = {"id": entry_id, "error": str(e)}
            _print(line)
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()
    return 0


def _check_camera_known(client: RedisClient, camera: str, settings: RedisSettings) -> None:
    """Refuse a camera that has no score stream and no reader registration, naming those that do."""
    prefix = settings.prefix
    if client.exists(keys.scores_key(camera, prefix)) or client.hexists(keys.cameras_key(prefix), camera):
        return
    known = {_s(name) for name in client.hkeys(keys.cameras_key(prefix))}
    for key in client.scan_iter(match=f"{prefix}:{{*}}:scores", count=500):
        name = _s(key)[len(prefix) + 2 : -len("}:scores")]
        if keys.valid_name(name):
            known.add(name)
    listing = ", ".join(sorted(known)) if known else "none yet (no reader has run with this --prefix)"
    raise ConfigError(
        f"no camera {camera!r} in {settings.safe_url()} (prefix {prefix!r}): cameras there: {listing}"
    )

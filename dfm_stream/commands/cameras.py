"""``dfm-stream cameras``: list the registered cameras with their state, and remove stale ones.

Examples::

    dfm-stream cameras --redis redis://plc-redis:6379/0            # table; --json for a list of objects
    dfm-stream cameras remove line7 line8                          # forget them (registration + heartbeat)
    dfm-stream cameras remove line7 --purge                        # and delete their streams and state

Listing is ``cameras`` or ``cameras list``. The Redis options and ``--json`` may come before or
after the action.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import redis

from dfm_stream import keys
from dfm_stream.connect import RedisSettings, add_redis_args, connect
from dfm_stream.errors import RedisConnectError

_SHARED_DESTS = ("redis", "cluster", "redis_ca", "redis_cert", "redis_key", "redis_password_file", "prefix")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cameras`` (list) and ``cameras list`` / ``cameras remove``."""
    text = "list the registered cameras (live, stale, never seen) and remove the ones whose readers are gone"
    parser = subparsers.add_parser("cameras", help=text, description=text)
    _common(parser, inherit=False)
    parser.set_defaults(func=cmd_list)
    sub = parser.add_subparsers(dest="cameras_command", metavar="ACTION")
    p = sub.add_parser("list", help="list the registered cameras (the default)")
    _common(p, inherit=True)
    p = sub.add_parser(
        "remove",
        help="remove cameras from the registry and the heartbeat set",
        description="Remove cameras from {prefix}:cameras and {prefix}:cameras:alive; with --purge also"
        " delete their per-camera keys ({prefix}:{CAM}:frames, :scores, alarm state...). The model"
        " assignment is kept.",
    )
    p.add_argument("camera_ids", nargs="+", metavar="CAM", help="camera id(s)")
    p.add_argument(
        "--purge", action="store_true", help="also delete the cameras' streams and per-camera keys"
    )
    p.add_argument("--force", action="store_true", help="purge a camera even though its reader is live")
    _common(p, inherit=True)
    p.set_defaults(func=cmd_remove)


def _common(parser: argparse.ArgumentParser, inherit: bool) -> None:
    """Add the Redis options, ``--group`` and ``--json``; ``inherit``: keep values given before the action."""
    add_redis_args(parser)
    parser.add_argument(
        "--group", default=keys.DEFAULT_GROUP, help="worker consumer group (default %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    if inherit:  # an action's own defaults would overwrite what was given before it
        for action in parser._actions:
            if action.dest in (*_SHARED_DESTS, "group", "json"):
                action.default = argparse.SUPPRESS


def _client(args: argparse.Namespace) -> tuple[Any, str]:
    settings = RedisSettings.from_args(args)
    client = connect(settings)
    try:
        client.ping()
    except redis.RedisError as e:
        raise RedisConnectError(f"cannot reach Redis at {settings.safe_url()}: {e}") from e
    return client, settings.prefix


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172_800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86_400:.0f} d ago"


def _state(s: Any) -> str:
    if s.state == "stale":
        return f"stale ({_age(s.last_seen_age_s)})"
    return "never seen" if s.state == "never_seen" else s.state


def _model(s: Any) -> str:
    if s.model:
        return s.model
    return f"{s.config_model} (config)" if s.config_model else "-"


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def cmd_list(args: argparse.Namespace) -> int:
    """Print every registered camera with its state, frame stream, worker backlog and model."""
    from dfm_stream.cameras import camera_statuses

    client, prefix = _client(args)
    statuses = camera_statuses(client, prefix, args.group)
    if args.json:
        print(json.dumps([s.to_dict() for s in statuses], sort_keys=True))
        return 0
    if not statuses:
        print(f"no cameras registered in {keys.cameras_key(prefix)}: start a reader (dfm-stream read)")
        return 0
    head = ("CAMERA", "STATE", "READER", "SOURCE", "FRAMES", "LAST FRAME", "PENDING", "LAG", "MODEL")
    rows = [head]
    for s in statuses:
        reader = s.reader_state or "-"
        if s.host:
            reader += f" {s.host}:{s.pid}" if s.pid is not None else f" {s.host}"
        row = (s.camera, _state(s), reader, s.source or "-", _number(s.frames), _age(s.last_frame_age_s))
        rows.append((*row, _number(s.pending), _number(s.lag), _model(s)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    """Remove cameras from the registry and heartbeat set (and purge their keys with ``--purge``)."""
    from dfm_stream.cameras import LIVE, remove_cameras

    client, prefix = _client(args)
    done = remove_cameras(client, list(dict.fromkeys(args.camera_ids)), prefix, args.purge, args.force)
    if args.json:
        print(json.dumps([vars(r) for r in done], sort_keys=True))
    for r in done:
        if r.was == LIVE:
            print(
                f"warning: camera {r.camera} was live: its reader still runs and beats again; stop it"
                " (workers that discover cameras follow it only while it is registered)",
                file=sys.stderr,
            )
        if args.json:
            continue
        what = (
            f"{len(r.deleted_keys)} key(s) deleted" if args.purge else "streams kept (--purge deletes them)"
        )
        kept = f"; model assignment {r.model} kept (dfm-stream model unassign --camera {r.camera})"
        print(f"removed camera {r.camera} (was {r.was.replace('_', ' ')}): {what}{kept if r.model else ''}")
    return 0

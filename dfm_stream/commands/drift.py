"""``dfm-stream drift --camera C``: a camera's drift figures against its model's reference.

Reads the hash the workers write (``{prefix}:{CAM}:drift``, every ``--stats-interval``), so it
needs no Prometheus. Prints each figure with its reference, current value and alert line, then a
verdict: ``ok``, ``drift`` (a figure at or past its line: the line changed, re-enrol the model),
``warming up`` (fewer than 100 frames since the worker started or the model changed) or
``unavailable`` (the model carries no reference: re-fit and calibrate it). Exit status 0 whatever
the verdict (``--json`` for scripts); 2 for a mistake (unknown camera, Redis unreachable).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from dfm_stream import keys
from dfm_stream.connect import RedisClient, RedisSettings, add_redis_args, connect
from dfm_stream.errors import ConfigError
from dfm_stream.replies import text

_LABELS = {
    "score_psi": "score PSI",
    "score_quantile_ratio": "score quantile ratio",
    "brightness_psi": "brightness PSI",
    "contrast_psi": "contrast PSI",
    "sharpness_psi": "sharpness PSI",
}
_WHAT = {
    "score_psi": "median score",
    "score_quantile_ratio": "score p95",
    "brightness_psi": "median brightness",
    "contrast_psi": "median contrast",
    "sharpness_psi": "median sharpness",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``drift`` to ``subparsers``."""
    text_ = "print a camera's drift figures (scores and image statistics against its model's reference)"
    p = subparsers.add_parser("drift", help=text_, description=text_)
    p.add_argument("--camera", required=True, help="camera id")
    p.add_argument("--json", action="store_true", help="print the hash as one JSON object")
    add_redis_args(p)
    p.set_defaults(func=cmd_drift)


def _known_cameras(client: RedisClient, prefix: str) -> list[str]:
    names = {text(n) for n in client.hkeys(keys.cameras_key(prefix))}
    for what in ("drift", "scores"):
        for key in client.scan_iter(match=f"{prefix}:{{*}}:{what}", count=500):
            names.add(text(key)[len(prefix) + 2 : -len(f"}}:{what}")])
    return sorted(n for n in names if keys.valid_name(n))


def read_drift(client: RedisClient, camera: str, prefix: str, where: str) -> dict[str, Any]:
    """Return the decoded drift hash of ``camera``; :class:`ConfigError` saying why there is none."""
    raw = {text(k): text(v) for k, v in client.hgetall(keys.drift_key(camera, prefix)).items()}
    if raw:
        try:
            raw["figures"] = json.loads(raw.get("figures", "[]"))
        except ValueError as e:
            raise ConfigError(f"camera {camera}: the drift hash holds bad JSON ({e})") from e
        return raw
    known = _known_cameras(client, prefix)
    if camera in known:
        msg = (
            f"no drift figures for camera {camera!r} in {where} yet: a worker writes them every "
            "--stats-interval once it scores the camera's frames (is a worker running?)"
        )
    else:
        listing = ", ".join(known) if known else "none yet (no reader or worker has run with this --prefix)"
        msg = f"no camera {camera!r} in {where} (prefix {prefix!r}): cameras there: {listing}"
    raise ConfigError(msg)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def render(camera: str, data: dict[str, Any], now_ms: int) -> list[str]:
    """Return the lines ``drift`` prints for ``data`` (a decoded drift hash)."""
    age = max(0.0, (now_ms - int(data.get("updated_ms", now_ms))) / 1000)
    lines = [
        f"camera {camera}: model {data.get('model', '?')}, {data.get('frames', '0')} frames in the window "
        f"of worker {data.get('worker', '?')}, {age:.0f} s ago"
    ]
    figures = data["figures"]
    if figures:
        head = ("FIGURE", "VALUE", "ALERT AT", "", "REFERENCE", "CURRENT", "OF")
        rows = [head]
        for f in figures:
            past = f["value"] is not None and f["value"] >= f["alert"]
            row = (
                _LABELS.get(f["name"], f["name"]),
                _num(f["value"]),
                _num(f["alert"]),
                "PAST" if past else "ok",
            )
            rows.append((*row, _num(f["reference"]), _num(f["current"]), _WHAT.get(f["name"], "")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    verdict = data.get("verdict", "unavailable")
    advice = {
        "drift": "the line has moved away from what the model was fitted on: enrol a new model version "
        "(dfm-stream enrol) or restore the lighting / camera position",
        "ok": "every figure is below its alert line",
    }.get(verdict, data.get("reason", ""))
    reason = data.get("reason", "")
    if verdict in ("drift", "ok") and reason:
        advice += f" ({reason})"
    lines.append(f"verdict: {verdict.upper()}: {advice}")
    return lines


def cmd_drift(args: argparse.Namespace) -> int:
    """Print ``--camera``'s drift figures."""
    settings = RedisSettings.from_args(args)
    try:
        keys.check_name(args.camera)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    client = connect(settings)
    try:
        data = read_drift(client, args.camera, settings.prefix, settings.safe_url())
    finally:
        client.close()
    if args.json:
        print(json.dumps({"camera": args.camera, **data}, sort_keys=True))
        return 0
    print("\n".join(render(args.camera, data, int(time.time() * 1000))))
    return 0

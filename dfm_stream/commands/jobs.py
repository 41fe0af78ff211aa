"""``dfm-stream inspect``: run one part inspection job and print its result as JSON.

``dfm-stream inspect --camera C --part P [--meas M] [--frames N | --window-ms MS] [--timeout S]``
starts a job now (the trigger), waits for the frames captured after it, publishes the result to
``dfm:{C}:results`` and prints it as one JSON object. Exit code 0 for ``ok`` and ``ng``, 1 for an
``error`` result (the JSON says why). ``dfm-stream results --camera C`` prints published results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dfm_stream import keys
from dfm_stream.commands.argtypes import positive_float, positive_int
from dfm_stream.commands.inspect import _common, print_camera_stream
from dfm_stream.connect import RedisSettings, add_redis_args, connect
from dfm_stream.inspection import DEFAULT_TIMEOUT_S, Inspector, JobRequest
from dfm_stream.wire import ResultMsg


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``inspect`` and ``results`` to ``subparsers``."""
    p = subparsers.add_parser(
        "inspect",
        help="inspect one part: wait for the next frame(s) of a camera, print OK/NG as JSON",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--camera", required=True, help="camera id")
    p.add_argument("--part", required=True, help="part id (yours, returned untouched)")
    p.add_argument("--meas", default="", help="measurement id (yours, returned untouched)")
    window = p.add_mutually_exclusive_group()
    window.add_argument("--frames", type=positive_int, help="judge the next N frames captured (default 1)")
    window.add_argument("--window-ms", type=positive_int, help="judge the frames captured within MS ms")
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for frames before an error result (default %(default)s)",
    )
    p.add_argument("--image", help="write the worst frame's JPEG to this file")
    add_redis_args(p)
    p.set_defaults(func=run_inspect)
    r = subparsers.add_parser("results", help="print a camera's part inspection results as JSON lines")
    r.add_argument("--camera", required=True, help="camera id")
    _common(r)
    r.set_defaults(func=run_results)


USER_MISTAKES = ("bad_request", "unknown_camera", "redis_error")
"""Result reasons that mean the command line (or --redis) is wrong, not the part or the line: exit 2."""


def run_inspect(args: argparse.Namespace) -> int:
    """Run one job; print its result."""
    settings = RedisSettings.from_args(args)
    request = JobRequest(
        camera=args.camera,
        part_id=args.part,
        meas_id=args.meas,
        frames=args.frames,
        window_ms=args.window_ms,
        timeout_s=args.timeout,
        source="cli",
    )
    client = connect(settings)
    try:
        result = Inspector(client, settings.prefix).inspect(request)
    finally:
        client.close()
    if args.image and result.image is not None:
        Path(args.image).write_bytes(result.image)
    sys.stdout.write(json.dumps(result.to_json_dict(), sort_keys=True) + "\n")
    sys.stdout.flush()
    reason = result.reason or ""
    if result.state == "error" and reason.split(":", 1)[0] in USER_MISTAKES:
        sys.stderr.write(f"error: {reason}\n")  # the request or the Redis URL is wrong: exit 2, one line
        return 2
    return 1 if result.state == "error" else 0


def run_results(args: argparse.Namespace) -> int:
    """Print one camera's results stream."""
    return print_camera_stream(args, keys.results_key, lambda data: ResultMsg.from_bytes(data).to_json_dict())

"""``dfm-stream soak``: run readers and workers against Redis for a long time and report their memory."""

import argparse
import sys
from pathlib import Path

from dfm_stream.commands.argtypes import float_at_least, int_at_least, non_negative_float, positive_int
from dfm_stream.connect import DURABILITY_LEVELS
from dfm_stream.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``soak`` to ``subparsers``."""
    p = subparsers.add_parser(
        "soak",
        help="run the pipeline (Redis, a reader, workers) for --duration and report every process's RSS",
        description="Start Redis (embedded unless --redis), a reader with synthetic cameras and worker"
        " processes with a tiny model, sample the RSS of each process every --rss-interval seconds, and"
        " report start/warm/end/peak memory and the growth after warm-up.",
    )
    p.add_argument("--duration", type=float_at_least(1), required=True, help="seconds to run")
    p.add_argument("--cameras", type=positive_int, default=4, help="synthetic cameras (4)")
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes (1)")
    p.add_argument("--rss-interval", type=float_at_least(0.1), default=5.0, help="seconds (5)")
    p.add_argument("--fps", type=float_at_least(0.1), default=10.0, help="per camera (10)")
    p.add_argument("--size", type=int_at_least(32), default=64, help="frame side in px (64)")
    p.add_argument("--model", type=Path, help="artifact to score with (default: fit a tiny one at start)")
    p.add_argument(
        "--redis",
        help="use this Redis (redis://, unix:// or redis+sentinel://, no TLS options) instead of an embedded "
        "server",
    )
    p.add_argument(
        "--durability",
        choices=DURABILITY_LEVELS,
        default="local",
        help="the reader's and the workers' --durability (replicated needs a replica; default %(default)s)",
    )
    p.add_argument("--workdir", type=Path, help="keep logs, config and model here (default: a temp dir)")
    p.add_argument("--out", type=Path, help="write the report (with every RSS sample) as JSON here")
    p.add_argument(
        "--max-growth-mib",
        type=non_negative_float,
        help="exit 1 when any process grew more than this after warm-up",
    )
    p.set_defaults(func=cmd_soak)


def cmd_soak(args: argparse.Namespace) -> int:
    """Run the soak; exit 0 when every process survived (and stayed within --max-growth-mib)."""
    from dfm_stream.bench.soak import SoakSettings, format_report, run_soak, write_report

    if args.model is not None and not args.model.is_file():
        raise ConfigError(
            f"--model {args.model}: no such file (give an artifact written by `dfm-stream fit`)"
        )
    settings = SoakSettings(
        duration_s=args.duration,
        cameras=args.cameras,
        rss_interval_s=args.rss_interval,
        workers=args.workers,
        fps=args.fps,
        size=args.size,
        redis_url=args.redis,
        durability=args.durability,
        model=args.model,
        workdir=args.workdir,
        max_growth_mib=args.max_growth_mib,
    )
    report = run_soak(settings)
    if args.out:
        write_report(report, args.out)
    print(format_report(report))
    for name, tail in report.get("log_tails", {}).items():
        print(f"--- last lines of {name}'s log ---\n{tail}", file=sys.stderr)
    return 0 if report["ok"] else 1

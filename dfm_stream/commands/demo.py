"""``dfm-stream demo``: the live demo (embedded Redis, synthetic cameras, readers, a worker, a live view)."""

import argparse
import sys
from pathlib import Path

from dfm_stream.commands.argtypes import fraction, positive_float, positive_int
from dfm_stream.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo`` to ``subparsers``."""
    from dfm_stream.connect import add_redis_args
    from dfm_stream.metrics import add_metrics_args

    p = subparsers.add_parser(
        "demo",
        help="run the whole service live on this machine: embedded Redis, two synthetic cameras, a worker",
        description="Start Redis (embedded unless --redis), fit a model on good warm-up frames, start a"
        " reader per synthetic camera and a worker, show a live view of scores and alarms, stop after"
        " --duration or Ctrl-C, and print a summary. line-a shows only good parts; the other cameras"
        " show some defective ones.",
    )
    p.add_argument("--duration", type=positive_float, default=60.0, help="seconds to run (default 60)")
    p.add_argument("--cameras", type=positive_int, default=2, help="synthetic cameras (default 2, max 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic cameras (default 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="model device")
    p.add_argument("--weights", type=Path, help="local torchvision state dict for the backbone")
    p.add_argument("--backbone", help="default: resnet18 on CPU, resnet50 on GPU")
    p.add_argument("--layer", help="default: layer2 on CPU, layer3 on GPU")
    p.add_argument("--size", type=positive_int, help="frame and model image size (default 128 CPU, 256 GPU)")
    p.add_argument("--fps", type=positive_float, default=8.0, help="frames per second per camera (default 8)")
    p.add_argument(
        "--defect-rate",
        type=fraction,
        default=0.12,
        help="share of defective parts on line-b.. (default 0.12)",
    )
    p.add_argument("--warmup", type=positive_int, default=192, help="good frames to fit on (default 192)")
    p.add_argument(
        "--margin", type=positive_float, default=1.2, help="threshold = max held-out good score x this"
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="worker batch size (default 8)")
    p.add_argument("--max-wait-ms", type=positive_int, default=50, help="worker batch wait (default 50)")
    p.add_argument("--no-view", action="store_true", help="print a line per second instead of the live view")
    p.add_argument("--summary-json", type=Path, help="also write the summary to this JSON file")
    p.add_argument(
        "--console-port",
        type=int,
        default=8080,
        help="port of the web console (read only), on --metrics-host (default 8080; taken or 0: a free"
        " port; -1: no console)",
    )
    p.add_argument("--workdir", type=Path, help="keep the model and logs here (default: a temp folder)")
    add_redis_args(p)
    p.set_defaults(redis=None)
    for action in p._actions:
        if action.dest == "redis":
            action.help = "use this Redis server instead of an embedded one (redis://, rediss://, unix://)"
    add_metrics_args(p, default_port=9400)
    p.set_defaults(func=cmd_demo)


def _redis_cli(args: argparse.Namespace) -> list[str]:
    """Return the Redis options the demo hands on to its reader and worker processes."""
    from dfm_stream.connect import RedisSettings

    settings = RedisSettings.from_args(args)
    out = ["--prefix", settings.prefix]
    if args.redis:
        out = ["--redis", args.redis, *out]
    if settings.cluster:
        out.append("--cluster")
    for flag, value in (
        ("--redis-ca", args.redis_ca),
        ("--redis-cert", args.redis_cert),
        ("--redis-key", args.redis_key),
        ("--redis-password-file", args.redis_password_file),
    ):
        if value:
            out += [flag, value]
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo."""
    from dfm_stream.connect import RedisSettings
    from dfm_stream.demo.app import DemoSettings, run_demo

    if args.cameras > 8:
        raise ConfigError(f"--cameras {args.cameras}: the demo runs at most 8 cameras on one machine")
    redis = RedisSettings.from_args(args)
    if redis.cluster and not args.redis:
        raise ConfigError("--cluster needs --redis URL (a seed node): the embedded server is not a cluster")
    if not 0.0 <= args.defect_rate <= 1.0:
        raise ConfigError(f"--defect-rate {args.defect_rate} must be within [0, 1]")
    settings = DemoSettings(
        duration=args.duration,
        cameras=args.cameras,
        seed=args.seed,
        device=args.device,
        weights=args.weights,
        backbone=args.backbone,
        layer=args.layer,
        size=args.size,
        fps=args.fps,
        defect_rate=args.defect_rate,
        warmup=args.warmup,
        margin=args.margin,
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        view=not args.no_view and sys.stdout.isatty(),
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        console_port=args.console_port,
        summary_json=args.summary_json,
        workdir=args.workdir,
        redis=redis if args.redis else None,
        prefix=redis.prefix,
        redis_cli=_redis_cli(args),
    )
    return run_demo(settings)

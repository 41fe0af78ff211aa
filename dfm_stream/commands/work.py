"""``dfm-stream work``: score frames from Redis Streams with DFM, publish scores and alarms."""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

from dfm_stream import keys
from dfm_stream.commands.argtypes import positive_int
from dfm_stream.commands.config_flags import add_section_flags, overlay
from dfm_stream.config import AlarmsConfig, Config, WorkerConfig, settings_config
from dfm_stream.connect import add_redis_args, connect, settings_with_config
from dfm_stream.errors import ConfigError
from dfm_stream.metrics import add_metrics_args
from dfm_stream.signals import stop_on_signals

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9401
WORKER_FLAGS = (
    "group",
    "batch_size",
    "max_wait_ms",
    "device",
    "precision",
    "backend",
    "threads",
    "claim_idle_s",
    "max_deliveries",
    "max_age_s",
    "scores_maxlen",
    "max_pixels",
    "max_frame_bytes",
    "max_cameras",
    "decode_at_model_size",
)
"""The ``[worker]`` settings that ``work`` takes as options (``model`` is the config's default model)."""
ALARM_FLAGS = ("k", "n", "clear_after", "cooldown_s")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``work`` to ``subparsers``."""
    p = subparsers.add_parser(
        "work",
        help="score frames from Redis with DFM; publish scores and alarm events",
        description="Read frames through a Redis consumer group, score them in batches, publish one score "
        "per frame (acked atomically with it), keep alarm state per camera. Models: --model FILE for every "
        "camera, the cameras' models in --config, or the model registry (dfm-stream model assign).",
    )
    src = p.add_argument_group("what to score")
    src.add_argument("--model", help="artifact file used for every camera (else config or registry)")
    src.add_argument("--config", help="TOML config: cameras, their models, worker and alarm settings")
    src.add_argument("--cameras", help="comma-separated camera ids (default: the config's, else discovered)")
    w = p.add_argument_group("worker (flag > environment DFM__WORKER__KEY > [worker] in --config > default)")
    add_section_flags(w, WorkerConfig, WORKER_FLAGS)
    w.add_argument(
        "--burst", action="store_true", help="exit once every stream is drained and nothing pending"
    )
    w.add_argument(
        "--max-frames", type=positive_int, default=None, help="exit after reading this many frames"
    )
    a = p.add_argument_group("alarms (flag > environment DFM__ALARMS__KEY > [alarms] > default)")
    add_section_flags(a, AlarmsConfig, ALARM_FLAGS)
    add_redis_args(p)
    add_metrics_args(p, default_port=DEFAULT_METRICS_PORT)
    p.set_defaults(func=run)


def resolve(args: argparse.Namespace) -> tuple[Config, WorkerConfig, AlarmsConfig]:
    """Return the config and its ``[worker]`` and ``[alarms]`` with the options that were given laid over."""
    config = settings_config(args.config)
    return config, overlay(config.worker, args, WORKER_FLAGS), overlay(config.alarms, args, ALARM_FLAGS)


def _cameras(args: argparse.Namespace, config: Config) -> list[str] | None:
    if args.cameras:
        cameras = [c.strip() for c in args.cameras.split(",") if c.strip()]
    elif config.cameras:
        cameras = [c.id for c in config.cameras]
    else:
        return None
    for camera in cameras:
        if not keys.valid_name(camera):
            raise ConfigError(f"--cameras: invalid camera id {camera!r}")
    return cameras


def run(args: argparse.Namespace) -> int:
    """Run a worker until SIGTERM/SIGINT (or --burst / --max-frames); exit 0 after a clean drain.

    The signal handlers are installed first, so a SIGTERM while torch is still being imported or
    the model loaded ends the process with 0 as soon as that step is done.
    """
    with stop_on_signals(threading.Event(), "finishing the batches in flight, then exiting") as stop:
        return _run(args, stop)


def _run(args: argparse.Namespace, stop: threading.Event) -> int:
    config, worker_config, alarms = resolve(args)
    if args.model and not Path(args.model).is_file():  # before importing torch: a typo is quick to see
        raise ConfigError(f"--model {args.model}: no such file")
    from dfm_stream.worker import WorkerSettings

    settings = WorkerSettings.from_config(
        worker_config,
        alarms,
        cameras=_cameras(args, config),
        burst=args.burst,
        max_frames=args.max_frames,
    )

    import torch

    from dfm_stream.artifact import read_info
    from dfm_stream.cpus import model_threads
    from dfm_stream.inference import Engine
    from dfm_stream.metrics import WorkerMetrics, new_registry, serve_for
    from dfm_stream.routing import ModelRouter
    from dfm_stream.runners import CacheMetrics
    from dfm_stream.shadow import ShadowMetrics
    from dfm_stream.worker import Worker

    if args.model:
        read_info(args.model)  # fail fast on a corrupt or tampered artifact
    redis_settings = settings_with_config(args, config.redis)
    settings.durability = redis_settings.durability
    threads = worker_config.threads or model_threads(torch.get_num_threads())
    torch.set_num_threads(threads)
    engine = Engine(
        worker_config.device,
        worker_config.precision,
        worker_config.backend,
        batch_size=settings.batch_size,
        threads=threads,
    )
    if stop.is_set():
        return 0
    client = connect(redis_settings)
    registry = new_registry()
    metrics = WorkerMetrics.create(registry)
    camera_models = {c.id: c.model for c in config.cameras if c.model}
    router = ModelRouter(
        engine,
        client,
        redis_settings.prefix,
        model_file=args.model,
        camera_models=camera_models,
        default_model=worker_config.model,
        metrics=metrics,
        cache_metrics=CacheMetrics.create(registry),
    )
    worker = Worker(
        client,
        router,
        settings,
        redis_settings.prefix,
        metrics,
        cluster=redis_settings.cluster,
        shadow_metrics=ShadowMetrics.create(registry),
    )
    server = None
    if args.metrics_port >= 0 and not stop.is_set():
        server = serve_for("worker", registry, args.metrics_host, args.metrics_port, ready=worker.ready)
    try:
        if not stop.is_set():
            router.preload()  # build file models now: /readyz is ready once built, first frames do not wait
        log.info(
            "worker %s on %s (%s, %s backend, %d threads), %s, group %s, redis %s",
            worker.name,
            engine.device,
            engine.precision,
            engine.backend,
            engine.threads,
            "cameras " + ",".join(settings.cameras) if settings.cameras else "cameras discovered",
            settings.group,
            redis_settings.safe_url(),
        )
        worker.run(stop)  # returns at once when a signal came during start-up
    finally:
        if server is not None:
            server.close()
        client.close()
    return 0

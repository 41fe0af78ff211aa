"""``dfm-stream work``: score frames from Redis Streams with DFM, publish scores and alarms."""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path
from typing import Any

from dfm_stream import keys
from dfm_stream.commands.argtypes import (
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from dfm_stream.config import WORKER_BACKENDS, WORKER_PRECISIONS
from dfm_stream.connect import add_redis_args, connect, settings_with_config
from dfm_stream.errors import ConfigError
from dfm_stream.metrics import add_metrics_args
from dfm_stream.signals import stop_on_signals

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9401


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
    w = p.add_argument_group("worker")
    w.add_argument("--group", default=None, help=f"consumer group (default {keys.DEFAULT_GROUP})")
    w.add_argument("--batch-size", type=positive_int, default=None, help="largest model batch (default 8)")
    w.add_argument(
        "--max-wait-ms",
        type=non_negative_float,
        default=None,
        help="wait after a batch's first frame (default 20)",
    )
    w.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    w.add_argument(
        "--precision",
        default=None,
        choices=WORKER_PRECISIONS,
        help="backbone precision: auto (default: fp32 on the CPU, bf16/fp16 on CUDA), fp32, fp16, bf16",
    )
    w.add_argument(
        "--backend",
        default=None,
        choices=WORKER_BACKENDS,
        help="backbone runtime: auto (default: the fastest installed, ONNX Runtime > OpenVINO > fused "
        "on the CPU; channels_last on CUDA) or one by name; all keep scores within 1e-3 of fp32 eager",
    )
    w.add_argument(
        "--threads",
        type=non_negative_int,
        default=None,
        help="CPU threads of the model; 0 or unset: torch's choice, capped at the CPU quota of the container",
    )
    w.add_argument(
        "--claim-idle",
        type=positive_float,
        default=None,
        help="reclaim frames idle this long, s (default 30)",
    )
    w.add_argument(
        "--max-deliveries", type=positive_int, default=None, help="then dead-letter the frame (default 3)"
    )
    w.add_argument(
        "--max-age",
        type=non_negative_float,
        default=None,
        help="skip frames older than this at dequeue, s (off)",
    )
    w.add_argument(
        "--scores-maxlen", type=int_at_least(100), default=10_000, help="approximate MAXLEN of score streams"
    )
    w.add_argument(
        "--max-pixels", type=positive_int, default=None, help="largest w*h accepted (default 8192*8192)"
    )
    w.add_argument(
        "--max-frame-bytes",
        type=positive_int,
        default=None,
        help="larger frame messages are dead-lettered as oversized (default 3 * max-pixels + 1 MiB)",
    )
    w.add_argument(
        "--burst", action="store_true", help="exit once every stream is drained and nothing pending"
    )
    w.add_argument(
        "--max-frames", type=positive_int, default=None, help="exit after reading this many frames"
    )
    w.add_argument(
        "--max-cameras",
        type=positive_int,
        default=None,
        help="most cameras followed by discovery (no --cameras/config cameras); the rest are refused (256)",
    )
    a = p.add_argument_group("alarms")
    a.add_argument(
        "--alarm-k", type=positive_int, default=None, help="raise when k of the last n are anomalous (1)"
    )
    a.add_argument("--alarm-n", type=positive_int, default=None, help="window of the k-of-n rule (1)")
    a.add_argument(
        "--alarm-clear-after", type=positive_int, default=None, help="consecutive normal frames to clear (5)"
    )
    a.add_argument(
        "--alarm-cooldown",
        type=non_negative_float,
        default=None,
        help="no new raise this long after a clear, s (0)",
    )
    add_redis_args(p)
    add_metrics_args(p, default_port=DEFAULT_METRICS_PORT)
    p.set_defaults(func=run)


def _pick(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _settings(args: argparse.Namespace, config: Any) -> Any:
    from dfm_stream.alarms import AlarmSettings
    from dfm_stream.consumer import DEFAULT_MAX_CAMERAS
    from dfm_stream.wire import DEFAULT_MAX_PIXELS
    from dfm_stream.worker import WorkerSettings

    wc, ac = (config.worker, config.alarms) if config is not None else (None, None)
    cameras = None
    if args.cameras:
        cameras = [c.strip() for c in args.cameras.split(",") if c.strip()]
    elif config is not None and config.cameras:
        cameras = [c.id for c in config.cameras]
    for camera in cameras or []:
        if not keys.valid_name(camera):
            raise ConfigError(f"--cameras: invalid camera id {camera!r}")
    max_age = _pick(args.max_age, wc.max_age_s if wc else None)
    try:
        alarm = AlarmSettings(
            k=_pick(args.alarm_k, ac.k if ac else None, 1),
            n=_pick(args.alarm_n, ac.n if ac else None, 1),
            clear_after=_pick(args.alarm_clear_after, ac.clear_after if ac else None, 5),
            cooldown_s=_pick(args.alarm_cooldown, ac.cooldown_s if ac else None, 0.0),
        )
    except ValueError as e:
        raise ConfigError(f"alarm settings: {e}") from e
    settings = WorkerSettings(
        cameras=cameras,
        group=_pick(args.group, wc.group if wc else None, keys.DEFAULT_GROUP),
        batch_size=_pick(args.batch_size, wc.batch_size if wc else None, 8),
        max_wait_ms=_pick(args.max_wait_ms, wc.max_wait_ms if wc else None, 20.0),
        claim_idle_s=_pick(args.claim_idle, wc.claim_idle_s if wc else None, 30.0),
        max_deliveries=_pick(args.max_deliveries, wc.max_deliveries if wc else None, 3),
        max_age_s=None if max_age is None or max_age == 0 else max_age,
        scores_maxlen=args.scores_maxlen,
        max_pixels=_pick(args.max_pixels, DEFAULT_MAX_PIXELS),
        max_frame_bytes=args.max_frame_bytes,
        alarm=alarm,
        burst=args.burst,
        max_frames=args.max_frames,
        max_cameras=_pick(args.max_cameras, wc.max_cameras if wc else None, DEFAULT_MAX_CAMERAS),
    )
    _check_ranges(settings)
    return settings


def _check_ranges(settings: Any) -> None:
    """Refuse settings that would silently skip, drop or never retry frames."""
    rules = (
        ("--batch-size", settings.batch_size, settings.batch_size >= 1, "must be >= 1"),
        ("--max-wait-ms", settings.max_wait_ms, settings.max_wait_ms >= 0, "must be >= 0"),
        ("--claim-idle", settings.claim_idle_s, settings.claim_idle_s > 0, "must be > 0 seconds"),
        ("--max-deliveries", settings.max_deliveries, settings.max_deliveries >= 1, "must be >= 1"),
        (
            "--max-age",
            settings.max_age_s,
            settings.max_age_s is None or settings.max_age_s > 0,
            "must be > 0 seconds (leave it out to never skip frames)",
        ),
        (
            "--scores-maxlen",
            settings.scores_maxlen,
            settings.scores_maxlen >= 100,
            "must be >= 100 (the score stream would throw scores away before anyone reads them)",
        ),
        ("--max-pixels", settings.max_pixels, settings.max_pixels >= 1, "must be >= 1"),
        ("--max-cameras", settings.max_cameras, settings.max_cameras >= 1, "must be >= 1"),
        (
            "--max-frame-bytes",
            settings.max_frame_bytes,
            settings.max_frame_bytes is None or settings.max_frame_bytes >= 1,
            "must be >= 1",
        ),
    )
    for flag, value, ok, rule in rules:
        if not ok:
            raise ConfigError(f"{flag} {value}: {rule}")


def run(args: argparse.Namespace) -> int:
    """Run a worker until SIGTERM/SIGINT (or --burst / --max-frames); exit 0 after a clean drain.

    The signal handlers are installed first, so a SIGTERM while torch is still being imported or
    the model loaded ends the process with 0 as soon as that step is done.
    """
    with stop_on_signals(threading.Event(), "finishing the batches in flight, then exiting") as stop:
        return _run(args, stop)


def _run(args: argparse.Namespace, stop: threading.Event) -> int:
    config = None
    if args.config:
        from dfm_stream.config import load_config

        config = load_config(args.config)
    if args.model and not Path(args.model).is_file():  # before importing torch: a typo is quick to see
        raise ConfigError(f"--model {args.model}: no such file")
    settings = _settings(args, config)

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
    redis_settings = settings_with_config(args, config.redis if config else None)
    settings.durability = redis_settings.durability
    wc = config.worker if config else None
    threads = _pick(args.threads, wc.threads if wc and wc.threads else None) or model_threads(
        torch.get_num_threads()
    )
    if threads < 1:
        raise ConfigError(f"--threads {threads}: must be >= 1")
    torch.set_num_threads(threads)
    engine = Engine(
        _pick(args.device, wc.device if wc else None, "auto"),
        _pick(args.precision, wc.precision if wc else None, "auto"),
        _pick(args.backend, wc.backend if wc else None, "auto"),
        batch_size=settings.batch_size,
        threads=threads,
    )
    if stop.is_set():
        return 0
    client = connect(redis_settings)
    registry = new_registry()
    metrics = WorkerMetrics.create(registry)
    camera_models = {c.id: c.model for c in config.cameras if c.model} if config else {}
    router = ModelRouter(
        engine,
        client,
        redis_settings.prefix,
        model_file=args.model,
        camera_models=camera_models,
        default_model=config.worker.model if config else "",
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

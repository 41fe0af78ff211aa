"""``dfm-stream read``: push camera frames into Redis Streams (one camera, or many from a config).

Examples::

    dfm-stream read --redis redis://127.0.0.1:6379/0 --camera line1 --source rtsp://cam/stream --fps 10
    dfm-stream read --camera demo --source synthetic:seed=3,defect_rate=0.1 --size 128x128
    dfm-stream read --config cameras.toml                 # every camera of the file
    dfm-stream read --config cameras.toml --camera line1  # one camera of the file

Options given on the command line override the environment and the config file for every
selected camera (option > ``DFM__CAMERAS__ID__KEY`` > the camera's table > ``DFM__READER__KEY`` >
``[reader]`` > default). The
process serves ``/metrics``, ``/healthz`` and ``/readyz`` (ready = Redis reachable and every
camera open) and exits 0 on SIGTERM/SIGINT, with ``--duration``, or when every finite source
(video file or folder without ``--loop``, or ``--max-frames``) is done -- unless a camera sent
nothing to Redis in the run (its source never delivered a frame, or no frame could be written):
then it says why (one line on stderr, every such camera) and exits 2.
"""

import argparse
import dataclasses
import logging
import threading
from typing import Any

from dfm_stream.commands.argtypes import positive_float, positive_int
from dfm_stream.commands.config_flags import add_section_flags, overlay
from dfm_stream.config import CameraConfig, Config, settings_config
from dfm_stream.errors import ConfigError, NoFramesError, SourceError
from dfm_stream.metrics import add_metrics_args
from dfm_stream.signals import stop_on_signals

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9400

CAMERA_FLAGS = (
    "fps",
    "size",
    "roi",
    "jpeg_quality",
    "encoding",
    "maxlen",
    "loop",
    "backoff_initial",
    "backoff_max",
    "open_timeout",
    "read_timeout",
    "pace",
)
"""The per-camera settings (``[reader]`` defaults, ``[[cameras]]`` tables) that ``read`` takes as options."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dfm-stream read``."""
    from dfm_stream.connect import add_redis_args

    p = subparsers.add_parser(
        "read",
        help="read cameras and push their frames into Redis Streams",
        description="Push camera frames into Redis Streams: one camera (--camera, --source) or many"
        " (--config FILE). Exits 0 on SIGTERM/SIGINT, after --duration, or when finite sources end;"
        " 2 (and says why) when a camera sent nothing to Redis in the run: no frame from its source,"
        " or none could be written.",
    )
    g = p.add_argument_group("cameras")
    g.add_argument("--config", help="TOML config with [[cameras]] (env DFM__... overrides it)")
    g.add_argument("--camera", help="camera id (with --source), or ids of --config to run (comma list)")
    g.add_argument(
        "--source",
        help="0 (USB index), rtsp:// or http(s):// URL, video file, image folder, or "
        "synthetic:seed=N,defect_rate=R,fps=F,size=WxH",
    )
    s = p.add_argument_group(
        "per-camera settings (option > environment > the camera's table > [reader] > default)"
    )
    add_section_flags(s, CameraConfig, CAMERA_FLAGS)
    r = p.add_argument_group("run")
    r.add_argument("--max-frames", type=positive_int, help="per camera, then stop")
    r.add_argument("--duration", type=positive_float, help="stop after this many seconds")
    add_redis_args(p)
    add_metrics_args(p, default_port=DEFAULT_METRICS_PORT)
    p.set_defaults(func=run)


def select_cameras(args: argparse.Namespace) -> tuple[list[CameraConfig], Config]:
    """Return the cameras ``args`` ask for (one from --camera/--source, or from --config)."""
    config = settings_config(args.config)
    if args.config:
        if args.source:
            raise ConfigError("give either --source (with --camera) or --config, not both")
        cams = list(config.cameras)
        if args.camera:
            cams = [config.camera(c.strip()) for c in args.camera.split(",") if c.strip()]
        if not cams:
            raise ConfigError(f"config {args.config} has no [[cameras]]")
    elif not args.camera or not args.source:
        raise ConfigError("dfm-stream read needs --camera ID and --source SRC, or --config FILE")
    else:
        try:
            cams = [CameraConfig(id=args.camera, source=args.source, **dataclasses.asdict(config.reader))]
        except ConfigError as e:
            raise ConfigError(f"--camera/--source: {e}") from e
    return [overlay(c, args, CAMERA_FLAGS) for c in cams], config


def check_sources(cameras: list[CameraConfig]) -> None:
    """Parse every camera's source string now, without opening it: a typo is an error at start.

    A missing file or folder, an unknown URL scheme, an unknown ``synthetic:`` option or a bad
    value raise :class:`SourceError` naming the camera; a network camera that is merely
    unreachable is not checked here (the reader keeps retrying it).
    """
    from dfm_stream.sources import SourceOptions, make_source

    for cam in cameras:
        try:
            source = make_source(
                cam.source, SourceOptions(cam.loop, cam.fps, cam.open_timeout, cam.read_timeout)
            )
            if cam.roi is not None and not source.is_live:
                _check_roi(cam.id, cam.roi, source)
        except SourceError as e:
            raise SourceError(f"camera {cam.id}: {e}") from e


def _check_roi(camera: str, roi: tuple[int, int, int, int], source: Any) -> None:
    """Read one frame of a file, folder or synthetic source and refuse a ``roi`` beyond it.

    Live cameras are checked on their first frame instead (the reader logs and drops frames
    whose roi does not fit): opening them here could wait for the network.
    """
    from dfm_stream.reader import roi_problem
    from dfm_stream.sources import SourceFinished

    try:
        with source:
            frame = source.read()
    except SourceFinished:
        return
    problem = roi_problem(roi, frame.image.shape[1], frame.image.shape[0])
    if problem:
        raise ConfigError(f"camera {camera}: {problem}")


def run(args: argparse.Namespace) -> int:
    """Run the reader until stopped, ``--duration`` passes, or every finite camera is done.

    The SIGTERM/SIGINT handlers are installed first, so a signal during start-up (importing
    OpenCV, checking the sources) ends the process with 0 too.
    """
    with stop_on_signals(threading.Event(), "releasing cameras") as stop:
        return _run(args, stop)


def _run(args: argparse.Namespace, stop: threading.Event) -> int:
    from dfm_stream.connect import connect, settings_with_config
    from dfm_stream.metrics import ReaderMetrics, new_registry, serve_for
    from dfm_stream.reader import Reader

    cameras, config = select_cameras(args)
    check_sources(cameras)
    settings = settings_with_config(args, config.redis)
    if stop.is_set():
        return 0
    client = connect(settings, socket_timeout=2.0, socket_connect_timeout=2.0)
    registry = new_registry()
    metrics = ReaderMetrics.create(registry)
    reader = Reader(
        cameras, client, settings.prefix, metrics, stop, args.max_frames, durability=settings.durability
    )
    server = None
    if args.metrics_port >= 0:
        server = serve_for("reader", registry, args.metrics_host, args.metrics_port, ready=reader.ready)
    time_up = threading.Event()

    def _time_up() -> None:
        time_up.set()
        stop.set()

    timer = threading.Timer(args.duration, _time_up) if args.duration else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    log.info(
        "reading %d camera(s) into %s: %s",
        len(cameras),
        settings.safe_url(),
        ", ".join(c.id for c in cameras),
    )
    try:
        reader.start()
        reader.wait()
        signalled = stop.is_set() and not time_up.is_set()
        reader.close()
    finally:
        if timer is not None:
            timer.cancel()
        if server is not None:
            server.close()
        client.close()
    return _verdict(reader.problems(), signalled)


def _verdict(problems: list[str], signalled: bool) -> int:
    """Return 0, or raise :class:`NoFramesError` when a camera sent nothing to Redis in this run.

    A run stopped by SIGTERM/SIGINT exits 0 whatever happened (the stop was asked for); the
    problems are logged as a warning then.
    """
    if not problems:
        return 0
    text = "; ".join(problems)
    if signalled:
        log.warning("stopped by a signal, and nothing reached Redis from: %s", text)
        return 0
    raise NoFramesError(text)

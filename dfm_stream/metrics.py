"""Prometheus metrics of readers and workers, and the HTTP endpoint that serves them.

Metrics are registered on a :class:`~prometheus_client.CollectorRegistry` that the caller passes
in (never the global one at import time), so tests and several loops in one process do not
collide. :func:`serve` exposes ``/metrics``, ``/healthz`` (the process is alive) and ``/readyz``
(Redis reachable, model loaded, cameras open: whatever check the process hands in).

The names are a contract: the Grafana dashboard and the alert rules in ``deploy/`` use them.
"""

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

from dfm_stream.commands.argtypes import port
from dfm_stream.errors import PortInUseError

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1,
    1.5,
    2,
    3,
    5,
    7.5,
    10,
)
"""End-to-end latency buckets: resolve 5 ms to 10 s."""
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SCORE_RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 3, 5, 10)
"""Anomaly score divided by the model's threshold: 1.0 is the alarm line."""

READER_DROP_REASONS = ("decimated", "overrun", "redis_unavailable", "encode_error", "unreplicated")
WORKER_DROP_REASONS = ("trimmed", "stale")
DEADLETTER_REASONS = (
    "bad_msgpack",
    "bad_message",
    "unsupported_version",
    "too_large",
    "shape_mismatch",
    "decode_error",
    "oversized",
    "max_deliveries",
)
ALARM_STATES = ("raised", "cleared")
"""Known values of the ``reason``/``state`` labels; their series exist at 0 from a camera's start."""

ReadyCheck = Callable[[], tuple[bool, str]]


def new_registry(process_metrics: bool = True) -> CollectorRegistry:
    """Return a fresh registry, with the standard process/platform/GC collectors when asked."""
    registry = CollectorRegistry()
    if process_metrics:
        process_collector.ProcessCollector(registry=registry)
        platform_collector.PlatformCollector(registry=registry)
        gc_collector.GCCollector(registry=registry)
    return registry


@dataclass(frozen=True, kw_only=True)
class ReaderMetrics:
    """What a reader process reports, per camera."""

    frames_captured: Counter
    frames_published: Counter
    frames_dropped: Counter
    camera_up: Gauge
    reconnects: Counter
    capture_fps: Gauge
    encode_seconds: Histogram
    published_bytes: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> "ReaderMetrics":
        """Register the reader metrics on ``registry``."""
        cam = ["camera"]
        return cls(
            frames_captured=Counter(
                "dfm_reader_frames_captured", "Frames read from the camera.", cam, registry=registry
            ),
            frames_published=Counter(
                "dfm_reader_frames_published", "Frames written to Redis.", cam, registry=registry
            ),
            frames_dropped=Counter(
                "dfm_reader_frames_dropped",
                "Frames not published, by reason (decimated, overrun, redis_unavailable, encode_error,"
                " unreplicated).",
                ["camera", "reason"],
                registry=registry,
            ),
            camera_up=Gauge(
                "dfm_camera_up", "1 while the camera delivers frames, else 0.", cam, registry=registry
            ),
            reconnects=Counter(
                "dfm_reader_reconnects", "Camera (re)connection attempts.", cam, registry=registry
            ),
            capture_fps=Gauge(
                "dfm_reader_capture_fps", "Frames per second read from the camera.", cam, registry=registry
            ),
            encode_seconds=Histogram(
                "dfm_reader_encode_seconds",
                "Time to encode one frame.",
                cam,
                buckets=FAST_BUCKETS,
                registry=registry,
            ),
            published_bytes=Counter(
                "dfm_reader_published_frame_bytes", "Bytes of frame messages written.", cam, registry=registry
            ),
        )

    def init_camera(self, camera: str) -> None:
        """Create the camera's series at 0, so ``rate()``/``increase()`` also see its first event."""
        for counter in (self.frames_captured, self.frames_published, self.reconnects, self.published_bytes):
            counter.labels(camera)
        for reason in READER_DROP_REASONS:
            self.frames_dropped.labels(camera, reason)
        self.camera_up.labels(camera).set(0)


@dataclass(frozen=True, kw_only=True)
class DriftMetrics:
    """How far each camera's recent frames are from its model's reference (:mod:`dfm_stream.drift`).

    NaN while a figure is not available (no reference in the artifact, too few frames yet), so an
    alert rule comparing it with a line stays silent.
    """

    score_psi: Gauge
    score_quantile_ratio: Gauge
    image_psi: Gauge
    window_frames: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> "DriftMetrics":
        """Register the drift metrics on ``registry``."""
        r, cam = registry, ["camera"]
        return cls(
            score_psi=Gauge(
                "dfm_drift_score_psi",
                "Population stability index of the last frames' scores against the calibration's good "
                "scores (alert line 0.25).",
                cam,
                registry=r,
            ),
            score_quantile_ratio=Gauge(
                "dfm_drift_score_quantile_ratio",
                "(p95 of the last frames' scores - reference p50) / (reference p95 - reference p50): "
                "1 as at calibration (alert line 2).",
                cam,
                registry=r,
            ),
            image_psi=Gauge(
                "dfm_drift_image_psi",
                "Population stability index of an image statistic (brightness, contrast, sharpness) of "
                "the last frames against the training frames (alert line 0.25).",
                ["camera", "stat"],
                registry=r,
            ),
            window_frames=Gauge(
                "dfm_drift_window_frames",
                "Frames in the camera's drift window (figures need 100).",
                cam,
                registry=r,
            ),
        )


@dataclass(frozen=True, kw_only=True)
class WorkerMetrics:
    """What a worker process reports."""

    frames_scored: Counter
    batch_size: Histogram
    inference_seconds: Histogram
    decode_seconds: Histogram
    queue_wait_seconds: Histogram
    e2e_latency_seconds: Histogram
    stream_lag: Gauge
    stream_pending: Gauge
    frames_dropped: Counter
    deadlettered: Counter
    redelivered: Counter
    alarms: Counter
    alarm_active: Gauge
    score_ratio: Histogram
    model_info: Gauge
    model_load_failures: Counter
    device_info: Gauge
    gpu_memory_bytes: Gauge
    loop_errors: Counter
    duplicates: Counter
    events_recovered: Counter
    seq_anomalies: Counter
    drift: "DriftMetrics"

    def init_camera(self, camera: str) -> None:
        """Create the camera's event series at 0, so ``rate()``/``increase()`` also see the first event."""
        for reason in WORKER_DROP_REASONS:
            self.frames_dropped.labels(camera, reason)
        for reason in DEADLETTER_REASONS:
            self.deadlettered.labels(camera, reason)
        for state in ALARM_STATES:
            self.alarms.labels(camera, state)
        self.redelivered.labels(camera)
        self.duplicates.labels(camera)
        self.events_recovered.labels(camera)
        self.seq_anomalies.labels(camera)
        self.alarm_active.labels(camera)

    @classmethod
    def create(cls, registry: CollectorRegistry) -> "WorkerMetrics":
        """Register the worker metrics on ``registry``."""
        r = registry
        return cls(
            frames_scored=Counter(
                "dfm_worker_frames_scored", "Frames scored and published.", ["camera", "model"], registry=r
            ),
            batch_size=Histogram(
                "dfm_worker_batch_size",
                "Frames per model batch.",
                ["model"],
                buckets=BATCH_BUCKETS,
                registry=r,
            ),
            inference_seconds=Histogram(
                "dfm_worker_inference_seconds",
                "Model time per batch.",
                ["model"],
                buckets=FAST_BUCKETS,
                registry=r,
            ),
            decode_seconds=Histogram(
                "dfm_worker_decode_seconds",
                "Decode + pre-process time per batch.",
                buckets=FAST_BUCKETS,
                registry=r,
            ),
            queue_wait_seconds=Histogram(
                "dfm_worker_queue_wait_seconds",
                "Time from the frame's stream entry to the start of its batch.",
                ["camera"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            e2e_latency_seconds=Histogram(
                "dfm_worker_e2e_latency_seconds",
                "Capture to score published.",
                ["camera"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            stream_lag=Gauge(
                "dfm_stream_lag",
                "Frames in the stream not yet delivered to the group.",
                ["camera"],
                registry=r,
            ),
            stream_pending=Gauge(
                "dfm_stream_pending", "Frames delivered but not yet acknowledged.", ["camera"], registry=r
            ),
            frames_dropped=Counter(
                "dfm_worker_frames_dropped",
                "Frames not scored, by reason (trimmed, stale).",
                ["camera", "reason"],
                registry=r,
            ),
            deadlettered=Counter(
                "dfm_worker_deadlettered",
                "Frames sent to the dead-letter stream.",
                ["camera", "reason"],
                registry=r,
            ),
            redelivered=Counter(
                "dfm_worker_redelivered",
                "Frames claimed from a dead or slow consumer.",
                ["camera"],
                registry=r,
            ),
            alarms=Counter(
                "dfm_alarms",
                "Alarm transitions, by state (raised, cleared).",
                ["camera", "state"],
                registry=r,
            ),
            alarm_active=Gauge(
                "dfm_alarm_active", "1 while the camera's alarm is raised.", ["camera"], registry=r
            ),
            score_ratio=Histogram(
                "dfm_worker_score_ratio",
                "Anomaly score / threshold per frame (1.0 is the alarm line).",
                ["camera"],
                buckets=SCORE_RATIO_BUCKETS,
                registry=r,
            ),
            model_info=Gauge(
                "dfm_model_info",
                "1 for the model each camera is scored with.",
                ["camera", "model", "version", "backbone"],
                registry=r,
            ),
            model_load_failures=Counter(
                "dfm_worker_model_load_failures", "Model versions that failed to load.", ["model"], registry=r
            ),
            device_info=Gauge(
                "dfm_worker_device_info",
                "1 for the device, backbone precision and backbone backend the worker runs the model with.",
                ["device", "precision", "backend"],
                registry=r,
            ),
            gpu_memory_bytes=Gauge(
                "dfm_worker_gpu_memory_bytes", "GPU memory allocated by the worker.", registry=r
            ),
            loop_errors=Counter(
                "dfm_worker_loop_errors",
                "Unexpected errors caught by the worker loop.",
                ["where"],
                registry=r,
            ),
            duplicates=Counter(
                "dfm_worker_duplicates_suppressed",
                "Scores not published because the frame was already acknowledged (reclaimed elsewhere).",
                ["camera"],
                registry=r,
            ),
            events_recovered=Counter(
                "dfm_worker_alarm_events_recovered",
                "Alarm events delivered from a camera's outbox after their worker died or gave up.",
                ["camera"],
                registry=r,
            ),
            seq_anomalies=Counter(
                "dfm_worker_seq_anomalies",
                "Frames whose seq broke the camera's sequence (backwards, out of range, an impossible "
                "jump): not counted as trimmed.",
                ["camera"],
                registry=r,
            ),
            drift=DriftMetrics.create(r),
        )


class _Handler(BaseHTTPRequestHandler):
    server: "_MetricsServer"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b'{"status": "alive"}\n', "application/json")
        elif path == "/readyz":
            ok, detail = self._ready()
            body = json.dumps({"ready": ok, "detail": detail}).encode() + b"\n"
            self._send(200 if ok else 503, body, "application/json")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

    def _ready(self) -> tuple[bool, str]:
        try:
            return self.server.ready()
        except Exception as e:  # a readiness probe must answer, whatever the check does
            log.warning("readiness check failed: %s", e)
            return False, f"readiness check failed: {e}"

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http: " + format, *args)


class _MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], registry: CollectorRegistry, ready: ReadyCheck) -> None:
        super().__init__(addr, _Handler)
        self.registry = registry
        self.ready = ready


class MetricsServer:
    """A running ``/metrics`` + ``/healthz`` + ``/readyz`` endpoint; ``close()`` stops it."""

    def __init__(self, server: _MetricsServer) -> None:
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="metrics-http", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        """Return the port actually bound (useful with port 0)."""
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()


def serve(
    registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0, ready: ReadyCheck | None = None
) -> MetricsServer:
    """Serve ``registry`` over HTTP on ``host:port`` (port 0 picks a free one) in a daemon thread."""
    check = ready or (lambda: (True, "ok"))
    server = MetricsServer(_MetricsServer((host, port), registry, check))
    log.info("metrics on http://%s:%d/metrics (health: /healthz, /readyz)", host, server.port)
    return server


def serve_for(
    role: str, registry: CollectorRegistry, host: str, port: int, ready: ReadyCheck | None = None
) -> MetricsServer:
    """Like :func:`serve`, for a command: a port that cannot be bound is a :class:`PortInUseError`.

    ``role`` (``reader``, ``worker``) goes into the message, which says what to do: two readers on
    one host with the default port is the usual cause.
    """
    try:
        return serve(registry, host, port, ready=ready)
    except OSError as e:
        raise PortInUseError(
            f"cannot serve the {role}'s metrics on {host}:{port} ({e.strerror or e}; another {role}"
            " on this host?): give each process its own --metrics-port (or DFM_METRICS_PORT), 0 for a"
            " free port, or -1 for none"
        ) from e


def add_metrics_args(parser: "object", default_port: int) -> None:
    """Add ``--metrics-host`` / ``--metrics-port`` (env ``DFM_METRICS_HOST``/``DFM_METRICS_PORT``)."""
    g = parser.add_argument_group("metrics")  # type: ignore[attr-defined]
    g.add_argument(
        "--metrics-host",
        default=os.environ.get("DFM_METRICS_HOST", "127.0.0.1"),
        help="address of /metrics, /healthz, /readyz (env DFM_METRICS_HOST; default %(default)s;"
        " 0.0.0.0 in containers)",
    )
    g.add_argument(
        "--metrics-port",
        type=port,
        default=os.environ.get("DFM_METRICS_PORT", str(default_port)),
        help="port of /metrics, /healthz, /readyz (env DFM_METRICS_PORT; default %(default)s;"
        " 0 picks a free port, -1 disables)",
    )

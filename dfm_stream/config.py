"""The TOML config of a deployment: typed, strict, with environment overrides.

Every field has a description (``metadata["help"]``) and a default that works. Unknown keys are an
error that names the key and the file. Example (every key optional except a camera's ``id`` and
``source``)::

    [redis]
    url = "redis://127.0.0.1:6379/0"
    prefix = "dfm"

    [reader]                # defaults for every camera
    fps = 10
    size = "256x256"
    jpeg_quality = 90

    [[cameras]]
    id = "line1"
    source = "rtsp://user:pass@10.0.0.5:554/stream1"
    roi = [100, 50, 640, 480]
    model = "bolts@3"

    [[cameras]]
    id = "demo"
    source = "synthetic:seed=3,defect_rate=0.1"

    [worker]
    batch_size = 16
    device = "auto"

    [alarms]
    k = 2
    n = 3

    [console]
    port = 8080
    users = "/etc/dfm-stream/console-users.json"

Environment variables override the file: ``DFM_REDIS_URL``, ``DFM_PREFIX``, ``DFM_REDIS_CLUSTER``
and, for any field, ``DFM__<SECTION>__<KEY>`` (``DFM__WORKER__BATCH_SIZE=16``) or
``DFM__CAMERAS__<ID>__<KEY>`` (``DFM__CAMERAS__LINE1__SOURCE=rtsp://...``; the id matches
case-insensitively, with ``-`` and ``.`` written as ``_``).
"""

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfm_stream.batcher import DEFAULT_BATCH_SIZE, DEFAULT_MAX_WAIT_MS
from dfm_stream.errors import ConfigError
from dfm_stream.keys import DEFAULT_GROUP, DEFAULT_PREFIX, DEFAULT_SCORES_MAXLEN, check_name
from dfm_stream.liveness import DEFAULT_MAX_CAMERAS
from dfm_stream.redact import safe_url
from dfm_stream.wire import DEFAULT_MAX_PIXELS

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
ENV_PREFIX = "DFM__"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _f(default: Any, help: str, kind: str = "", *, flag: str = "", choices: tuple[str, ...] = ()) -> Any:
    """Define a setting once: its default, description, value kind, command-line flag and choices.

    ``flag`` is the option of the commands that expose the setting when it is not ``--`` + the key
    with ``-`` for ``_`` (:mod:`dfm_stream.commands.config_flags` builds the options from these).
    """
    meta = {"help": help, "kind": kind, "flag": flag, "choices": choices}
    return field(default=default, metadata=meta)


def parse_size(value: Any) -> tuple[int, int] | None:
    """Parse ``"WxH"`` (or ``[W, H]``; ``""`` means keep the source's size) into ``(w, h)``."""
    if value in ("", None):
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
        if not m:
            raise ValueError(f"size {value!r} must be WxH, e.g. 256x256")
        value = (int(m.group(1)), int(m.group(2)))
    if not isinstance(value, list | tuple) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise ValueError(f"size {value!r} must be WxH, e.g. 256x256")
    w, h = int(value[0]), int(value[1])
    if not (8 <= w <= 8192 and 8 <= h <= 8192):
        raise ValueError(f"size {w}x{h} is out of range (8..8192 per side)")
    return w, h


def parse_roi(value: Any) -> tuple[int, int, int, int] | None:
    """Parse a region of interest ``[x, y, w, h]`` (or ``"x,y,w,h"``; ``""`` means none)."""
    if value in ("", None):
        return None
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",")]
        except ValueError as e:
            raise ValueError(f"roi {value!r} must be x,y,w,h in pixels, e.g. 0,0,640,480") from e
    if not isinstance(value, list | tuple) or len(value) != 4 or not all(_is_int(v) for v in value):
        raise ValueError(f"roi {value!r} must be [x, y, w, h] in pixels")
    x, y, w, h = (int(v) for v in value)
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise ValueError(f"roi {value!r}: x, y must be >= 0 and w, h > 0")
    return x, y, w, h


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, kw_only=True)
class RedisConfig:
    """``[redis]``: where the streams live."""

    url: str = _f(
        DEFAULT_REDIS_URL,
        "Redis URL: redis://[user:pass@]host:port/db, rediss:// (TLS), unix:///path.sock or"
        " redis+sentinel://[user:pass@]host1:26379,host2:26379/SERVICE/db (rediss+sentinel:// with TLS);"
        " env DFM_REDIS_URL. DFM_REDIS_USERNAME/DFM_REDIS_PASSWORD override the URL's",
        flag="--redis",
    )
    cluster: bool = _f(False, "treat the URL as one seed node of a Redis Cluster (env DFM_REDIS_CLUSTER=1)")
    prefix: str = _f(DEFAULT_PREFIX, "prefix of every Redis key (env DFM_PREFIX)")
    durability: str = _f(
        "local",
        "local: a write counts once the primary has it; replicated: once a replica confirmed it (WAIT 1),"
        " so a Sentinel or Cluster failover loses no accepted frame or score (env DFM_DURABILITY)",
        choices=("local", "replicated"),
    )

    def __post_init__(self) -> None:
        _check(
            self.durability in ("local", "replicated"),
            f"durability={self.durability!r} must be 'local' or 'replicated'",
        )
        _check(bool(self.url.strip()), "url must not be empty")

    def __repr__(self) -> str:
        return f"RedisConfig(url={safe_url(self.url)!r}, cluster={self.cluster}, prefix={self.prefix!r})"


@dataclass(frozen=True, kw_only=True)
class ReaderConfig:
    """``[reader]``: defaults for every camera (each ``[[cameras]]`` table may override them)."""

    fps: float = _f(0.0, "frame-rate cap (frames beyond it are decimated); 0 = the source's own rate")
    size: tuple[int, int] | None = _f(None, "resize published frames to WxH; empty = keep", "size")
    jpeg_quality: int = _f(90, "JPEG quality 1-100 (encoding = jpeg)")
    encoding: str = _f("jpeg", "frame encoding: jpeg or raw (uncompressed BGR)", choices=("jpeg", "raw"))
    maxlen: int = _f(0, "approximate MAXLEN of the frame stream; 0 = about 10 s of frames, >= 50")
    backoff_initial: float = _f(0.5, "first reconnect delay in seconds (doubles per failure, with jitter)")
    backoff_max: float = _f(30.0, "longest reconnect delay in seconds")
    open_timeout: float = _f(10.0, "seconds a camera may take to open before it counts as down")
    read_timeout: float = _f(5.0, "seconds without a frame before a camera counts as frozen (down)")
    pace: bool = _f(
        True, "pace files, folders and synthetic sources in real time (false: as fast as possible)"
    )

    def __post_init__(self) -> None:
        _check(1 <= self.jpeg_quality <= 100, f"jpeg_quality={self.jpeg_quality} must be within 1..100")
        _check(self.encoding in ("jpeg", "raw"), f"encoding={self.encoding!r} must be 'jpeg' or 'raw'")
        _check(math.isfinite(self.fps) and self.fps >= 0, f"fps={self.fps} must be >= 0")
        _check(self.maxlen >= 0, f"maxlen={self.maxlen} must be >= 0 (0 = automatic)")
        _check(self.backoff_initial > 0, f"backoff_initial={self.backoff_initial} must be > 0")
        _check(
            self.backoff_max >= self.backoff_initial,
            f"backoff_max={self.backoff_max} must be >= backoff_initial={self.backoff_initial}",
        )
        _check(self.open_timeout > 0 and self.read_timeout > 0, "open_timeout and read_timeout must be > 0")


@dataclass(frozen=True, kw_only=True)
class CameraConfig(ReaderConfig):
    """``[[cameras]]``: one camera; unset fields come from ``[reader]``."""

    id: str = _f("", "camera id: 1-64 letters, digits, '_', '.', '-' (part of the Redis keys)")
    source: str = _f("", "0 (USB index), rtsp:// / http(s):// URL, video file, image folder or synthetic:")
    roi: tuple[int, int, int, int] | None = _f(
        None, "crop [x, y, w, h] in source pixels, before resize", "roi"
    )
    loop: bool = _f(False, "rewind video files and image folders at the end")
    model: str = _f("", "model for this camera: NAME[@VERSION] in the registry, or an artifact path")

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            check_name(self.id, "camera")
        except ValueError as e:
            raise ConfigError(str(e)) from e
        _check(bool(self.source.strip()), f"camera {self.id}: 'source' is required")

    def __repr__(self) -> str:
        return f"CameraConfig(id={self.id!r}, source={safe_url(self.source)!r}, model={self.model!r})"

    def auto_maxlen(self, rate: float) -> int:
        """Return ``maxlen``, or when it is 0, about 10 s of frames at ``rate`` fps (at least 50)."""
        if self.maxlen > 0:
            return self.maxlen
        return max(50, math.ceil(10 * (rate if rate > 0 else 30.0)))


WORKER_PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
"""Backbone precisions (:data:`dfm_stream.inference.PRECISIONS`, spelled out: no torch import here)."""
WORKER_BACKENDS = ("auto", "eager", "channels_last", "fused", "mkldnn", "compile", "onnxruntime", "openvino")
"""``auto`` and every :data:`dfm_stream.backends.BACKENDS` name (spelled out for the same reason)."""


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """``[worker]``: how workers consume frames."""

    group: str = _f(DEFAULT_GROUP, "consumer group shared by the workers of one deployment")
    batch_size: int = _f(DEFAULT_BATCH_SIZE, "largest model batch")
    max_wait_ms: float = _f(DEFAULT_MAX_WAIT_MS, "longest wait after a batch's first frame before running it")
    device: str = _f("auto", "auto (CUDA if available), cpu, cuda, cuda:N")
    precision: str = _f(
        "auto",
        "backbone precision: auto (CPU: int8 where `dfm-stream quantize` validated it, else fp32; CUDA:"
        " bf16/fp16), fp32, fp16, bf16 (CPU: needs AVX512-BF16/AMX), int8 (CPU, ONNX Runtime)",
        choices=WORKER_PRECISIONS,
    )
    backend: str = _f(
        "auto",
        "backbone runtime: auto (the fastest installed: ONNX Runtime > OpenVINO > fused on the CPU;"
        " channels_last on CUDA) or one by name; all keep scores within 1e-3 of fp32 eager",
        choices=WORKER_BACKENDS,
    )
    threads: int = _f(0, "CPU threads of the model; 0 = automatic, at most the cgroup CPU quota")
    claim_idle_s: float = _f(
        30.0, "reclaim frames pending this long at a dead or stuck consumer (XCLAIM), s", flag="--claim-idle"
    )
    max_deliveries: int = _f(3, "deliveries after which a frame goes to the dead-letter stream")
    max_age_s: float = _f(0.0, "skip frames older than this at dequeue, s; 0 = never skip", flag="--max-age")
    model: str = _f("", "default model for cameras without one: NAME[@VERSION] or an artifact path")
    max_cameras: int = _f(
        DEFAULT_MAX_CAMERAS,
        "most cameras followed by discovery (readers with a live heartbeat; no --cameras or config cameras);"
        " the rest are refused",
    )
    scores_maxlen: int = _f(DEFAULT_SCORES_MAXLEN, "approximate MAXLEN of each camera's score stream, >= 100")
    max_pixels: int = _f(DEFAULT_MAX_PIXELS, "largest frame accepted, in pixels (w*h)")
    max_frame_bytes: int = _f(
        0, "larger frame messages are dead-lettered as oversized; 0 = 3 * max_pixels + 1 MiB"
    )

    decode_at_model_size: bool = _f(
        False,
        "decode a JPEG frame larger than the model's input at 1/2, 1/4 or 1/8 scale (libjpeg's DCT"
        " scaling; faster, but scores move by up to a few % against a full decode: see the README)",
    )

    def __post_init__(self) -> None:
        _check(
            self.scores_maxlen >= 100,
            f"scores_maxlen={self.scores_maxlen} must be >= 100 (the score"
            " stream would throw scores away before anyone reads them)",
        )
        _check(self.max_pixels >= 1, f"max_pixels={self.max_pixels} must be >= 1")
        _check(
            self.max_frame_bytes >= 0, f"max_frame_bytes={self.max_frame_bytes} must be >= 0 (0 = automatic)"
        )
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _check(self.max_wait_ms >= 0, f"max_wait_ms={self.max_wait_ms} must be >= 0")
        _check(self.claim_idle_s > 0, f"claim_idle_s={self.claim_idle_s} must be > 0")
        _check(self.max_deliveries >= 1, f"max_deliveries={self.max_deliveries} must be >= 1")
        _check(self.max_age_s >= 0, f"max_age_s={self.max_age_s} must be >= 0 (0 = off)")
        _check(self.threads >= 0, f"threads={self.threads} must be >= 0 (0 = automatic)")
        _check(self.max_cameras >= 1, f"max_cameras={self.max_cameras} must be >= 1")
        _check(
            bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)),
            f"device={self.device!r} must be auto, cpu, cuda or cuda:N",
        )
        _check(
            self.precision in WORKER_PRECISIONS,
            f"precision={self.precision!r} must be one of {', '.join(WORKER_PRECISIONS)}",
        )
        _check(
            self.backend in WORKER_BACKENDS,
            f"backend={self.backend!r} must be one of {', '.join(WORKER_BACKENDS)}",
        )


@dataclass(frozen=True, kw_only=True)
class AlarmsConfig:
    """``[alarms]``: the per-camera alarm state machine."""

    k: int = _f(1, "raise when at least k of the last n scored frames are anomalous", flag="--alarm-k")
    n: int = _f(1, "window of the k-of-n rule", flag="--alarm-n")
    clear_after: int = _f(5, "clear after this many consecutive normal frames", flag="--alarm-clear-after")
    cooldown_s: float = _f(0.0, "after a clear, no new raise for this many seconds", flag="--alarm-cooldown")

    def __post_init__(self) -> None:
        _check(1 <= self.k <= self.n, f"k={self.k}, n={self.n}: need 1 <= k <= n")
        _check(self.clear_after >= 1, f"clear_after={self.clear_after} must be >= 1")
        _check(self.cooldown_s >= 0, f"cooldown_s={self.cooldown_s} must be >= 0")

    def script_args(self) -> list[int]:
        """Return ``[k, n, clear_after, cooldown_ms]`` as passed to the publish script."""
        return [self.k, self.n, self.clear_after, round(self.cooldown_s * 1000)]


@dataclass(frozen=True, kw_only=True)
class BridgeConfig:
    """``[bridge]``: what ``dfm-stream bridge`` delivers where (its command-line options win)."""

    cameras: str = _f("", "comma-separated camera ids; empty = every camera in dfm:cameras")
    group: str = _f("dfm-bridge", "consumer group of the bridges on dfm:alarms and the results")
    name: str = _f(
        "", "consumer name, stable across restarts, one per bridge of a pair; empty = bridge-<host>"
    )
    job_timeout_s: float = _f(
        10.0, "seconds a part job waits for frames before an error result", flag="--job-timeout"
    )
    mqtt: str = _f("", "MQTT broker URL, mqtt://[USER@]HOST[:PORT] or mqtts:// (TLS); empty = no MQTT")
    mqtt_prefix: str = _f("dfm", "MQTT topic prefix")
    mqtt_qos: int = _f(1, "QoS of events and results (0, 1, 2)")
    mqtt_protocol: str = _f("5", "MQTT version: 5 or 3.1.1", choices=("3.1.1", "5"))
    mqtt_client_id: str = _f("", "MQTT client id; empty = dfm-<consumer name>")
    mqtt_username: str = _f("", "MQTT user name (or in the URL)")
    mqtt_password_file: str = _f("", "file holding the MQTT password")
    mqtt_ca_file: str = _f("", "CA bundle for mqtts://")
    mqtt_cert_file: str = _f("", "client certificate for mqtts://")
    mqtt_key_file: str = _f("", "client key for mqtts://")
    mqtt_scores: bool = _f(False, "also publish per-frame scores")
    mqtt_scores_rate: float = _f(1.0, "per-frame scores per second and camera (with mqtt_scores)")
    modbus: str = _f("", "serve Modbus TCP on HOST:PORT (e.g. 0.0.0.0:502); registers: docs/modbus.md")
    modbus_cameras: str = _f("", "cameras of the Modbus register blocks, in order; empty = cameras")
    opcua: str = _f("", "serve OPC UA on this endpoint, e.g. opc.tcp://0.0.0.0:4840/dfm/; empty = no OPC UA")
    opcua_cameras: str = _f("", "cameras in the OPC UA address space; empty = cameras")
    opcua_users: str = _f("", "file of user:password lines for OPC UA (Basic256Sha256 Sign&Encrypt)")
    opcua_anonymous: bool = _f(False, "also allow anonymous, unencrypted OPC UA access")
    opcua_cert: str = _f("", "OPC UA server certificate (DER); empty = created in opcua_pki")
    opcua_key: str = _f("", "private key (PEM) of opcua_cert")
    opcua_pki: str = _f("opcua-pki", "where the created OPC UA server certificate is kept")

    def __post_init__(self) -> None:
        _check(self.mqtt_qos in (0, 1, 2), f"mqtt_qos={self.mqtt_qos} must be 0, 1 or 2")
        _check(self.job_timeout_s > 0, f"job_timeout_s={self.job_timeout_s} must be > 0")
        _check(self.mqtt_scores_rate > 0, f"mqtt_scores_rate={self.mqtt_scores_rate} must be > 0")
        _check(
            self.mqtt_protocol in ("3.1.1", "5"), f"mqtt_protocol={self.mqtt_protocol!r} must be 5 or 3.1.1"
        )


@dataclass(frozen=True, kw_only=True)
class ConsoleConfig:
    """``[console]``: the operator console (``dfm-stream console``); its flags override these."""

    host: str = _f("127.0.0.1", "address the console listens on (keep 127.0.0.1 unless behind a proxy)")
    port: int = _f(8080, "TCP port of the console (0: a free one)")
    users: str = _f("", "users file written by `dfm-stream console add-user`; empty = read-only console")
    secret_file: str = _f("", "file holding the cookie signing key; empty = env DFM_CONSOLE_SECRET or random")
    secure_cookies: bool = _f(False, "send the session cookie over HTTPS only (behind a TLS proxy)")

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, f"port={self.port} must be within 0..65535")
        _check(bool(self.host.strip()), "host must not be empty")


@dataclass(frozen=True)
class Config:
    """A whole config file, after environment overrides."""

    redis: RedisConfig = field(default_factory=RedisConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    cameras: tuple[CameraConfig, ...] = ()
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    alarms: AlarmsConfig = field(default_factory=AlarmsConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    path: Path | None = None

    def camera(self, camera_id: str) -> CameraConfig:
        """Return the camera with this id; raise ConfigError naming the known ids."""
        for cam in self.cameras:
            if cam.id == camera_id:
                return cam
        known = ", ".join(c.id for c in self.cameras) or "none"
        raise ConfigError(f"camera {camera_id!r} is not in {self.path or 'the config'} (cameras: {known})")


SECTIONS: dict[str, type] = {
    "redis": RedisConfig,
    "reader": ReaderConfig,
    "worker": WorkerConfig,
    "alarms": AlarmsConfig,
    "bridge": BridgeConfig,
    "console": ConsoleConfig,
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def field_help(cls: type) -> dict[str, str]:
    """Return ``{field name: description}`` of a config section dataclass."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def field_kind(f: dataclasses.Field) -> str:
    """Return a field's value kind: ``bool``, ``int``, ``float``, ``str``, ``size`` or ``roi``."""
    return str(f.metadata.get("kind") or f.default.__class__.__name__)


def _convert(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Convert a TOML value (or an env string) to the field's type; raise ConfigError naming ``where``."""
    kind = field_kind(f)
    try:
        if kind in _PARSERS:
            return _PARSERS[kind](value)
        if isinstance(value, _EnvValue):
            return _from_string(str(value), kind)
        if _TOML_TYPES[kind](value):
            return float(value) if kind == "float" else value
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e
    raise ConfigError(
        f"{where}: expected {_KIND_NAMES.get(kind, kind)}, got {type(value).__name__} {value!r}"
    )


_PARSERS = {"size": parse_size, "roi": parse_roi}
_TOML_TYPES = {
    "bool": lambda v: isinstance(v, bool),
    "int": _is_int,
    "float": lambda v: _is_int(v) or isinstance(v, float),
    "str": lambda v: isinstance(v, str),
}
_KIND_NAMES = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


class _EnvValue(str):
    """A string that came from an environment variable (converted from text, not TOML types)."""

    origin: str = "environment"


def _env(text: str, var: str) -> _EnvValue:
    value = _EnvValue(text)
    value.origin = f"environment variable {var}"
    return value


def _from_string(text: str, kind: str) -> Any:
    if kind == "bool":
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise ValueError(f"{text!r} is not a boolean (use true/false, 1/0, yes/no)")
    if kind == "int":
        return int(text.strip())
    if kind == "float":
        value = float(text.strip())
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a finite number")
        return value
    return text


def _build(cls: type, table: Mapping[str, Any], where: str, base: Mapping[str, Any] | None = None) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(base or {})
    for key, value in table.items():
        via = f" (set by {value.origin})" if isinstance(value, _EnvValue) else ""
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}{via} (known keys: {', '.join(sorted(fields))})")
        what = f"{value.origin} ({where}.{key})" if via else f"{where}.{key}"
        values[key] = _convert(fields[key], value, what)
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def settings_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Return the config of ``path`` (``--config``), or without one the defaults; environment applied.

    This is what a command's flags are laid over (flag > environment > file > default), so the
    ``DFM__<SECTION>__<KEY>`` variables work with and without a config file.
    """
    if path:
        return load_config(path, env)
    return config_from_dict({}, "environment", os.environ if env is None else env)


def with_environment(section: Any, name: str, env: Mapping[str, str] | None = None) -> Any:
    """Return the section ``[name]`` with the environment's overrides applied on top of it.

    For a section built in code (a library caller's ``RedisConfig(...)``); one that came from
    :func:`settings_config` has them already, and applying them again changes nothing.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    own = {var: value for var, value in env.items() if not var.startswith(f"{ENV_PREFIX}CAMERAS__")}
    _apply_env(data, [], own, "environment")
    return _build(type(section), data.get(name, {}), f"environment [{name}]", dataclasses.asdict(section))


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML config file, then apply environment overrides (``os.environ``)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    return config_from_dict(data, str(path), os.environ if env is None else env, path)


def config_from_dict(
    data: Mapping[str, Any],
    origin: str = "config",
    env: Mapping[str, str] | None = None,
    path: Path | None = None,
) -> Config:
    """Validate an already-parsed config (``origin`` names it in errors) and apply ``env`` overrides."""
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for key in data:
        if key not in (*SECTIONS, "cameras"):
            raise ConfigError(
                f"{origin}: unknown key {key!r} (known: [redis], [reader], [[cameras]], [worker], [alarms],"
                " [bridge], [console])"
            )
    cams = data.get("cameras", [])
    if not isinstance(cams, list):
        raise ConfigError(f"{origin}: 'cameras' must be an array of tables ([[cameras]])")
    cams = [dict(c) if isinstance(c, Mapping) else c for c in cams]
    _apply_env(data, cams, env or {}, origin)
    sections = {name: _build(cls, data.get(name, {}), f"{origin} [{name}]") for name, cls in SECTIONS.items()}
    reader_defaults = dataclasses.asdict(sections["reader"])
    cameras = []
    for i, cam in enumerate(cams):
        label = cam.get("id") if isinstance(cam, Mapping) else None
        where = f"{origin} [[cameras]] #{i + 1}" + (f" ({label})" if isinstance(label, str) else "")
        cameras.append(_build(CameraConfig, cam, where, reader_defaults))
    ids = [c.id for c in cameras]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    _check(not dupes, f"{origin}: camera ids must be unique; repeated: {', '.join(dupes)}")
    return Config(cameras=tuple(cameras), path=path, **sections)


def _apply_env(data: dict[str, Any], cams: list[Any], env: Mapping[str, str], origin: str) -> None:
    shortcuts = {"DFM_REDIS_URL": ("redis", "url"), "DFM_PREFIX": ("redis", "prefix")}
    shortcuts["DFM_REDIS_CLUSTER"] = ("redis", "cluster")
    shortcuts["DFM_DURABILITY"] = ("redis", "durability")
    for var, (section, key) in shortcuts.items():
        if env.get(var):  # set and not empty
            data.setdefault(section, {})[key] = _env(env[var], var)
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX):
            continue
        parts = var[len(ENV_PREFIX) :].split("__")
        section = parts[0].lower()
        if section == "cameras" and len(parts) == 3:
            cam = _find_camera(cams, parts[1], var, origin)
            cam[parts[2].lower()] = _env(env[var], var)
        elif section in SECTIONS and len(parts) == 2:
            key = parts[1].lower()
            if key not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
                raise ConfigError(f"environment variable {var}: [{section}] has no key {key!r}")
            data.setdefault(section, {})[key] = _env(env[var], var)
        else:
            raise ConfigError(
                f"environment variable {var} is not DFM__<SECTION>__<KEY> or DFM__CAMERAS__<ID>__<KEY>"
                f" (sections: {', '.join(SECTIONS)}, cameras)"
            )


def _find_camera(cams: list[Any], env_id: str, var: str, origin: str) -> dict[str, Any]:
    def norm(s: str) -> str:
        return s.upper().replace("-", "_").replace(".", "_")

    for cam in cams:
        if isinstance(cam, dict) and isinstance(cam.get("id"), str) and norm(cam["id"]) == norm(env_id):
            return cam
    known = ", ".join(str(c.get("id")) for c in cams if isinstance(c, dict)) or "none"
    raise ConfigError(f"environment variable {var}: no camera {env_id!r} in {origin} (cameras: {known})")

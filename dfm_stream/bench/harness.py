"""``dfm-stream bench``: how fast the model could go, and how close the service comes, in one run.

Stages (same device, backbone, image size and batch size throughout):

=========  ===================================================================================
backbone   bare feature extractor on pre-made tensors, as the worker runs it: the ceiling
dfm        features + PCA score through the worker's ``Engine.score``
backends   the backbone under each :mod:`~dfm_stream.backends` backend, scores checked vs fp32
pipeline   JPEG frames in Redis -> ``dfm-stream work`` -> scores, rate from the score stream
transport  the same frames through the worker's consumer/decoder/publisher with no model
latency    real-time paced frames at 50 % and 80 % of the pipeline's capacity: p50/p95/p99
isolation  paced frames at 50 % load, alone and beside a hostile camera: throughput, p99, errors
consoles   8 cameras x 10 fps, worker throughput alone and with 3 operator consoles open
fit        fitting on 1,000 generated 256x256 images in a fresh process: time and peak RSS
=========  ===================================================================================

Repeats are interleaved (repeat 1 of every stage, then repeat 2 ...), so slow drifts of a noisy
machine touch every stage alike; ratios are taken within each repeat, then summarised. The
result is a JSON document (:func:`run_bench`), shown by :mod:`dfm_stream.bench.report`.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfm_stream.backends import BACKENDS
from dfm_stream.bench.env import CpuWindow, LoadSampler, machine_info
from dfm_stream.bench.result import Runs, build_document
from dfm_stream.connect import DURABILITY_LEVELS
from dfm_stream.errors import ConfigError

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = (
    "backbone", "dfm", "backends", "pipeline", "transport", "latency", "isolation", "swap", "consoles",
    "fit",
)  # fmt: skip
DEFAULT_STAGES: tuple[str, ...] = ("backbone", "dfm", "pipeline", "transport", "latency")
STREAM_STAGES = frozenset({"pipeline", "transport", "latency", "isolation", "swap", "consoles"})
ISOLATION_LOAD = 0.5
"""Load (fraction of capacity) of the honest cameras in the isolation stage."""
SWAP_LOAD = 0.5
"""Load (fraction of capacity) of the camera whose model the swap stage switches."""


@dataclass
class BenchSettings:
    """Everything a bench run depends on (written into the JSON as ``settings``)."""

    device: str = "auto"
    backbone: str = "resnet50"
    layer: str = "layer3"
    image_size: int = 256
    batch_size: int = 8
    repeats: int = 3
    duration: float = 20.0
    stages: tuple[str, ...] = DEFAULT_STAGES
    backends: tuple[str, ...] = BACKENDS
    backend: str = "auto"
    precision: str = "auto"
    max_wait_ms: float = 20.0
    workers: int = 1
    cameras: int = 2
    loads: tuple[float, ...] = (0.5, 0.8)
    transport_frames: int = 10_000
    fit_images: int = 1000
    swaps: int = 24
    """Model switches per repeat of the swap stage (push, rollback, assign, assign, ...)."""
    fit_image_size: int = 256
    redis_url: str | None = None
    cluster: bool = False
    durability: str = "local"
    quick: bool = False
    workdir: str | None = None

    def check(self) -> None:
        """Raise :class:`ConfigError` for settings that cannot run."""
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ConfigError(f"--stages: unknown {unknown or 'none given'}; choose from {', '.join(STAGES)}")
        for name, value in (("batch-size", self.batch_size), ("repeats", self.repeats)):
            if value < 1:
                raise ConfigError(f"--{name} must be >= 1, got {value}")
        if self.duration <= 0 or self.image_size < 32 or self.workers < 1 or self.cameras < 1:
            raise ConfigError("--duration must be > 0, --image-size >= 32, --workers and --cameras >= 1")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ConfigError(f"--backends: unknown {unknown}; choose from {', '.join(BACKENDS)}")
        if self.durability not in DURABILITY_LEVELS:
            raise ConfigError(
                f"--durability must be one of {', '.join(DURABILITY_LEVELS)}, got {self.durability!r}"
            )
        if self.cluster and not self.redis_url:
            raise ConfigError("--cluster needs --redis (a seed node of the cluster to measure)")
        if any(not 0 < x < 1.5 for x in self.loads):
            raise ConfigError(f"--loads must be fractions of capacity in (0, 1.5), got {self.loads}")

    @classmethod
    def quick_defaults(cls) -> dict[str, Any]:
        """Tiny settings that prove the harness end to end in well under a minute (figures meaningless)."""
        return {
            "backbone": "resnet18",
            "layer": "layer2",
            "image_size": 64,
            "batch_size": 4,
            "repeats": 1,
            "duration": 0.5,
            "backends": ("eager", "channels_last", "fused", "mkldnn", "onnxruntime", "openvino"),
            "transport_frames": 200,
            "fit_images": 16,
            "swaps": 4,
            "fit_image_size": 64,
            "quick": True,
        }


def run_bench(settings: BenchSettings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the chosen stages and return the result document (see ``docs/scaling.md``)."""
    from torch import get_num_threads as torch_default_threads
    from torch import set_num_threads as torch_threads

    from dfm_stream.bench import model_stages
    from dfm_stream.cpus import model_threads
    from dfm_stream.inference import Engine

    settings.check()
    say = progress or (lambda text: log.info("%s", text))
    started = time.time()
    torch_threads(model_threads(torch_default_threads()))  # as `dfm-stream work`: stages match it
    machine = machine_info()
    engine = Engine(settings.device, settings.precision, settings.backend, batch_size=settings.batch_size)
    say(f"building the bench model ({settings.backbone}/{settings.layer}, {settings.image_size} px)")
    bench = model_stages.make_bench_model(
        settings.backbone, settings.layer, settings.image_size, settings.batch_size, engine.device
    )
    stages = model_stages.ModelStages(bench, engine)
    if "backends" in settings.stages:
        say(f"preparing backends {', '.join(settings.backends)} (export / compile)")
        stages.prepare_backends(list(settings.backends))
    runs = Runs()
    server_version = None
    run_window = CpuWindow()
    with LoadSampler() as sampler, _workdir(settings) as workdir:
        with _stream_setup(settings, bench, engine, workdir) as setup:
            server_version = setup.server_version if setup else None
            for rep in range(settings.repeats):
                _run_repeat(settings, stages, setup, runs, rep, say)
        if "fit" in settings.stages:
            for rep in range(settings.repeats):
                say(f"[{rep + 1}/{settings.repeats}] fit: {settings.fit_images} images")
                window = CpuWindow()
                result = model_stages.run_fit(
                    workdir, settings.fit_images, settings.fit_image_size, settings.batch_size,
                    settings.backbone, settings.layer, settings.device,
                )  # fmt: skip
                runs.add("fit_seconds", result["seconds"], result, foreign=window.foreign_cores())
    machine["load_average_1min_during_run"] = sampler.summary()
    machine["foreign_cpu_cores_during_run"] = run_window.foreign_cores()
    return build_document(settings, runs, stages, engine, server_version, started, machine)


def _run_repeat(
    settings: BenchSettings, stages: Any, setup: Any, runs: Runs, rep: int, say: Callable[[str], None]
) -> None:
    from dfm_stream.bench import stream_stages

    tag = f"[{rep + 1}/{settings.repeats}]"
    chosen = settings.stages
    pids = setup.pids if setup else []
    if "backbone" in chosen:
        window = CpuWindow(pids)
        rate = stages.backbone(settings.duration)
        runs.add("backbone", rate.rate, rate.as_dict(), foreign=window.foreign_cores())
        say(f"{tag} backbone: {runs.last('backbone'):.1f} img/s")
    if "dfm" in chosen:
        window = CpuWindow(pids)
        rate = stages.dfm(settings.duration)
        runs.add("dfm", rate.rate, rate.as_dict(), foreign=window.foreign_cores())
        say(f"{tag} dfm: {runs.last('dfm'):.1f} img/s")
    if "backends" in chosen:
        for name in stages.prepared_backends():
            window = CpuWindow(pids)
            rate = stages.backend_rate(name, settings.duration)
            runs.add(f"backend:{name}", rate.rate, rate.as_dict(), foreign=window.foreign_cores())
            say(f"{tag} backend {name}: {rate.rate:.1f} img/s (best call {rate.best_rate:.1f})")
    if "pipeline" in chosen:
        rate = runs.last("backbone", "dfm") or stages.dfm(min(settings.duration, 3.0)).rate
        n = _backlog_size(settings, rate)
        window = CpuWindow(pids)
        result = stream_stages.pipeline_run(setup.stream, rep, n, rate)
        runs.add("pipeline", result["rate"], result, foreign=window.foreign_cores())
        say(f"{tag} pipeline: {result['rate']:.1f} img/s ({n} frames)")
    if "transport" in chosen:
        window = CpuWindow(pids)
        result = stream_stages.transport_run(setup.stream, rep, settings.transport_frames)
        runs.add("transport", result["rate"], result, foreign=window.foreign_cores())
        say(f"{tag} transport: {result['rate']:.0f} frames/s")
    if "latency" in chosen:
        capacity = runs.last("pipeline", "dfm", "backbone") or stages.dfm(min(settings.duration, 3.0)).rate
        window = CpuWindow(pids)
        result = stream_stages.latency_run(
            setup.stream, rep, capacity, list(settings.loads), settings.duration
        )
        foreign = window.foreign_cores()
        for key, level in result.items():
            runs.add(f"latency{key}_p99_ms", level["p99_ms"] or 0.0, level, foreign=foreign)
            if level["inspect_p99_ms"] is not None:  # trigger -> result of part jobs (#17)
                runs.add(f"inspect{key}_p99_ms", level["inspect_p99_ms"], level, foreign=foreign)
            say(f"{tag} latency at {key}%: p50 {level['p50_ms']:.0f} ms, p99 {level['p99_ms']:.0f} ms")
    if "isolation" in chosen:
        _isolation(settings, stages, setup, runs, rep, say)
    if "swap" in chosen:
        _swap(settings, stages, setup, runs, rep, say)
    if "consoles" in chosen:
        _consoles(settings, setup, runs, rep, say)


def _swap(
    settings: BenchSettings, stages: Any, setup: Any, runs: Runs, rep: int, say: Callable[[str], None]
) -> None:
    from dfm_stream.bench.swap import swap_run

    capacity = runs.last("pipeline", "dfm", "backbone") or stages.dfm(min(settings.duration, 3.0)).rate
    window = CpuWindow(setup.pids)
    other = setup.other_backbone if rep == 0 else None  # its build is long: once is enough
    result = swap_run(setup.stream, rep, capacity, SWAP_LOAD, settings.swaps, other)
    foreign = window.foreign_cores()
    runs.add("swap_p99_s", result["p99_s"], result, foreign=foreign)
    if result["other_backbone_s"] is not None:
        runs.add("swap_other_backbone_s", result["other_backbone_s"], result, foreign=foreign)
    say(
        f"[{rep + 1}/{settings.repeats}] swap: registry command -> first frame of the new version"
        f" p50 {result['p50_s']:.2f} s, p99 {result['p99_s']:.2f} s over {result['switches']} switches"
        + (f"; other backbone {result['other_backbone_s']:.1f} s" if result["other_backbone_s"] else "")
    )


def _isolation(
    settings: BenchSettings, stages: Any, setup: Any, runs: Runs, rep: int, say: Callable[[str], None]
) -> None:
    from dfm_stream.bench.isolation import isolation_run

    capacity = runs.last("pipeline", "dfm", "backbone") or stages.dfm(min(settings.duration, 3.0)).rate
    window = CpuWindow(setup.pids)
    result = isolation_run(setup.stream, rep, capacity, ISOLATION_LOAD, settings.duration)
    foreign = window.foreign_cores()
    for key in ("throughput_ratio", "p99_ratio"):
        if result[key] is not None:
            runs.add(f"isolation_{key}", result[key], result, foreign=foreign)
    runs.add("isolation_probe_errors", float(result["hostile"]["probe_errors"]), result, foreign=foreign)
    hostile = result["hostile"]
    say(
        f"[{rep + 1}/{settings.repeats}] isolation: honest throughput x{result['throughput_ratio'] or 0:.3f}"
        f", p99 x{result['p99_ratio'] or 0:.3f} beside a hostile camera; "
        f"{hostile['probe_errors']} Redis errors in {hostile['probes']} probes"
    )


def _consoles(settings: BenchSettings, setup: Any, runs: Runs, rep: int, say: Callable[[str], None]) -> None:
    from dfm_stream.bench.console_load import consoles_run

    window = CpuWindow(setup.pids)
    result = consoles_run(setup.stream, rep, settings.duration)
    foreign = window.foreign_cores()
    alone, shared = result["alone"], result["with_consoles"]
    runs.add("consoles_worker_fps_alone", alone["worker_fps"], alone, foreign=foreign)
    runs.add("consoles_worker_fps_with", shared["worker_fps"], shared, foreign=foreign)
    if result["throughput_ratio"] is not None:
        runs.add("consoles_throughput_ratio", result["throughput_ratio"], result, foreign=foreign)
    redis_load = result["consoles_redis_commands_per_s"]
    runs.add("consoles_redis_commands_per_s", redis_load, result, foreign=foreign)
    runs.add("consoles_cpu_cores", shared["consoles_cpu_cores"], shared, foreign=foreign)
    say(
        f"[{rep + 1}/{settings.repeats}] consoles: worker {alone['worker_fps']:.1f} fps alone, "
        f"{shared['worker_fps']:.1f} fps with {result['consoles']} consoles "
        f"(x{result['throughput_ratio'] or 0:.3f}); consoles used {shared['consoles_cpu_cores']:.2f} cores "
        f"and {result['consoles_redis_commands_per_s']:.0f} Redis commands/s"
    )


def _backlog_size(settings: BenchSettings, rate: float) -> int:
    warm = 2 * settings.batch_size * settings.workers
    n = warm + round(rate * settings.duration)
    return max(n, warm + 4 * settings.batch_size * settings.workers)


@contextlib.contextmanager
def _workdir(settings: BenchSettings) -> Iterator[Path]:
    if settings.workdir:
        path = Path(settings.workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="dfm-bench-") as tmp:
        yield Path(tmp)


@dataclass
class _Setup:
    stream: Any
    server_version: str | None
    pids: list[int]
    other_backbone: bytes | None = None


@contextlib.contextmanager
def _stream_setup(settings: BenchSettings, bench: Any, engine: Any, workdir: Path) -> Iterator[_Setup | None]:
    if not STREAM_STAGES & set(settings.stages):
        yield None
        return
    from dfm_stream.artifact import ArtifactInfo, save_artifact
    from dfm_stream.bench.model_stages import synthetic_frames
    from dfm_stream.bench.stream_stages import StreamSetup, make_templates
    from dfm_stream.connect import RedisSettings, connect
    from dfm_stream.embedded_redis import EmbeddedRedis

    server = None if settings.redis_url else EmbeddedRedis().start()
    url = settings.redis_url or server.url  # type: ignore[union-attr]
    redis_settings = RedisSettings(url=url, cluster=settings.cluster, durability=settings.durability)
    client = connect(redis_settings)
    try:
        artifact = workdir / "bench-model.dfm"
        save_artifact(
            artifact, bench.model, ArtifactInfo.for_model(bench.model, bench.image_size, bench.n_train)
        )
        cameras = [f"bench{i}" for i in range(settings.cameras)]
        frames = synthetic_frames(16, settings.image_size, seed=11, defect_every=5)
        stream = StreamSetup(
            client=client,
            url=url,
            base_prefix=f"dfm-bench-{secrets.token_hex(4)}",
            cameras=cameras,
            templates=make_templates(frames, cameras),
            artifact=artifact,
            logdir=workdir / "logs",
            worker_args=worker_args(settings, engine.backend),
            workers=settings.workers,
            batch_size=settings.batch_size,
            durability=settings.durability,
        )
        pids = [server.proc.pid] if server is not None and server.proc is not None else []
        other = _other_backbone(bench) if "swap" in settings.stages else None
        yield _Setup(stream, server_version(client), pids, other)
    finally:
        client.close()
        if server is not None:
            server.close()


def server_version(client: Any) -> str | None:
    """Return the ``redis_version`` of the server (of one node of a cluster)."""
    info = client.info("server")
    if info and "redis_version" not in info:  # a cluster client: one INFO per node
        info = next(iter(info.values()))
    return str(info.get("redis_version")) if info else None


def _other_backbone(bench: Any) -> bytes:
    """Return the bench model with other backbone weights (one nudged tensor): it needs a build."""
    import copy

    import torch

    from dfm_stream.artifact import ArtifactInfo, artifact_to_bytes

    model = copy.deepcopy(bench.model).cpu()
    with torch.no_grad():
        next(model.feature_extractor.parameters()).mul_(1.0001)
    return artifact_to_bytes(model, ArtifactInfo.for_model(model, bench.image_size, bench.n_train))


def worker_args(settings: BenchSettings, backend: str) -> list[str]:
    """Return the ``dfm-stream work`` options the bench passes: the in-process stages' settings."""
    return [
        *("--batch-size", str(settings.batch_size), "--max-wait-ms", f"{settings.max_wait_ms:g}"),
        *("--device", settings.device, "--backend", backend, "--precision", settings.precision),
        *("--metrics-port", "0", "--durability", settings.durability),
        *(("--cluster",) if settings.cluster else ()),
    ]

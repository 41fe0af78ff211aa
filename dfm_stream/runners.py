"""Models ready to score, built once and kept while a camera (live or shadow) uses them.

A worker may hold several versions at once: the live model of each camera, the candidate it
scores in the shadow of the live one (:mod:`dfm_stream.shadow`), and a new version built beside
the old one before a switch (:class:`dfm_stream.routing.ModelRouter` builds it in its watch
thread, then switches at a batch boundary). Building is the slow part of a switch: a backbone
runner is an export, a compile and a warm-up (about 13 s for resnet50 on ONNX Runtime, 2 busy
cores). Versions whose backbones are the same (architecture, layer, weights fingerprint; the
input size and the engine's precision and backend key the runners of that backbone) share one
backbone module and so one runner: a version that only refits the PCA / Gaussian step costs a
load of its artifact (a few hundred milliseconds for resnet50), not a build.

Thread-safe: the watch thread pre-builds while the fetch thread resolves cameras.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from dfm_stream.artifact import FittedModel, load_artifact
from dfm_stream.inference import Engine, runner_count
from dfm_stream.model.backbone import weights_fingerprint

log = logging.getLogger(__name__)

SPARE_VERSIONS = 4
"""Versions kept after their cameras moved on, when they share a backbone with one in use.

They cost only their PCA / Gaussian buffers, and make a rollback or a re-assign need no load."""

ModelKey = tuple[str, ...]
"""``("file", sha256)`` for an artifact file, ``("registry", name, version)`` for a stored version."""


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to score: ``label`` is what score entries name (``name@version``).

    Compared and hashed by identity (the cache hands out one object per version): its metadata
    holds dicts (the drift reference), which a field-wise hash cannot take.
    """

    label: str
    name: str
    version: str
    fitted: FittedModel


@dataclass(frozen=True, kw_only=True)
class CacheMetrics:
    """What the cache reports: builds of backbone runners and of models."""

    backbone_builds: Counter
    model_builds: Counter
    build_seconds: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> CacheMetrics:
        """Register the cache metrics on ``registry``."""
        return cls(
            backbone_builds=Counter(
                "dfm_worker_backbone_builds",
                "Backbone runners built (export, compile, warm-up); versions sharing a backbone build one.",
                ["backbone"],
                registry=registry,
            ),
            model_builds=Counter(
                "dfm_worker_model_builds", "Model versions loaded and made ready to score.", registry=registry
            ),
            build_seconds=Histogram(
                "dfm_worker_model_build_seconds",
                "Time to make one model version ready (load, backbone lookup or build).",
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
                registry=registry,
            ),
        )


class RunnerCache:
    """Loaded models by :data:`ModelKey`; models with the same backbone share one built backbone."""

    def __init__(self, engine: Engine, metrics: CacheMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.backbone_builds = 0
        """Backbone runners built by this cache (the ``dfm_worker_backbone_builds`` counter too)."""
        self._models: dict[ModelKey, LoadedModel] = {}
        self._backbones: dict[tuple[str, str, str], Any] = {}
        self._lock = threading.RLock()

    def file(self, path: str) -> LoadedModel:
        """Return the model of the artifact file ``path`` (keyed by its content: an edit is a new model)."""
        data = Path(path).read_bytes()
        key = ("file", hashlib.sha256(data).hexdigest())
        with self._lock:
            if key not in self._models:
                fitted = self._build(lambda: load_artifact(data, device="cpu"))
                version = fitted.info.content_hash[:8]
                name = Path(path).stem or "model"
                self._models[key] = LoadedModel(f"{name}@{version}", name, version, fitted)
            return self._models[key]

    def stored(self, registry: Any, name: str, version: int) -> LoadedModel:
        """Return ``name@version`` from ``registry`` (a :class:`~dfm_stream.registry.ModelRegistry`)."""
        key = ("registry", name, str(version))
        with self._lock:
            if key not in self._models:
                data = registry.get_bytes(name, int(version))
                fitted = self._build(lambda: load_artifact(data))
                self._models[key] = LoadedModel(f"{name}@{version}", name, str(version), fitted)
            self._models[key] = self._models.pop(key)  # the most recently used last
            return self._models[key]

    def keep(self, used: Iterable[LoadedModel]) -> None:
        """Forget the models not in ``used``, but for the latest spares sharing a backbone with one in use.

        The backbones themselves stay, for the next version that shares them.
        """
        used = list(used)
        ids = {id(m) for m in used}
        extractors = {id(m.fitted.model.feature_extractor) for m in used}
        with self._lock:
            spares = [
                k
                for k, m in reversed(self._models.items())
                if id(m) not in ids and id(m.fitted.model.feature_extractor) in extractors
            ][:SPARE_VERSIONS]
            kept = ids | {id(self._models[k]) for k in spares}
            self._models = {k: m for k, m in self._models.items() if id(m) in kept}

    def _build(self, load: Any) -> FittedModel:
        t0 = time.perf_counter()
        fitted: FittedModel = load()
        model = fitted.model
        key = (model.backbone, model.layer, weights_fingerprint(model.feature_extractor.state_dict()))
        shared = self._backbones.get(key)
        if shared is not None:
            model.feature_extractor = shared  # one backbone (and its runners) for the same weights
        before = runner_count(model.feature_extractor)
        model = self.engine.prepare(model, fitted.info.image_size)
        built = runner_count(model.feature_extractor) - before
        self._backbones.setdefault(key, model.feature_extractor)
        self.backbone_builds += built
        seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.backbone_builds.labels(model.backbone).inc(built)
            self.metrics.model_builds.inc()
            self.metrics.build_seconds.observe(seconds)
        log.info(
            "model ready in %.2f s (%s/%s, %s)",
            seconds,
            model.backbone,
            model.layer,
            "backbone runner built" if built else "backbone shared with a loaded version",
        )
        return FittedModel(model, fitted.info)

"""Camera -> model: which fitted model scores each camera, and a cache of the loaded ones.

Resolution order for a camera: ``--model FILE`` (every camera), the camera's ``model`` in the
config file, the config's worker default ``model``, then the registry's assignment
(:class:`dfm_stream.registry.ModelRegistry`). A spec is an artifact path when it names an existing
file or ends in ``.safetensors``; otherwise it is a registry reference ``NAME[@VERSION]``.

Models are cached by (name, version) or by file content hash, and models whose backbones have the
same weights fingerprint share one backbone module (:mod:`dfm_stream.runners`). Changes are picked
up at batch boundaries only: a background thread listens on the registry's change channel, builds
the versions the change routes cameras to beside the ones in use (the fetch thread keeps reading
frames for the old versions meanwhile), then sets a flag; the next batch boundary switches. The
fetch thread also reads the registry's generation counter every ``poll_s`` (one GET), so a change
whose announcement was lost, or an edit of the registry's keys by hand, is found all the same. A
camera may also have a shadow candidate (``model shadow``): a second version that scores its frames
beside the live one (:mod:`dfm_stream.shadow`), loaded the same way. A version that fails to load
is reported (log, ``model_load_failures`` metric, a ``model_load_failed`` event on the alarm
stream) and the camera keeps the model it had; it is retried after the next registry change. A
camera whose model cannot be resolved at all (an unparseable assignment, a model or version not in
the registry) is reported the same way, once per camera and cause (event reason ``unresolved``),
keeps its model if it had one, else its frames wait in the stream; it is retried on every registry
change and every ``poll_s``. The other cameras are not affected. A camera whose assignment is
removed (``model unassign``) is no longer scored: its frames wait in the stream.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import redis

from dfm_stream import keys
from dfm_stream.alarms import publish_event
from dfm_stream.backoff import MODEL_WATCH
from dfm_stream.connect import RedisClient
from dfm_stream.errors import DfmStreamError
from dfm_stream.inference import Engine
from dfm_stream.metrics import WorkerMetrics
from dfm_stream.runners import CacheMetrics, LoadedModel, RunnerCache
from dfm_stream.wire import EventMsg, EventType

log = logging.getLogger(__name__)

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)
"""Errors that concern every camera (Redis unreachable), not one camera's model."""


__all__ = ["REDIS_DOWN", "LoadedModel", "ModelRouter", "is_path_spec"]


def is_path_spec(spec: str) -> bool:
    """Return True when ``spec`` names an artifact file rather than a registry reference."""
    return spec.endswith(".safetensors") or "/" in spec or Path(spec).is_file()


class ModelRouter:
    """Resolves and loads each camera's model; thread-compatible (used from the worker's fetch thread)."""

    def __init__(
        self,
        engine: Engine,
        client: RedisClient | None = None,
        prefix: str = keys.DEFAULT_PREFIX,
        model_file: str | None = None,
        camera_models: dict[str, str] | None = None,
        default_model: str = "",
        metrics: WorkerMetrics | None = None,
        poll_s: float = 5.0,
        cache_metrics: CacheMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.client = client
        self.prefix = prefix
        self.model_file = model_file
        self.camera_models = dict(camera_models or {})
        self.default_model = default_model
        self.metrics = metrics
        self.poll_s = poll_s
        self.cache = RunnerCache(engine, cache_metrics)
        self._assigned: dict[str, LoadedModel] = {}
        self._shadows: dict[str, LoadedModel] = {}
        self._failed: set[tuple[str, ...]] = set()
        self._corrupt: set[tuple[str, ...]] = set()
        self._none: set[str] = set()
        self._unresolved: dict[str, str] = {}  # camera -> why its model cannot be resolved (said once)
        self._retry_at = float("inf")
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._registry: Any = None
        self._generation: int | None = None
        self._next_poll = 0.0
        self._watcher: threading.Thread | None = None
        self._preloaded: dict[str, LoadedModel] = {}

    # -- resolution --------------------------------------------------------------------------------

    def spec_for(self, camera: str) -> str:
        """Return the configured spec of ``camera`` ("" = ask the registry)."""
        return self.model_file or self.camera_models.get(camera) or self.default_model

    @property
    def uses_registry(self) -> bool:
        """Whether any camera may take its model from the registry."""
        if self.model_file:
            return False
        specs = [*self.camera_models.values(), self.default_model]
        return not self.default_model or any(s and not is_path_spec(s) for s in specs)

    def registry(self) -> Any:
        """Return the :class:`~dfm_stream.registry.ModelRegistry` (created on first use)."""
        if self._registry is None:
            if self.client is None:
                raise DfmStreamError("no Redis client: the model registry cannot be used")
            from dfm_stream.registry import ModelRegistry

            self._registry = ModelRegistry(self.client, self.prefix)
        return self._registry

    def resolve(self, camera: str) -> LoadedModel | None:
        """Return the model scoring ``camera`` (loading it on first use); None when it has none."""
        if camera not in self._assigned and camera not in self._none:
            self._update(camera)
            self._refresh_shadows([camera])
            if camera not in self._assigned:
                self._none.add(camera)  # asked again after the next registry change
        return self._assigned.get(camera)

    def loaded(self) -> dict[str, LoadedModel]:
        """Return camera -> model for the cameras resolved so far."""
        return dict(self._assigned)

    def readiness(self) -> tuple[bool, str]:
        """Answer the model half of ``/readyz``: a model built (at start, or for a camera)."""
        models = self.loaded()
        if not models:
            built = sorted({m.label for m in self.preloaded()})
            if built:
                return True, "model(s) built, no camera with frames yet: " + ", ".join(built)
            return False, "no model loaded yet (no camera with a model)"
        return True, f"{len(models)} camera(s) with a model: " + ", ".join(
            sorted({m.label for m in models.values()})
        )

    def preload(self) -> list[LoadedModel]:
        """Build the models named by a file now (``--model FILE``, config paths), before any frame.

        A camera's first frames then wait only for the file's hash, not for the build (backbone
        runner, backend export). ``--model FILE`` failing to build raises: a worker that cannot
        score anything should not start. A config file failing is logged and reported per camera
        as before, when its frames arrive.
        """
        if self.model_file:
            specs = [self.model_file]
        else:
            configured = {*self.camera_models.values(), self.default_model}
            specs = sorted(s for s in configured if s and is_path_spec(s))
        for spec in specs:
            try:
                model = self._load(("file", spec))
            except Exception as e:
                if spec == self.model_file:
                    raise
                log.error(
                    "model file %s could not be built at start (%s): retried when a camera uses it", spec, e
                )
                continue
            self._preloaded[spec] = model
            log.info("model %s built from %s", model.label, spec)
        return list(self._preloaded.values())

    def preloaded(self) -> list[LoadedModel]:
        """Return the models :meth:`preload` built (a worker with one is ready before any camera)."""
        return list(self._preloaded.values())

    def _target(self, camera: str) -> tuple[str, ...] | None:
        spec = self.spec_for(camera)
        if spec and is_path_spec(spec):
            return ("file", spec)
        from dfm_stream.registry import ModelRef

        ref = ModelRef.parse(spec) if spec else self.registry().resolve(camera)
        if ref is None:
            return None
        if ref.version is None:
            version = self.registry().current(ref.name)
        else:
            version = self.registry().version_info(ref.name, ref.version).version  # it must exist
        return ("registry", ref.name, str(version))

    def _update(self, camera: str) -> bool:
        """Re-resolve ``camera``; return True when its model changed."""
        try:
            target = self._target(camera)
        except REDIS_DOWN:
            raise  # every camera is affected: the fetch loop backs off
        except Exception as e:  # a broken assignment or a missing model: this camera only
            self._report_unresolved(camera, e)
            return False
        self._unresolved.pop(camera, None)
        if target is None:
            return self._unassigned(camera)
        if target in self._failed:
            return False
        try:
            model = self._load(target)
        except Exception as e:  # any failure to load keeps the previous model
            self._failed.add(target)
            if isinstance(e, DfmStreamError):  # bad content, not a passing fault (e.g. Redis down)
                self._corrupt.add(target)
            self._report_failure(camera, target, e)
            return False
        previous = self._assigned.get(camera)
        if previous is not None and previous.label == model.label:
            return False
        self._assigned[camera] = model
        self._publish_info(camera, previous, model)
        log.info("camera %s is scored by %s", camera, model.label)
        if previous is not None:
            self._event(
                EventType.MODEL_SWITCHED, camera, model.label, message=f"switched from {previous.label}"
            )
        return True

    def _load(self, target: tuple[str, ...]) -> LoadedModel:
        if target[0] == "file":
            return self.cache.file(target[1])
        _, name, version = target
        return self.cache.stored(self.registry(), name, int(version))

    def rebind(self, model: LoadedModel, cameras: set[str]) -> LoadedModel:
        """Return the model a batch read for ``model`` should be scored by now (called by the model thread).

        When every camera of the batch switched to one other version since its frames were read
        (and it takes the same input size, so the prepared tensor fits), the batch is scored by
        the new version: a switch then waits for no batch already prepared. Still one version per
        batch, and each frame is scored once, by the version its score names.
        """
        now = {self._assigned.get(camera) for camera in cameras}
        if len(now) != 1:
            return model
        new = now.pop()
        if new is None or new is model or new.fitted.info.image_size != model.fitted.info.image_size:
            return model
        return new

    # -- shadow candidates ---------------------------------------------------------------------------

    def shadow_for(self, camera: str) -> LoadedModel | None:
        """Return the candidate scoring ``camera``'s frames beside its live model (None: no shadow)."""
        return self._shadows.get(camera)

    def _shadow_wanted(self, cameras: list[str]) -> dict[str, Any]:
        """Return camera -> shadow reference for ``cameras`` (one read of the registry's shadow hash)."""
        if self.client is None or not self.uses_registry:
            return {}
        from dfm_stream.promotion import Promotions

        wanted = Promotions(self.registry()).shadows()
        return {c: ref for c, ref in wanted.items() if c in cameras}

    def _refresh_shadows(self, cameras: list[str]) -> None:
        """Load the shadow candidate of each camera (or drop it); a failure leaves that camera unshadowed."""
        wanted = self._shadow_wanted(cameras)
        for camera in cameras:
            ref = wanted.get(camera)
            old = self._shadows.get(camera)
            if ref is None:
                if old is not None:
                    del self._shadows[camera]
                    log.info("camera %s: shadow scoring by %s stopped", camera, old.label)
                continue
            if old is not None and old.label == str(ref):
                continue
            try:
                model = self.cache.stored(self.registry(), ref.name, int(ref.version))
            except REDIS_DOWN:
                raise
            except Exception as e:  # the live model is not affected
                self._shadows.pop(camera, None)
                log.error("camera %s: cannot load shadow candidate %s (%s): not shadowed", camera, ref, e)
                continue
            self._shadows[camera] = model
            log.info("camera %s is shadowed by %s", camera, model.label)

    def prebuild(self) -> None:
        """Build now the versions the current registry routes known cameras to (live and shadow).

        Runs in the watch thread on a change announcement, while the fetch thread keeps reading
        frames for the old versions; the switch at the next batch boundary then finds them built.
        """
        cameras = sorted({*self._assigned, *self._none, *self._unresolved, *self._shadows})
        targets: set[tuple[str, ...]] = set()
        for camera in cameras:
            with contextlib.suppress(Exception):  # the fetch thread reports what cannot be resolved
                target = self._target(camera)
                if target is not None and target[0] == "registry":
                    targets.add(target)
        with contextlib.suppress(Exception):
            for ref in self._shadow_wanted(cameras).values():
                targets.add(("registry", ref.name, str(ref.version)))
        for target in sorted(targets - self._failed):
            try:
                self._load(target)
            except Exception as e:  # reported by the fetch thread when it switches
                log.debug("pre-building %s failed (%s)", "@".join(target[1:]), e)

    def _unassigned(self, camera: str) -> bool:
        """``camera`` has no model (any more): stop scoring it; return True when it had one."""
        previous = self._assigned.pop(camera, None)
        if previous is None:
            log.debug("camera %s has no model assigned: its frames wait in the stream", camera)
            return False
        if self.metrics is not None:
            info = previous.fitted.info
            with contextlib.suppress(KeyError):
                self.metrics.model_info.remove(camera, previous.name, previous.version, info.backbone)
        log.info(
            "camera %s is no longer scored (was %s): its frames wait in the stream", camera, previous.label
        )
        return True

    def _report_unresolved(self, camera: str, error: Exception) -> None:
        """Say once per camera and cause that its model cannot be resolved; it is retried later."""
        self._retry_at = min(self._retry_at, time.monotonic() + self.poll_s)
        if self._unresolved.get(camera) == str(error):
            return
        self._unresolved[camera] = str(error)
        label = self.spec_for(camera) or "assignment"
        keeps = self._assigned.get(camera)
        log.error(
            "camera %s: no usable model for %s (%s); %s; retried on every registry change",
            camera,
            label,
            error,
            f"keeping {keeps.label}" if keeps else "its frames wait in the stream",
        )
        if self.metrics:
            self.metrics.model_load_failures.labels(label).inc()
        self._event(EventType.MODEL_LOAD_FAILED, camera, label, reason="unresolved", message=str(error)[:500])

    def _report_failure(self, camera: str, target: tuple[str, ...], error: Exception) -> None:
        label = "@".join(target[1:]) if target[0] == "registry" else target[1]
        keeps = self._assigned.get(camera)
        log.error(
            "camera %s: cannot load model %s (%s); %s",
            camera,
            label,
            error,
            f"keeping {keeps.label}" if keeps else "its frames wait until a loadable model is assigned",
        )
        if self.metrics:
            self.metrics.model_load_failures.labels(label).inc()
        self._event(EventType.MODEL_LOAD_FAILED, camera, label, reason="load_error", message=str(error)[:500])

    def _event(
        self, kind: EventType, camera: str, model: str, reason: str | None = None, message: str | None = None
    ) -> None:
        """Put a model event on the alarm stream, where operators see camera and defect events."""
        if self.client is None:
            return
        event = EventMsg(
            type=kind, camera=camera, ts=time.time_ns(), model=model, reason=reason, message=message
        )
        try:
            publish_event(self.client, event, self.prefix)
        except Exception:
            log.exception("could not publish the %s event of camera %s", kind, camera)

    def _publish_info(self, camera: str, previous: LoadedModel | None, model: LoadedModel) -> None:
        if self.metrics is None:
            return
        if previous is not None:
            info = previous.fitted.info
            with contextlib.suppress(KeyError):
                self.metrics.model_info.remove(camera, previous.name, previous.version, info.backbone)
        self.metrics.model_info.labels(camera, model.name, model.version, model.fitted.info.backbone).set(1)

    # -- change detection ---------------------------------------------------------------------------

    def start_watch(self) -> None:
        """Listen for registry changes in a background thread (no-op when no camera uses the registry)."""
        if not self.uses_registry or self.client is None or self._watcher is not None:
            return
        self._watcher = threading.Thread(target=self._watch, name="model-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        backoff = MODEL_WATCH.backoff()
        while not self._stop.is_set():
            try:
                pubsub = self.client.pubsub()  # type: ignore[union-attr]
                pubsub.subscribe(self.registry().changes_channel)
                backoff.reset()
                self.prebuild()  # a change missed while not subscribed
                self._changed.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if message is not None:
                        while pubsub.get_message(ignore_subscribe_messages=True, timeout=0) is not None:
                            pass  # a burst of changes: one pre-build covers them all
                        self.prebuild()
                        self._changed.set()
                pubsub.close()
            except Exception as e:  # the polling fallback covers the gap
                delay = backoff.next()
                log.debug("model change subscription lost (%s); retrying in %.1f s", e, delay)
                backoff.wait(self._stop, delay)

    def refresh(self, cameras: list[str], force: bool = False) -> list[str]:
        """At a batch boundary: re-resolve ``cameras`` if the registry changed; return the ones switched."""
        now = time.monotonic()
        if not force and not self._changed.is_set():
            if self._unresolved and now >= self._retry_at:
                return self._retry_unresolved(cameras)
            if not self.uses_registry or now < self._next_poll:
                return []  # the watch thread pre-builds on an announcement, then raises the flag
            self._next_poll = now + self.poll_s
            generation = self.registry().generation()
            if generation == self._generation:
                return []
            self._generation = generation
        self._changed.clear()
        # A registry version's bytes never change, so a version that was corrupt stays refused
        # (no repeated events on unrelated changes); a file may have been fixed: retry it.
        self._failed = {t for t in self._failed if t[0] == "registry" and t in self._corrupt}
        self._none.clear()
        switched = [c for c in cameras if self._update(c)]
        self._refresh_shadows(cameras)
        self.cache.keep([*self._assigned.values(), *self._shadows.values()])
        return switched

    def _retry_unresolved(self, cameras: list[str]) -> list[str]:
        """Try again the cameras whose model could not be resolved (a fix may come without an announce)."""
        self._retry_at = time.monotonic() + self.poll_s
        retry = [c for c in cameras if c in self._unresolved]
        self._none.difference_update(retry)
        return [c for c in retry if self._update(c)]

    def close(self) -> None:
        """Stop the change listener."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(2)

"""Candidates per camera: shadow scoring, promotion, and the camera rollback that undoes it.

Storage (keys from :mod:`dfm_stream.keys`)::

    {prefix}:shadow            hash  camera -> "NAME@VERSION" its workers also score (never alarms)
    {prefix}:assign:previous   hash  camera -> its assignment before the last assign/promote ("" none)

* :meth:`Promotions.shadow` pins the candidate (``NAME`` means its current version now), clears
  the camera's comparison (:mod:`dfm_stream.shadow`) and announces the change: workers load the
  candidate beside the live model and score every frame of the camera with both.
* :meth:`Promotions.promote` makes the candidate the camera's live model: an ordinary
  :meth:`~dfm_stream.registry.ModelRegistry.assign` of the pinned reference (so the previous
  assignment is recorded) after the shadow entry is removed. Workers switch at a batch boundary:
  every frame is scored once, by the version named in its score.
* :meth:`Promotions.rollback` restores the camera's previous assignment (also through ``assign``,
  so a second rollback re-applies what the first undid). ``model rollback NAME`` is another thing:
  it changes a model's current version, for every camera that follows it.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from dfm_stream import keys
from dfm_stream.errors import RegistryError
from dfm_stream.registry import ModelRef, ModelRegistry
from dfm_stream.replies import text as _text

log = logging.getLogger(__name__)


class Switch(NamedTuple):
    """A camera's live assignment before and after a promote or a rollback (None: unassigned)."""

    camera: str
    before: ModelRef | None
    after: ModelRef | None


class Promotions:
    """Shadow candidates and promotions of cameras, on top of a :class:`ModelRegistry`."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.client = registry.client
        self.prefix = registry.prefix

    def shadows(self) -> dict[str, ModelRef]:
        """Return camera -> pinned candidate (unparseable entries are logged and left out)."""
        out: dict[str, ModelRef] = {}
        for cam, raw in self.client.hgetall(keys.shadows_key(self.prefix)).items():
            try:
                ref = ModelRef.parse(_text(raw))
            except RegistryError as e:
                log.warning("ignoring the shadow candidate of camera %s: %s", _text(cam), e)
                continue
            if ref.version is not None:
                out[_text(cam)] = ref
        return out

    def shadow_of(self, camera: str) -> ModelRef | None:
        """Return the candidate shadowing ``camera`` (None: none)."""
        return self.shadows().get(camera)

    def shadow(self, camera: str, ref: ModelRef) -> ModelRef:
        """Score ``camera``'s frames with ``ref`` too (pinned here); return the pinned reference."""
        _check_camera(camera)
        version = ref.version if ref.version is not None else self.registry.current(ref.name)
        pinned = ModelRef(ref.name, self.registry.version_info(ref.name, version).version)
        self.client.delete(keys.shadow_stats_key(camera, self.prefix))
        self.client.delete(keys.shadow_disagreements_key(camera, self.prefix))
        self.client.hset(keys.shadows_key(self.prefix), camera, str(pinned))
        self.registry.announce("shadow", camera=camera, model=str(pinned))
        log.info("camera %s is shadowed by %s", camera, pinned)
        return pinned

    def unshadow(self, camera: str) -> ModelRef:
        """Stop shadow scoring of ``camera``; return the candidate it had (RegistryError: none)."""
        ref = self.shadow_of(camera)
        if ref is None or not self.client.hdel(keys.shadows_key(self.prefix), camera):
            raise _no_shadow(camera, self.prefix)
        self.registry.announce("unshadow", camera=camera)
        log.info("camera %s: shadow scoring by %s stopped", camera, ref)
        return ref

    def promote(self, camera: str) -> Switch:
        """Make ``camera``'s candidate its live model (pinned); shadowing stops."""
        ref = self.shadow_of(camera)
        if ref is None:
            raise _no_shadow(camera, self.prefix)
        before = self.registry.assignments().get(camera)
        self.client.hdel(keys.shadows_key(self.prefix), camera)
        self.registry.assign(camera, ref)  # records `before` and announces: one switch in the workers
        log.info("camera %s: candidate %s promoted (was %s)", camera, ref, before or "unassigned")
        return Switch(camera, before, ref)

    def rollback(self, camera: str) -> Switch:
        """Give ``camera`` back its assignment from before its last assign or promote."""
        _check_camera(camera)
        previous = self.registry.previous_assignment(camera)
        before = self.registry.assignments().get(camera)
        if previous is None:
            self.registry.unassign(camera)
            self.client.hset(keys.previous_assignments_key(self.prefix), camera, str(before or ""))
        else:
            self.registry.assign(camera, previous)
        log.info("camera %s rolled back to %s (was %s)", camera, previous or "unassigned", before)
        return Switch(camera, before, previous)


def _check_camera(camera: str) -> None:
    try:
        keys.check_name(camera, "camera")
    except ValueError as e:
        raise RegistryError(str(e)) from e


def _no_shadow(camera: str, prefix: str) -> RegistryError:
    return RegistryError(
        f"camera {camera!r} has no shadow candidate under prefix {prefix!r}: start one with"
        " `dfm-stream model shadow --camera CAM --model NAME@VERSION`"
    )

"""The model registry in Redis: versioned artifacts, a current version per model, camera assignments.

Storage (all keys from :mod:`dfm_stream.keys`)::

    {prefix}:models                     set     model names
    {prefix}:{model:NAME}:versions      hash    version -> JSON of VersionInfo (written last)
    {prefix}:{model:NAME}:vN:chunks     list    the artifact bytes of version N, in chunks
    {prefix}:{model:NAME}:current       string  the version that unpinned routing uses
    {prefix}:assign                     hash    camera -> "NAME" or "NAME@VERSION"
    {prefix}:assign:previous            hash    camera -> its assignment before the last assign ("": none)
    {prefix}:models:generation          counter INCR on every change (for polling workers)
    {prefix}:models:changed             channel one JSON message per change

A push writes the chunks, the version's metadata and the new current version in one transaction
on the model's own keys (one ``{model:NAME}`` hash tag, so one Redis Cluster slot): a version is
visible only once complete, and a failed push leaves nothing behind. Versions are never reused
or rewritten. A **candidate** (:meth:`ModelRegistry.push_candidate`, what ``dfm-stream enrol``
pushes) is stored the same way but does not become current: its metadata says ``status:
candidate`` and carries how it was made (``enrolment``), and no camera uses it until one is
assigned or shadowed to it. Pushing bytes identical (sha256) to a stored version stores nothing: that version
is made current again, and the push result says so (``created`` is False). The models set, the
assignments hash and the generation counter are single keys, each touched by its own command, so
nothing spans two cluster slots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import redis

from dfm_stream import keys, replies
from dfm_stream.errors import ArtifactError, RegistryError
from dfm_stream.replies import text as _text

if TYPE_CHECKING:
    from collections.abc import Callable

    from dfm_stream.connect import RedisClient

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
"""Bytes per list element of a stored artifact (well under Redis' 512 MB bulk limit)."""

PUSH_RETRIES = 20
"""How often a push retries when another push of the same model allocated the same version."""

_REF_RE = re.compile(r"^(?P<name>[^@]+?)(?:@[vV]?(?P<version>\d+))?$")


class ModelRef(NamedTuple):
    """A reference to a model: ``NAME`` (its current version) or ``NAME@VERSION`` (pinned)."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``"NAME"`` or ``"NAME@VERSION"`` (``VERSION`` a positive integer, ``v`` prefix allowed)."""
        match = _REF_RE.match(text.strip()) if isinstance(text, str) else None
        name = match.group("name") if match else ""
        if not match or not keys.valid_name(name):
            raise RegistryError(
                f"bad model reference {text!r}: write NAME or NAME@VERSION, e.g. 'bottle' or 'bottle@3'"
                " (NAME: 1-64 letters, digits, '_', '.' or '-'; VERSION: a positive integer)"
            )
        version = match.group("version")
        if version is not None and int(version) < 1:
            raise RegistryError(f"bad model reference {text!r}: versions start at 1")
        return cls(name, None if version is None else int(version))

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


@dataclass(frozen=True)
class VersionInfo:
    """Metadata of one stored model version (the JSON value in the versions hash)."""

    name: str
    version: int
    size: int
    sha256: str
    content_hash: str
    created_at: str
    pushed_at: str
    backbone: str
    layer: str
    score_type: str
    threshold: float | None
    image_size: tuple[int, int]
    chunks: int
    status: str = "released"
    """``released`` (pushed to be used: it became current) or ``candidate`` (stored, not current)."""
    enrolment: dict[str, Any] | None = None
    """For a candidate made by ``dfm-stream enrol``: its provenance and evaluation (JSON-ready)."""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        return data

    @classmethod
    def from_json(cls, raw: bytes | str, where: str) -> VersionInfo:
        """Decode the stored JSON (fields a newer release added are ignored); ``where`` names the key."""
        try:
            data = json.loads(raw)
            known = {f.name for f in dataclasses.fields(cls)}
            data = {k: v for k, v in data.items() if k in known}
            data["image_size"] = tuple(int(v) for v in data["image_size"])
            return cls(**data)
        except (ValueError, TypeError, KeyError) as e:
            raise RegistryError(
                f"corrupt version metadata in {where} ({e}): push the model again or delete that field"
            ) from e


class PushResult(NamedTuple):
    """What a push did: ``info`` is the version now current."""

    info: VersionInfo
    created: bool
    """False when the bytes were identical to a stored version (``info``): nothing was stored."""
    previous_current: int | None
    """The version that was current before the push (None for a new model)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _identical_versions(stored: dict[Any, Any], sha256: str, where: str) -> list[VersionInfo]:
    """Return the versions in ``stored`` (a versions hash) whose bytes have ``sha256``, oldest first.

    Unreadable entries are skipped here: a push must not fail on another version's metadata.
    """
    found = []
    for field, raw in stored.items():
        try:
            info = VersionInfo.from_json(raw, f"{where} field {_text(field)}")
        except RegistryError:
            continue
        if info.sha256 == sha256:
            found.append(info)
    return sorted(found, key=lambda v: v.version)


def _check_model_name(name: str) -> str:
    try:
        return keys.check_name(name, "model")
    except ValueError as e:
        raise RegistryError(str(e)) from e


def validate_artifact(name: str, data: bytes, source: str | None = None) -> Any:
    """Load ``data`` as an artifact on the CPU and return its ``ArtifactInfo``; RegistryError if unusable."""
    from dfm_stream.artifact import load_artifact  # torch: only the commands that push pay for it

    origin = f" from {source}" if source else ""
    if not data:
        raise RegistryError(f"refused to push model {name!r}{origin}: the artifact is empty")
    try:
        return load_artifact(bytes(data), device="cpu").info
    except ArtifactError as e:
        raise RegistryError(f"refused to push model {name!r}{origin}: {e}") from e


class ModelRegistry:
    """Versioned model artifacts and camera -> model routing, stored in Redis.

    Args:
        client: a binary-reply client (:func:`dfm_stream.connect.connect`), plain or cluster.
        prefix: the key prefix of the deployment.
        chunk_size: bytes per stored chunk of an artifact.
    """

    def __init__(
        self, client: RedisClient, prefix: str = keys.DEFAULT_PREFIX, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        if chunk_size < 1:
            raise RegistryError(f"chunk_size must be a positive number of bytes, got {chunk_size}")
        self.client = client
        self.prefix = prefix
        self.chunk_size = int(chunk_size)

    @property
    def changes_channel(self) -> str:
        """The pub/sub channel on which every change is announced (JSON messages)."""
        return keys.models_changed_channel(self.prefix)

    # -- reading ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Return the names of the stored models, sorted."""
        return sorted(_text(n) for n in self.client.smembers(keys.models_key(self.prefix)))

    def versions(self, name: str) -> list[VersionInfo]:
        """Return every stored version of ``name``, oldest first; RegistryError for an unknown model."""
        key = keys.model_versions_key(_check_model_name(name), self.prefix)
        raw = self.client.hgetall(key)
        if not raw:
            raise self._unknown_model(name)
        infos = [VersionInfo.from_json(v, f"{key} field {_text(k)}") for k, v in raw.items()]
        return sorted(infos, key=lambda i: i.version)

    def version_info(self, name: str, version: int) -> VersionInfo:
        """Return the metadata of one version; RegistryError when it does not exist."""
        key = keys.model_versions_key(_check_model_name(name), self.prefix)
        raw = self.client.hget(key, str(int(version)))
        if raw is None:
            raise self._unknown_version(name, version)
        return VersionInfo.from_json(raw, f"{key} field {version}")

    def current(self, name: str) -> int:
        """Return the current version of ``name`` (the one unpinned cameras use)."""
        raw = self.client.get(keys.model_current_key(_check_model_name(name), self.prefix))
        if raw is None:
            raise self._unknown_model(name)
        return int(raw)

    def show(self, name: str) -> dict[str, Any]:
        """Return ``{"name", "current", "versions": [...], "cameras": {camera: ref}}`` (JSON-ready)."""
        versions = self.versions(name)
        cameras = {cam: str(ref) for cam, ref in sorted(self.assignments().items()) if ref.name == name}
        return {
            "name": name,
            "current": self.current(name),
            "versions": [v.to_dict() for v in versions],
            "cameras": cameras,
        }

    def assignments(self) -> dict[str, ModelRef]:
        """Return camera -> assigned reference (unparseable entries are logged and left out)."""
        out: dict[str, ModelRef] = {}
        for cam, raw in self.client.hgetall(keys.assignments_key(self.prefix)).items():
            try:
                out[_text(cam)] = ModelRef.parse(_text(raw))
            except RegistryError as e:
                log.warning("ignoring the assignment of camera %s in %s: %s", _text(cam), self.prefix, e)
        return out

    def resolve(self, camera: str) -> ModelRef | None:
        """Return the model camera ``camera`` should use, version filled in; None when unassigned."""
        raw = self.client.hget(keys.assignments_key(self.prefix), camera)
        if raw is None:
            return None
        ref = ModelRef.parse(_text(raw))
        if ref.version is not None:
            return ref
        return ModelRef(ref.name, self.current(ref.name))

    def get_bytes(self, name: str, version: int) -> bytes:
        """Return the artifact bytes of ``name@version``, verified against the stored size and sha256."""
        info = self.version_info(name, version)
        key = keys.model_chunks_key(name, version, self.prefix)
        chunks = replies.lrange(self.client, key)
        data = b"".join(chunks)
        if len(chunks) != info.chunks or len(data) != info.size:
            raise RegistryError(
                f"model {name}@{version} is incomplete in Redis ({key}: {len(chunks)}/{info.chunks} chunks,"
                f" {len(data)}/{info.size} bytes): push the artifact again"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise RegistryError(
                f"model {name}@{version} failed its checksum ({key}: sha256 {digest[:12]}..., expected"
                f" {info.sha256[:12]}...): the stored bytes are corrupt; push the artifact again"
            )
        return data

    def generation(self) -> int:
        """Return the change counter (it grows on every push, rollback, assign and unassign)."""
        raw = self.client.get(keys.registry_generation_key(self.prefix))
        return int(raw) if raw is not None else 0

    # -- writing ---------------------------------------------------------------------------------

    def push(self, name: str, data: bytes, source: str | None = None) -> VersionInfo:
        """Store ``data`` as the next version of ``name`` (or find it stored); return the current version.

        See :meth:`push_result`; this returns only its ``info``.
        """
        return self.push_result(name, data, source).info

    def push_result(self, name: str, data: bytes, source: str | None = None) -> PushResult:
        """Validate and store ``data`` as the next version of ``name``, make it current, announce it.

        Bytes identical (same sha256) to a stored version N create no new version: N is made
        current (announced like a rollback when it was not) and the result says ``created=False``.
        ``source`` (e.g. the file name) only serves error messages.
        """
        return self._store(name, data, source, candidate=None)

    def push_candidate(
        self, name: str, data: bytes, enrolment: dict[str, Any], source: str | None = None
    ) -> PushResult:
        """Store ``data`` as the next version of the existing model ``name`` without making it current.

        The version's metadata says ``status: candidate`` and holds ``enrolment`` (JSON-ready: how
        the version was made and how it compared). The current version and every assignment stay
        as they were. Bytes identical to a stored version store nothing (``created=False``).
        """
        self.current(name)  # a candidate replaces something: the model must exist
        return self._store(name, data, source, candidate=enrolment)

    def _store(
        self, name: str, data: bytes, source: str | None, candidate: dict[str, Any] | None
    ) -> PushResult:
        _check_model_name(name)
        artifact = validate_artifact(name, data, source)
        chunks = [data[i : i + self.chunk_size] for i in range(0, len(data), self.chunk_size)]
        base = {
            "name": name,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "content_hash": artifact.content_hash,
            "created_at": artifact.created_at,
            "backbone": artifact.backbone,
            "layer": artifact.layer,
            "score_type": artifact.score_type,
            "threshold": artifact.threshold,
            "image_size": tuple(artifact.image_size),
            "chunks": len(chunks),
        }
        versions_key = keys.model_versions_key(name, self.prefix)
        current_key = keys.model_current_key(name, self.prefix)

        def write(pipe: Any) -> PushResult:
            stored = pipe.hgetall(versions_key)
            raw_current = pipe.get(current_key)
            previous = None if raw_current is None else int(raw_current)
            same = _identical_versions(stored, base["sha256"], versions_key)
            if same and candidate is not None:
                return PushResult(same[-1], created=False, previous_current=previous)
            if same:
                info = next((v for v in same if v.version == previous), same[-1])
                if info.version != previous:
                    pipe.multi()
                    pipe.set(current_key, info.version)
                return PushResult(info, created=False, previous_current=previous)
            version = max((int(v) for v in stored), default=0) + 1
            extra: dict[str, Any] = (
                {} if candidate is None else {"status": "candidate", "enrolment": candidate}
            )
            info = VersionInfo(version=version, pushed_at=_now(), **base, **extra)
            chunks_key = keys.model_chunks_key(name, info.version, self.prefix)
            pipe.multi()
            pipe.delete(chunks_key)  # a leftover of an interrupted non-transactional writer, if any
            for chunk in chunks:
                pipe.rpush(chunks_key, chunk)
            pipe.hset(versions_key, str(info.version), json.dumps(info.to_dict()))
            if candidate is None:
                pipe.set(current_key, info.version)
            return PushResult(info, created=True, previous_current=previous)

        result = self._transaction(name, write, versions_key, current_key)
        if candidate is not None and not result.created:
            log.info("model %s: candidate identical to version %d, nothing stored", name, result.info.version)
        else:
            self._announce_push(result)
        return result

    def _announce_push(self, result: PushResult) -> None:
        info = result.info
        if result.created and info.status == "candidate":
            self._announce("candidate", model=info.name, version=info.version)
            log.info("stored candidate %s version %d (not current)", info.name, info.version)
        elif result.created:
            self.client.sadd(keys.models_key(self.prefix), info.name)
            self._announce("push", model=info.name, version=info.version)
            log.info(
                "pushed model %s version %d (%d bytes, %d chunks)",
                info.name,
                info.version,
                info.size,
                info.chunks,
            )
        elif result.previous_current != info.version:
            self._announce("rollback", model=info.name, version=info.version)
            log.info("model %s: identical to version %d, which is current again", info.name, info.version)
        else:
            log.info("model %s: identical to the current version %d, nothing stored", info.name, info.version)

    def rollback(self, name: str, to: int | None = None) -> int:
        """Make ``to`` (default: the newest version older than the current one) current; return it."""
        _check_model_name(name)
        current_key = keys.model_current_key(name, self.prefix)
        versions_key = keys.model_versions_key(name, self.prefix)

        def write(pipe: Any) -> int:
            raw = pipe.get(current_key)
            existing = sorted(int(v) for v in pipe.hkeys(versions_key))
            if raw is None or not existing:
                raise self._unknown_model(name)
            target = to if to is not None else max((v for v in existing if v < int(raw)), default=None)
            if target is None:
                raise RegistryError(
                    f"model {name} has no version before the current one ({int(raw)}): nothing to roll"
                    f" back to (versions: {existing})"
                )
            if target not in existing:
                raise self._unknown_version(name, target, existing)
            pipe.multi()
            pipe.set(current_key, target)
            return int(target)

        target = self._transaction(name, write, current_key, versions_key)
        self._announce("rollback", model=name, version=target)
        log.info("model %s: current version is now %d", name, target)
        return target

    def assign(self, camera: str, ref: ModelRef) -> None:
        """Route ``camera`` to ``ref`` (pinned or current); the model and version must exist."""
        try:
            keys.check_name(camera, "camera")
        except ValueError as e:
            raise RegistryError(str(e)) from e
        if ref.version is None:
            self.current(ref.name)  # raises for an unknown model
        else:
            self.version_info(ref.name, ref.version)
        previous = self.client.hget(keys.assignments_key(self.prefix), camera)
        # what `model rollback --camera` restores; written first, so a crash in between leaves the old one
        self.client.hset(keys.previous_assignments_key(self.prefix), camera, _text(previous or b""))
        self.client.hset(keys.assignments_key(self.prefix), camera, str(ref))
        self.announce("assign", camera=camera, model=str(ref))
        log.info("camera %s assigned to model %s", camera, ref)

    def previous_assignment(self, camera: str) -> ModelRef | None:
        """Return what ``camera`` was assigned before its last assign (None: it had no assignment).

        RegistryError when nothing was recorded (never assigned since assignments were recorded).
        """
        raw = self.client.hget(keys.previous_assignments_key(self.prefix), camera)
        if raw is None:
            raise RegistryError(
                f"camera {camera!r} has no recorded earlier assignment under prefix {self.prefix!r}:"
                " nothing to roll back (assign it with `dfm-stream model assign`)"
            )
        return ModelRef.parse(_text(raw)) if raw else None

    def unassign(self, camera: str) -> None:
        """Remove the assignment of ``camera``; RegistryError when it has none."""
        if not self.client.hdel(keys.assignments_key(self.prefix), camera):
            raise RegistryError(
                f"camera {camera!r} has no model assigned under prefix {self.prefix!r}: nothing to remove"
            )
        self._announce("unassign", camera=camera)
        log.info("camera %s unassigned", camera)

    # -- internals -------------------------------------------------------------------------------

    def _transaction(self, name: str, write: Callable[[Any], Any], *watch: str) -> Any:
        """Run ``write(pipe)`` under WATCH of ``watch`` (keys of one model) and EXEC, retrying on conflict."""
        for _ in range(PUSH_RETRIES):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*watch)
                    result = write(pipe)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue
        raise RegistryError(
            f"model {name}: {PUSH_RETRIES} concurrent changes collided with this one; try again"
        )

    def announce(self, event: str, **fields: Any) -> None:
        """Bump the generation counter and publish ``event`` on the change channel (workers re-resolve)."""
        self._announce(event, **fields)

    def _announce(self, event: str, **fields: Any) -> None:
        generation = int(self.client.incr(keys.registry_generation_key(self.prefix)))
        message = json.dumps({"event": event, "generation": generation, **fields})
        self.client.publish(self.changes_channel, message)

    def _unknown_model(self, name: str) -> RegistryError:
        known = ", ".join(self.names()) or "none"
        return RegistryError(
            f"unknown model {name!r} under prefix {self.prefix!r} (known: {known}):"
            " push it first with `dfm-stream model push --name NAME --file ARTIFACT`"
        )

    def _unknown_version(self, name: str, version: int, existing: list[int] | None = None) -> RegistryError:
        if existing is None:
            existing = [v.version for v in self.versions(name)]
        return RegistryError(f"model {name} has no version {version} (versions: {existing})")

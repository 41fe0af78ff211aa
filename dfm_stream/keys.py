"""Every Redis key and channel dfm-stream uses, in one place.

Keys that belong to one camera carry the camera id as a Redis Cluster hash tag (``{camera}``), so
all of a camera's keys live in one slot and a worker may touch them together (pipelines, Lua) on a
cluster. Keys of one model carry ``{model:NAME}`` for the same reason. Nothing else in the code
builds a key: call these functions.

Layout (default prefix ``dfm``)::

    dfm:{cam1}:frames          stream   frames of camera cam1 (readers XADD, workers XREADGROUP)
    dfm:{cam1}:scores          stream   one score per frame (workers XADD)
    dfm:{cam1}:alarm           hash     alarm state machine of cam1 (survives worker restarts)
    dfm:{cam1}:results         stream   part inspection results (one per job)
    dfm:{cam1}:job             string   the job running on cam1 (busy lock, expires)
    dfm:{cam1}:seq             hash     last sequence number handed to the consumer group, per session
    dfm:{cam1}:candidates      stream   frames marked false alarm in the console (candidate good samples)
    dfm:{cam1}:drift           hash     latest drift figures of cam1 against its model's reference (workers)
    dfm:{cam1}:shadow          stream   scores of cam1's frames by its shadow candidate (never alarms)
    dfm:{cam1}:shadow:stats    hash     running comparison of candidate and live model on cam1
    dfm:{cam1}:shadow:disagree list     the latest frames only one of the two flagged (JSON, newest first)
    dfm:alarms                 stream   alarm and health events of every camera (+ pub/sub channel)
    dfm:deadletter             stream   frames that could not be scored, with a reason
    dfm:reviews                hash     frame id of a raised alarm -> JSON review (console)
    dfm:audit                  stream   every action of a console user (who, what, when)
    dfm:cameras                hash     camera id -> JSON description written by the reader that owns it
    dfm:cameras:alive          zset     camera id -> Unix time of its reader's last heartbeat
    dfm:worker:NAME            string   worker heartbeat (expires when the worker dies)
    dfm:models                 set      names of the models in the registry
    dfm:{model:NAME}:versions  hash     version -> JSON metadata of that version
    dfm:{model:NAME}:v7:chunks list     the artifact bytes of version 7, in chunks
    dfm:{model:NAME}:current   string   the version that ``model rollback`` / default routing uses
    dfm:assign                 hash     camera id -> "NAME" or "NAME@VERSION"
    dfm:assign:previous        hash     camera id -> the assignment before the last assign/promote ("" = none)
    dfm:shadow                 hash     camera id -> "NAME@VERSION" scored in the shadow of its model
    dfm:models:changed         channel  published on every registry change
    dfm:models:generation      string   counter bumped on every registry change (polling fallback)
"""

import re

DEFAULT_PREFIX = "dfm"
"""The prefix of every key, unless a deployment sets another (``--prefix``, ``DFM_PREFIX``)."""

DEFAULT_GROUP = "dfm-workers"
"""The consumer group the workers of one deployment share on every frame stream."""

DEFAULT_SCORES_MAXLEN = 10_000
"""Approximate MAXLEN of a camera's score stream (``--scores-maxlen``, ``[worker] scores_maxlen``)."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def valid_name(name: str) -> bool:
    """Return True when ``name`` is usable as a camera or model id (letters, digits, ``_.-``; <= 64)."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None  # no "$": it allows a final \n


def check_name(name: str, what: str = "camera") -> str:
    """Return ``name`` unchanged, or raise ``ValueError`` saying why it cannot be a key part."""
    if not valid_name(name):
        raise ValueError(
            f"invalid {what} id {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a"
            " letter or digit (no braces, colons or spaces: they are part of the Redis key layout)"
        )
    return name


def _camera_key(camera: str, what: str, prefix: str) -> str:
    return f"{prefix}:{{{check_name(camera)}}}:{what}"


def frames_key(camera: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the frame stream of ``camera``."""
    return _camera_key(camera, "frames", prefix)


def scores_key(camera: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the score stream of ``camera``."""
    return _camera_key(camera, "scores", prefix)


def results_key(camera: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the stream of part inspection results of ``camera`` (one entry per job)."""
    return _camera_key(camera, "results", prefix)


def job_lock_key(camera: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the expiring key naming the job that runs on ``camera`` (one job at a time)."""
    return _camera_key(camera, "job", prefix)


def alarm_state_key(camera: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the hash that holds the alarm state machine of ``camera``."""
    return _camera_key(camera, "alarm", prefix)


def event_outbox_key(camera: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the stream of ``camera``'s alarm events written with their score, not yet delivered."""
    return _camera_key(camera, "outbox", prefix)


def seq_key(camera: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the hash that tracks the last sequence number delivered to the group for ``camera``."""
    return _camera_key(camera, "seq", prefix)


def drift_key(camera: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the hash holding the latest drift figures of ``camera`` (written by workers)."""
    return _camera_key(camera, "drift", prefix)


def alarms_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Return the stream of alarm and camera health events (all cameras)."""
    return f"{prefix}:alarms"


def alarms_channel(prefix: str = DEFAULT_PREFIX) -> str:
    """Return the pub/sub channel on which every alarm event is also published."""
    return f"{prefix}:alarms"


def candidates_key(camera: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the stream of ``camera``'s frames marked false alarm (candidate good samples)."""
    return _camera_key(camera, "candidates", prefix)


def reviews_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Return the hash frame id of a raised alarm -> JSON review (acknowledged / false alarm)."""
    return f"{prefix}:reviews"


def audit_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Return the stream of console user actions (who, what, when)."""
    return f"{prefix}:audit"


def deadletter_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Return the dead-letter stream (frames that could not be scored, with a reason)."""
    return f"{prefix}:deadletter"


def cameras_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Return the hash of known cameras (camera id -> JSON description)."""
    return f"{prefix}:cameras"


def cameras_alive_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Return the sorted set camera id -> Unix time (s) of the last heartbeat of the reader writing it."""
    return f"{prefix}:cameras:alive"


def worker_heartbeat_key(worker: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the expiring heartbeat key of one worker process."""
    return f"{prefix}:worker:{worker}"


def models_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Return the set of model names in the registry."""
    return f"{prefix}:models"


def _model_key(name: str, what: str, prefix: str) -> str:
    return f"{prefix}:{{model:{check_name(name, 'model')}}}:{what}"


def model_versions_key(name: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the hash version -> JSON metadata of model ``name``."""
    return _model_key(name, "versions", prefix)


def model_chunks_key(name: str, version: int, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the list holding the artifact bytes of one model version, in chunks."""
    return _model_key(name, f"v{int(version)}:chunks", prefix)


def model_current_key(name: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the key naming the current (default) version of model ``name``."""
    return _model_key(name, "current", prefix)


def assignments_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Return the hash camera id -> model reference (``NAME`` or ``NAME@VERSION``)."""
    return f"{prefix}:assign"


def models_changed_channel(prefix: str = DEFAULT_PREFIX) -> str:
    """Return the pub/sub channel announcing registry changes (push, rollback, assign)."""
    return f"{prefix}:models:changed"


def registry_generation_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Return the counter bumped (INCR) on every registry change, for workers that poll."""
    return f"{prefix}:models:generation"


def shadow_key(camera: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the stream of ``camera``'s frames scored by its shadow candidate."""
    return _camera_key(camera, "shadow", prefix)


def shadow_stats_key(camera: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the hash of running sums comparing ``camera``'s shadow candidate with its live model."""
    return _camera_key(camera, "shadow:stats", prefix)


def shadow_disagreements_key(camera: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the list of ``camera``'s latest frames that only one of live and candidate flagged."""
    return _camera_key(camera, "shadow:disagree", prefix)


def shadows_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Return the hash camera id -> pinned model reference scored in the shadow of the live one."""
    return f"{prefix}:shadow"


def previous_assignments_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Return the hash camera id -> its assignment before the last assign or promote ("" = none)."""
    return f"{prefix}:assign:previous"

"""What shapes a worker (:class:`WorkerSettings`) and what one run of it counted (:class:`WorkerStats`).

The user's settings are defined, documented and checked once, in ``[worker]`` and ``[alarms]`` of
:mod:`dfm_stream.config`; :meth:`WorkerSettings.from_config` takes them over, beside the settings
that belong to one run (cameras, ``--burst``) or to tests (intervals).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dfm_stream.batcher import DEFAULT_MAX_BATCH_BYTES
from dfm_stream.config import AlarmsConfig, WorkerConfig
from dfm_stream.publisher import OUTBOX_DELIVER_AFTER_S

_CONFIG = WorkerConfig()


@dataclass
class WorkerSettings:
    """Everything that shapes a worker's behaviour.

    The user's settings are those of ``[worker]`` and ``[alarms]`` (:class:`WorkerConfig`, defined
    and checked there; :meth:`from_config`); the rest belongs to one run or to tests.
    """

    cameras: list[str] | None = None
    group: str = _CONFIG.group
    batch_size: int = _CONFIG.batch_size
    max_wait_ms: float = _CONFIG.max_wait_ms
    claim_idle_s: float = _CONFIG.claim_idle_s
    max_deliveries: int = _CONFIG.max_deliveries
    max_age_s: float | None = None  # None: never skip (max_age_s = 0 in the config)
    scores_maxlen: int = _CONFIG.scores_maxlen
    max_pixels: int = _CONFIG.max_pixels
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    """Decoded bytes (3 per pixel) one batch may hold: huge frames make smaller batches."""
    max_frame_bytes: int | None = None  # None: frame_bytes_cap(max_pixels)
    decode_at_model_size: bool = _CONFIG.decode_at_model_size
    """Decode JPEG frames at 1/2, 1/4 or 1/8 scale when still >= the model's input (off: full size)."""
    alarm: AlarmsConfig = field(default_factory=AlarmsConfig)
    burst: bool = False
    max_frames: int | None = None
    discover_interval_s: float = 5.0
    max_cameras: int = _CONFIG.max_cameras
    stats_interval_s: float = 5.0
    heartbeat_interval_s: float = 10.0
    outbox_interval_s: float = 5.0
    outbox_deliver_after_s: float = OUTBOX_DELIVER_AFTER_S
    durability: str = "local"

    @classmethod
    def from_config(cls, worker: WorkerConfig, alarms: AlarmsConfig, **run: Any) -> WorkerSettings:
        """Return the settings of ``[worker]`` and ``[alarms]`` plus those of one run (``cameras``...)."""
        return cls(
            group=worker.group,
            batch_size=worker.batch_size,
            max_wait_ms=worker.max_wait_ms,
            claim_idle_s=worker.claim_idle_s,
            max_deliveries=worker.max_deliveries,
            max_age_s=worker.max_age_s or None,
            scores_maxlen=worker.scores_maxlen,
            max_pixels=worker.max_pixels,
            max_frame_bytes=worker.max_frame_bytes or None,
            max_cameras=worker.max_cameras,
            decode_at_model_size=worker.decode_at_model_size,
            alarm=alarms,
            **run,
        )


@dataclass
class WorkerStats:
    """Counts of one :meth:`Worker.run` (the metrics say the same, per camera)."""

    read: int = 0
    scored: int = 0
    skipped: int = 0
    duplicates: int = 0
    deadlettered: int = 0
    trimmed: int = 0
    redelivered: int = 0
    batches: int = 0
    events: list[str] = field(default_factory=list)
    events_recovered: int = 0

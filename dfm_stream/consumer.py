"""The consumer side of the frame streams: groups, reads with exact gap accounting, reclaim, stats.

Every frame stream has one consumer group (default ``dfm-workers``) created idempotently at id
``0`` with ``MKSTREAM``, so frames written before any worker started are scored too; a group
created again after ``XGROUP DESTROY`` starts after the camera's last scored frame instead
(:data:`SCORED_FIELD`, kept by the publish script), so no frame is scored twice.

Reading goes through a Lua script (:data:`dfm_stream.read_script.READ_SCRIPT`, one camera per call,
so it is cluster safe: the frame stream and the camera's seq hash share the ``{camera}`` hash tag).
The script does a non-blocking ``XREADGROUP ... COUNT n STREAMS frames >`` and, in the same atomic
step, walks the ``seq``/``session`` of the delivered entries against the last delivered seq stored
in ``{prefix}:{camera}:seq``. Because deliveries of new entries to a group happen in stream order
and the script is atomic, the gap count is exact however many workers share a camera: a gap is a
frame of the same reader session that was trimmed by ``MAXLEN`` before the group delivered it. Not
counted (never over-counted): frames trimmed at the very end of a reader session (the next session
starts a new count), and frames of a second reader writing the same camera at the same time (each
session switch restarts the count). Entries whose ``msg`` cannot be unpacked are ignored by the
accounting and handed over as they are (the worker dead-letters them); entries the worker could
only refuse as ``oversized`` or for a missing ``msg`` are handed over cut to the prefix a dead
letter keeps, with the reason (:class:`Refusal`), so their bulk never leaves Redis. The script reads
``seq``/``session`` with a small msgpack scanner of its own (Redis' ``cmsgpack`` refuses the
``bin`` type that carries the image), which reads the top-level keys of the map (to see an
oversized array or map wherever it is) and stops at the first value it cannot read.

Bounded work per entry, whatever it holds (constants in :mod:`dfm_stream.read_script`): the
scanner looks at no more than ``SCAN_MAX_ITEMS`` msgpack items (strings and binaries are jumped
over, at most ``SCAN_MAX_STR`` bytes of a string are copied), an entry above ``max_frame_bytes``
is not scanned at all (it is handed over cut), and the gap count is bounded per camera: a
``seq`` that goes back, is at least ``SEQ_MAX``, or jumps further than ``GAP_PER_MS`` frames per
millisecond of entry-id time (plus ``GAP_SLACK``) is returned as a seq anomaly, never as a gap,
and the count restarts.

Waiting for frames costs no polling: when a scripted read returns nothing, the script also
returns the group's last-delivered id (from ``XINFO GROUPS``: no entry is copied into Lua), which
no entry of the stream is newer than, and the worker blocks on ``XREAD BLOCK`` from
those ids (all cameras in one call on a standalone server; on a cluster one camera at a time,
round-robin, with a short block, because keys of different cameras live in different slots).
"""

from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import dataclass, field

import redis

from dfm_stream import keys, liveness, replies
from dfm_stream.connect import RedisClient
from dfm_stream.liveness import DEFAULT_MAX_CAMERAS
from dfm_stream.read_script import READ_SCRIPT
from dfm_stream.replies import text as _s
from dfm_stream.wire import FIELD, MAX_FRAME_ITEMS, frame_bytes_cap

log = logging.getLogger(__name__)


SCORED_FIELD = "scored"
"""Field of ``{prefix}:{camera}:seq``: the highest frame entry id with a score (written on publish)."""

LAG_COUNT_CAP = 10_000
"""Most entries :data:`LAG_SCRIPT` counts one by one (a larger lag is reported as this number).

Counting walks the undelivered entries inside Redis (there is no rank query on a stream), so its
cost grows with the lag: 0 and "everything undelivered" (XLEN) cost O(1), anything in between
O(lag) up to this cap, once per camera per stats interval."""

LAG_SCRIPT = """
local function older(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  if tonumber(ams) ~= tonumber(bms) then return tonumber(ams) < tonumber(bms) end
  return tonumber(aseq) < tonumber(bseq)
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local last, pending = nil, 0
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, id, n = nil, nil, 0
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1]
    elseif g[i] == 'last-delivered-id' then id = g[i + 1]
    elseif g[i] == 'pending' then n = g[i + 1] end
  end
  if name == ARGV[1] then last, pending = id, n end
end
if not last then return {-1, 0} end
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if not top[1] or not older(last, top[1][1]) then return {0, pending} end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if older(last, first[1][1]) then
  return {math.min(redis.call('XLEN', KEYS[1]), tonumber(ARGV[2])), pending}
end
return {#redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', tonumber(ARGV[2])), pending}
"""
"""KEYS: frames stream. ARGV: group, cap. Returns {lag (-1: no stream or group), pending}."""


def consumer_name() -> str:
    """Return a unique, stable-per-process consumer name: ``<hostname>-<pid>-<4 hex>``."""
    return f"{socket.gethostname()}-{os.getpid()}-{random.getrandbits(16):04x}"


@dataclass(frozen=True)
class Refusal:
    """Why the read script handed an entry on cut: the dead-letter reason and text, its real size."""

    reason: str
    error: str
    size: int


@dataclass
class StreamEntry:
    """One entry of a frame stream as handed to the worker (``payload`` None: no ``msg`` field).

    An entry the read script refused (``refused`` set) has no ``payload``; ``raw`` holds the first
    :data:`~dfm_stream.wire.DEADLETTER_PAYLOAD_BYTES` of it, all the dead letter keeps.
    """

    camera: str
    entry_id: str
    payload: bytes | None
    raw: bytes = b""
    deliveries: int = 1
    refused: Refusal | None = None

    @property
    def entry_ms(self) -> int:
        """Milliseconds part of the entry id (when Redis accepted the frame)."""
        return int(self.entry_id.split("-", 1)[0])

    @property
    def size(self) -> int:
        """Length of the entry's ``msg`` (without one: of ``raw``), also when it was handed on cut."""
        if self.refused is not None:
            return self.refused.size
        return len(self.payload if self.payload is not None else self.raw)


@dataclass
class ReadResult:
    """What one read pass returned: entries, trimmed gaps and absurd seqs per camera, drained cameras."""

    entries: list[StreamEntry] = field(default_factory=list)
    trimmed: dict[str, int] = field(default_factory=dict)
    seq_anomalies: dict[str, int] = field(default_factory=dict)
    drained: set[str] = field(default_factory=set)


@dataclass
class ClaimResult:
    """Entries reclaimed from idle consumers, and ids that were trimmed while pending (acknowledged)."""

    entries: list[StreamEntry] = field(default_factory=list)
    deleted: dict[str, list[str]] = field(default_factory=dict)


def _entry(camera: str, entry_id: bytes | str, fields: object) -> StreamEntry:
    values: dict[str, bytes] = {}
    if isinstance(fields, dict):
        values = {_s(k): v for k, v in fields.items()}
    elif isinstance(fields, list | tuple):
        values = {_s(fields[i]): fields[i + 1] for i in range(0, len(fields) - 1, 2)}
    payload = values.get(FIELD)
    raw = payload if payload is not None else b"".join(_s(k).encode() + b"=" + v for k, v in values.items())
    return StreamEntry(camera, _s(entry_id), payload, raw)


def _refusal(entry_id: str, kind: str, n: int, size: int, max_bytes: int) -> Refusal:
    """Say why the read script cut an entry: dead-letter reason and text (see :mod:`read_script`)."""
    what = f"frame message of entry {entry_id}"
    if kind == "bytes":
        return Refusal("oversized", f"{what}: {n} bytes, more than the {max_bytes}-byte cap", size)
    if kind == "items":
        error = f"{what}: a msgpack array or map of {n} elements, more than {MAX_FRAME_ITEMS}"
        return Refusal("oversized", error, size)
    return Refusal("bad_message", f"entry {entry_id} has no 'msg' field", size)


def _cut_entry(camera: str, raw_entry: object, refusal: Refusal) -> StreamEntry:
    entry_id, fields = raw_entry[0], raw_entry[1]  # type: ignore[index]
    return StreamEntry(camera, _s(entry_id), None, bytes(fields[1]), refused=refusal)


class StreamConsumer:
    """One worker's view of the frame streams of its cameras (one consumer of one group)."""

    def __init__(
        self,
        client: RedisClient,
        prefix: str = keys.DEFAULT_PREFIX,
        group: str = keys.DEFAULT_GROUP,
        name: str | None = None,
        cluster: bool = False,
        max_frame_bytes: int | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.group = group
        self.name = name or consumer_name()
        self.cluster = cluster
        self.max_frame_bytes = int(max_frame_bytes or frame_bytes_cap())
        self.cameras: list[str] = []
        self._top: dict[str, str] = {}
        self._refused = liveness.Refusals()
        self._rr = 0
        self._read = client.register_script(READ_SCRIPT)
        self._lag = client.register_script(LAG_SCRIPT)

    def add_cameras(self, cameras: list[str]) -> list[str]:
        """Create the group on each new camera's stream (idempotent); return the cameras added.

        A camera whose group cannot be created yet (Redis at ``maxmemory``, see
        :meth:`_create_group`) is left out; the next call tries it again.
        """
        added = []
        for camera in cameras:
            if camera in self.cameras or not self._create_group(camera):
                continue
            self.cameras.append(camera)
            self._top.setdefault(camera, "0-0")
            added.append(camera)
        return added

    def discover(self, cameras: list[str] | None = None, limit: int = DEFAULT_MAX_CAMERAS) -> list[str]:
        """Add ``cameras``, or (None) the registered cameras with a live reader; return those added.

        Discovered cameras (:func:`dfm_stream.liveness.live_cameras`) are followed up to ``limit``
        in all; an invalid id, or one beyond the limit, is refused and logged once.
        """
        if cameras is not None:
            return self.add_cameras(list(cameras))
        new = [c for c in liveness.live_cameras(self.client, self.prefix) if c not in self.cameras]
        good = [c for c in new if keys.valid_name(c)]
        room = max(0, limit - len(self.cameras))
        self._refused.say([c for c in new if not keys.valid_name(c)], "not a valid camera id")
        self._refused.say(
            good[room:], f"this worker follows at most {limit} discovered cameras (--max-cameras)"
        )
        return self.add_cameras(good[:room])

    def ensure_groups(self) -> None:
        """Create the group again on every camera's stream where it is missing (Redis lost its data).

        A camera whose group is missing and cannot be created now (Redis at ``maxmemory``) is
        dropped from :attr:`cameras`, so it cannot stall the others; discovery adds it back later.
        """
        for camera in list(self.cameras):
            if not self._create_group(camera):
                self.remove_camera(camera)

    def _create_group(self, camera: str) -> bool:
        """Make sure the group exists on ``camera``'s stream; False when Redis refuses to create it now.

        ``XGROUP CREATE`` is a ``denyoom`` command: at ``maxmemory`` (``noeviction``) Redis refuses
        it even when the group exists already, while reading, scoring and acknowledging still work.
        So a refusal is checked with ``XINFO GROUPS`` (a read): an existing group is all we need.

        A new group starts right after the camera's last scored frame (a group destroyed and created
        again would otherwise give already scored frames a second score), or at 0 when the stream is
        empty, missing, or newer than that frame (deleted and written again). The camera's gap
        accounting restarts with the group.
        """
        key = keys.frames_key(camera, self.prefix)
        seq = keys.seq_key(camera, self.prefix)
        start = _s(replies.hget(self.client, seq, SCORED_FIELD) or "0")
        newest = replies.xrevrange(self.client, key, count=1) if start != "0" else []
        if not newest or _id_key(_s(newest[0][0])) < _id_key(start):  # nothing stored, or a new stream
            start = "0"
        try:
            self.client.xgroup_create(key, self.group, id=start, mkstream=True)
        except redis.exceptions.OutOfMemoryError as e:
            if self._group_exists(key):
                return True
            log.warning("cannot create consumer group %s on %s yet (%s): retrying later", self.group, key, e)
            return False
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
            return True
        self.client.hdel(seq, "session", "seq", "ms")
        log.info("created consumer group %s on %s at id %s", self.group, key, start)
        return True

    def _group_exists(self, key: str) -> bool:
        try:
            groups = self.client.xinfo_groups(key)
        except redis.ResponseError:  # no such stream
            return False
        return any(_s(g["name"]) == self.group for g in groups)

    def remove_camera(self, camera: str) -> None:
        """Stop reading ``camera`` (its pending entries stay for other consumers to reclaim)."""
        if camera in self.cameras:
            self.cameras.remove(camera)

    def read_camera(self, camera: str, count: int) -> tuple[list[StreamEntry], int, int]:
        """Deliver up to ``count`` new entries of ``camera``; return them, the gaps and the absurd seqs."""
        frames = keys.frames_key(camera, self.prefix)
        seq = keys.seq_key(camera, self.prefix)
        args: list[replies.ScriptArg] = [self.group, self.name, int(count), self.max_frame_bytes]
        reply = self._read(keys=[frames, seq], args=args)
        raw_entries, gaps, top, odd = reply[0], max(0, int(reply[1])), _s(reply[2]), max(0, int(reply[3]))
        self._top[camera] = top
        cut = {
            _s(r[0]): _refusal(_s(r[0]), _s(r[1]), int(r[2]), int(r[3]), self.max_frame_bytes)
            for r in reply[4]
        }
        entries = [
            _cut_entry(camera, e, cut[_s(e[0])]) if _s(e[0]) in cut else _entry(camera, e[0], e[1])
            for e in raw_entries
        ]
        return entries, gaps, odd

    def read(self, count: int, cameras: list[str] | None = None) -> ReadResult:
        """Read up to ``count`` new entries in total, round-robin over ``cameras`` (default all)."""
        result = ReadResult()
        order = list(cameras if cameras is not None else self.cameras)
        if not order:
            return result
        start = self._rr % len(order)
        self._rr += 1
        for camera in order[start:] + order[:start]:
            room = count - len(result.entries)
            if room <= 0:
                break
            entries, gaps, odd = self.read_camera(camera, room)
            if gaps:
                result.trimmed[camera] = gaps
            if odd:
                result.seq_anomalies[camera] = odd
            if not entries:
                result.drained.add(camera)
            result.entries.extend(entries)
        return result

    def wait(self, timeout_ms: int, cameras: list[str] | None = None) -> bool:
        """Block until some camera's stream has an entry newer than the last seen one, or timeout."""
        order = list(cameras if cameras is not None else self.cameras)
        if not order or timeout_ms <= 0:
            return False
        if self.cluster:
            camera = order[self._rr % len(order)]
            streams = {keys.frames_key(camera, self.prefix): self._top.get(camera, "0-0")}
            timeout_ms = min(timeout_ms, 100)
        else:
            streams = {keys.frames_key(c, self.prefix): self._top.get(c, "0-0") for c in order}
        return replies.xread_any(self.client, streams, count=1, block=max(1, int(timeout_ms)))

    def reclaim(
        self,
        min_idle_ms: int,
        count: int = 100,
        exclude: set[str] | None = None,
        cameras: list[str] | None = None,
    ) -> ClaimResult:
        """Claim entries idle longer than ``min_idle_ms`` on ``cameras`` (default all), except ``exclude``.

        ``XPENDING ... IDLE`` lists the idle entries (any owner, this consumer's own included: a frame
        left pending after a failed batch is taken again); those in ``exclude`` (the worker's frames
        in flight) are never touched, so their idle time and delivery count stay as they are.
        ``XAUTOCLAIM`` is not used: it drops every trimmed entry from the group's pending list
        whoever holds it and however short its idle time, which would make a worker's own frames in
        flight look already acknowledged (their scores suppressed as duplicates). The rest go through
        ``XCLAIM``; an id it does not return whose entry is gone from the stream (trimmed while
        pending) is acknowledged and reported in ``deleted``, one it does not return for another
        reason (acknowledged meanwhile) is not. Bounded: at most 100 * ``count`` pending entries per
        camera per pass.
        """
        result = ClaimResult()
        for camera in list(self.cameras if cameras is None else cameras):
            key = keys.frames_key(camera, self.prefix)
            start = "-"
            for _ in range(100):
                rows = replies.xpending_range(
                    self.client, key, self.group, start, count, idle=int(min_idle_ms)
                )
                if not rows:
                    break
                start = "(" + _s(rows[-1]["message_id"])
                wanted = {
                    _s(r["message_id"]): int(r["times_delivered"])
                    for r in rows
                    if not exclude or f"{camera}:{_s(r['message_id'])}" not in exclude
                }
                if wanted:
                    self._claim(camera, key, int(min_idle_ms), wanted, result)
                if len(rows) < count:
                    break
        return result

    def _claim(
        self, camera: str, key: str, min_idle_ms: int, wanted: dict[str, int], result: ClaimResult
    ) -> None:
        got = [
            _entry(camera, i, f)
            for i, f in replies.xclaim(self.client, key, self.group, self.name, min_idle_ms, list(wanted))
        ]
        for entry in got:
            entry.deliveries = wanted.get(entry.entry_id, 1) + 1
        result.entries.extend(got)
        missing = set(wanted) - {e.entry_id for e in got}
        if not missing:
            return
        pipe = self.client.pipeline(transaction=False)
        ordered = sorted(missing, key=_id_key)
        for entry_id in ordered:
            pipe.xrange(key, entry_id, entry_id, count=1)
        gone = [i for i, rows in zip(ordered, pipe.execute(), strict=True) if not rows]
        if gone:  # Redis 7 dropped them from the pending list already; 6.2 claimed them for us
            self.client.xack(key, self.group, *gone)
            result.deleted.setdefault(camera, []).extend(gone)

    def ack(self, camera: str, entry_ids: list[str]) -> int:
        """Acknowledge entries of ``camera`` (used for dead letters and trimmed ids; scores ack in Lua)."""
        if not entry_ids:
            return 0
        return int(self.client.xack(keys.frames_key(camera, self.prefix), self.group, *entry_ids))

    def group_stats(self) -> dict[str, tuple[int, int]]:
        """Return ``camera -> (lag, pending)`` of this group (lag: entries not yet delivered to it).

        The lag is counted by :data:`LAG_SCRIPT`, not taken from ``XINFO GROUPS`` (Redis 6.2 has
        no ``lag`` there, and Redis 7.0 leaves it too high for good once entries were trimmed
        before the group read them). It is at most :data:`LAG_COUNT_CAP`; a camera whose stream
        or group does not exist (yet) is left out.
        """
        out: dict[str, tuple[int, int]] = {}
        for camera in list(self.cameras):
            lag, pending = self._lag(
                keys=[keys.frames_key(camera, self.prefix)], args=[self.group, LAG_COUNT_CAP]
            )
            if int(lag) >= 0:
                out[camera] = (int(lag), int(pending))
        return out

    def heartbeat(self, ttl_s: int = 30) -> bool:
        """Refresh this worker's heartbeat key (it expires ``ttl_s`` after the worker dies).

        Returns False, with a warning, when Redis refuses the write (``maxmemory``, a read-only
        replica, an ACL): the heartbeat is for observers, and scoring must not depend on it.
        Connection errors still raise (the worker reconnects).
        """
        try:
            self.client.set(keys.worker_heartbeat_key(self.name, self.prefix), b"1", ex=ttl_s)
        except redis.ResponseError as e:
            log.warning("could not refresh the heartbeat of worker %s: %s", self.name, e)
            return False
        return True


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)

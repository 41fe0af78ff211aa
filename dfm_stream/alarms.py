"""Alarms per camera: a small state machine kept in Redis, its events, and the overlay image.

The state lives in the camera's hash ``{prefix}:{camera}:alarm`` and is stepped inside the same Lua
script that acknowledges a frame and publishes its score (see :mod:`dfm_stream.publisher`), so it
survives worker restarts, follows a camera that moves to another worker, and stays consistent with
several workers scoring one camera. Rules (:class:`AlarmsConfig`):

* **raise** on an anomalous frame when at least ``k`` of the last ``n`` scored frames are anomalous
  and the alarm is not active, unless a clear happened less than ``cooldown_s`` ago;
* it **stays active** while anomalous frames keep coming;
* **clear** after ``clear_after`` consecutive normal frames.

Frames are stepped in the order their scores are published (stream order for one worker; with
several workers on one camera, the order in which their batches were published). Skipped (stale)
frames do not step the machine. The hash fields: ``active`` (0/1), ``window`` (last n results as
``0``/``1``), ``normal_run``, ``raised_ms``, ``cleared_ms``.

Events (``raised``/``cleared``) are XADDed to ``{prefix}:alarms`` and PUBLISHed on the channel of
the same name *after* the script ran (they are in another cluster slot): a worker that dies in
between loses that one event, never the state.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from dfm_stream import keys, replies
from dfm_stream.connect import RedisClient
from dfm_stream.wire import FIELD, EventMsg

log = logging.getLogger(__name__)

EVENTS_MAXLEN = 10_000
MAX_IMAGE_BYTES = 64 * 1024
_MAX_SIDE = 512


ALARM_LUA = """
local st = redis.call('HMGET', KEYS[3], 'active', 'window', 'normal_run', 'raised_ms', 'cleared_ms')
local active = st[1] == '1'
local window = st[2] or ''
local normal_run = tonumber(st[3] or '0')
local raised_ms = tonumber(st[4] or '-1')
local cleared_ms = tonumber(st[5] or '-1')
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ak, an, aclear, acool = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local alarm_changed = false
local function alarm_step(bit, id)
  alarm_changed = true
  window = string.sub(window .. bit, -an)
  local _, count = string.gsub(window, '1', '')
  if bit == '1' then normal_run = 0 else normal_run = normal_run + 1 end
  if not active then
    if bit == '1' and count >= ak and (cleared_ms < 0 or now_ms - cleared_ms >= acool) then
      active = true
      raised_ms = now_ms
      table.insert(transitions, {'raised', id, now_ms})
    end
  elseif normal_run >= aclear then
    active = false
    cleared_ms = now_ms
    table.insert(transitions, {'cleared', id, raised_ms})
  end
end
local function alarm_save()
  if alarm_changed then
    redis.call('HSET', KEYS[3], 'active', active and '1' or '0', 'window', window,
               'normal_run', normal_run, 'raised_ms', raised_ms, 'cleared_ms', cleared_ms)
  end
  return active and 1 or 0
end
"""
"""The alarm step used by the publish script (KEYS[3] = alarm hash; ARGV[3..6] = k, n, clear, cooldown_ms)."""


def alarm_state(client: RedisClient, camera: str, prefix: str = keys.DEFAULT_PREFIX) -> dict[str, str]:
    """Return the stored alarm state of ``camera`` (empty when it never scored a frame)."""
    raw = replies.hgetall(client, keys.alarm_state_key(camera, prefix))
    return {k.decode(): v.decode() for k, v in raw.items()}


def publish_event(
    client: RedisClient, event: EventMsg, prefix: str = keys.DEFAULT_PREFIX, maxlen: int = EVENTS_MAXLEN
) -> str:
    """XADD ``event`` to the alarm stream (MAXLEN ~) and PUBLISH it on the alarm channel; return its id."""
    data = event.to_bytes()
    entry_id = client.xadd(keys.alarms_key(prefix), {FIELD: data}, maxlen=maxlen, approximate=True)
    client.publish(keys.alarms_channel(prefix), data)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def overlay_jpeg(rgb: np.ndarray, anomaly_map: np.ndarray | None, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Return a JPEG (<= ``max_bytes``) of the frame, with the anomaly map blended over it when given.

    The map is min-max scaled per frame and drawn with a JET colour map at 45 % opacity; quality and
    then size are lowered until the JPEG fits.
    """
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    h, w = bgr.shape[:2]
    scale = min(1.0, _MAX_SIDE / max(h, w))
    if scale < 1.0:
        bgr = cv2.resize(
            bgr, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
        )
    if anomaly_map is not None:
        amap = cv2.resize(np.asarray(anomaly_map, np.float32), (bgr.shape[1], bgr.shape[0]))
        lo, hi = float(amap.min()), float(amap.max())
        norm = np.zeros_like(amap) if hi <= lo else (amap - lo) / (hi - lo)
        heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
        bgr = cv2.addWeighted(bgr, 0.55, heat, 0.45, 0)
    quality = 85
    while True:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok and len(buf) <= max_bytes:
            return buf.tobytes()
        if quality > 40:
            quality -= 15
        elif min(bgr.shape[:2]) > 16:
            bgr = cv2.resize(bgr, (max(8, bgr.shape[1] * 7 // 10), max(8, bgr.shape[0] * 7 // 10)))
        else:
            return buf.tobytes()

"""The Lua script that delivers a camera's new frames to a consumer and counts ``seq`` gaps.

One camera per call (cluster safe: the frame stream and the seq hash share the ``{camera}`` hash
tag). How it is used, and why the accounting is exact, is told in :mod:`dfm_stream.consumer`; the
constants below bound the work the script does per entry, whatever the entry holds, and what it
sends back of an entry the worker would only dead-letter.

Such an entry is returned with its fields replaced by what the dead letter keeps, the first
:data:`~dfm_stream.wire.DEADLETTER_PAYLOAD_BYTES` of the ``msg`` bytes (for an entry without
``msg``, of its fields as ``name=value`` run together), and listed in the reply's refusals as
``{id, kind, n, bytes}`` (``bytes``: the length of what was cut), where ``kind`` and ``n`` say why:

* ``bytes``: ``msg`` has ``n`` bytes, more than the ``max_frame_bytes`` argument;
* ``items``: the scan met a msgpack array or map of ``n`` elements (pairs for a map), more than
  :data:`~dfm_stream.wire.MAX_FRAME_ITEMS` and no more than the message's length (the rule of
  :meth:`~dfm_stream.wire.FrameMsg.from_bytes`, so the worker would refuse it as ``oversized``);
* ``no_msg``: the entry has no ``msg`` field; ``n`` is the length of its fields run together.

So a camera that writes padded entries costs the worker and the network a bounded prefix per
entry, not the entry (Redis still copies it once into the script).
"""

from dfm_stream.wire import DEADLETTER_PAYLOAD_BYTES, MAX_FRAME_ITEMS

SCAN_MAX_ITEMS = 1000
"""Most msgpack items the read script looks at per entry to find ``seq``/``session`` (bounded work)."""
SCAN_MAX_STR = 256
"""Longest string prefix the read script copies out of a payload (keys, ``session``)."""
SEQ_MAX = 2**53
"""``seq`` at or above this is absurd (not exact in Lua's numbers): counted, never used for gaps."""
GAP_PER_MS = 100
"""Most frames a camera can have lost per millisecond between two delivered entries (100k/s)."""
GAP_SLACK = 1000
"""Frames allowed on top of :data:`GAP_PER_MS` (entry ids have millisecond resolution)."""

READ_SCRIPT = (
    f"""
local MAX_ITEMS, MAX_STR, SEQ_MAX = {SCAN_MAX_ITEMS}, {SCAN_MAX_STR}, {SEQ_MAX}
local GAP_PER_MS, GAP_SLACK = {GAP_PER_MS}, {GAP_SLACK}
local MAX_LEN, PREFIX = {MAX_FRAME_ITEMS}, {DEADLETTER_PAYLOAD_BYTES}
"""
    + """
local steps, huge = 0, nil
local mp_read
local function mp_skip_items(s, p, count, depth, n)
  if n > MAX_LEN and n <= #s then huge = huge or n end
  if depth > 16 or count > steps then return nil end
  for _ = 1, count do
    local v
    v, p = mp_read(s, p, depth + 1)
    if v == nil then return nil end
  end
  return false, p
end
mp_read = function(s, p, depth)
  depth = depth or 0
  steps = steps - 1
  if steps < 0 then return nil end
  local t = string.byte(s, p)
  if not t then return nil end
  if t <= 0x7f then return t, p + 1 end
  if t >= 0x80 and t <= 0x8f then return mp_skip_items(s, p + 1, 2 * (t - 0x80), depth, 0) end
  if t >= 0x90 and t <= 0x9f then return mp_skip_items(s, p + 1, t - 0x90, depth, 0) end
  if t == 0xdc or t == 0xde or t == 0xdd or t == 0xdf then
    local h = (t == 0xdc or t == 0xde) and 2 or 4
    if #s < p + h then return nil end
    local n = struct.unpack(h == 2 and '>I2' or '>I4', s, p + 1)
    return mp_skip_items(s, p + 1 + h, (t == 0xde or t == 0xdf) and 2 * n or n, depth, n)
  end
  local fixext = {[0xd4] = 3, [0xd5] = 4, [0xd6] = 6, [0xd7] = 10, [0xd8] = 18}
  if fixext[t] then return false, p + fixext[t] end
  if t == 0xc7 then return false, p + 3 + string.byte(s, p + 1) end
  if t == 0xc8 then return false, p + 4 + struct.unpack('>I2', s, p + 1) end
  if t == 0xc9 then return false, p + 6 + struct.unpack('>I4', s, p + 1) end
  if t >= 0xe0 then return t - 256, p + 1 end
  if t >= 0xa0 and t <= 0xbf then return string.sub(s, p + 1, p + t - 0xa0), p + 1 + t - 0xa0 end
  if t == 0xc0 or t == 0xc2 or t == 0xc3 then return false, p + 1 end
  if t == 0xcc then return string.byte(s, p + 1), p + 2 end
  if t == 0xcd then return (struct.unpack('>I2', s, p + 1)), p + 3 end
  if t == 0xce then return (struct.unpack('>I4', s, p + 1)), p + 5 end
  if t == 0xcf then
    local hi, lo = struct.unpack('>I4I4', s, p + 1)
    return hi * 4294967296 + lo, p + 9
  end
  local fixed = {[0xd0] = 2, [0xd1] = 3, [0xd2] = 5, [0xd3] = 9, [0xca] = 5, [0xcb] = 9}
  if fixed[t] then return false, p + fixed[t] end
  local l, h
  if t == 0xd9 or t == 0xc4 then l, h = string.byte(s, p + 1), 2
  elseif t == 0xda or t == 0xc5 then l, h = struct.unpack('>I2', s, p + 1), 3
  elseif t == 0xdb or t == 0xc6 then l, h = struct.unpack('>I4', s, p + 1), 5
  else return nil end
  if not l then return nil end
  if t == 0xc4 or t == 0xc5 or t == 0xc6 then return false, p + h + l end
  return string.sub(s, p + h, p + h + math.min(l, MAX_STR) - 1), p + h + l
end
local function frame_seq(s)
  local b = string.byte(s, 1)
  local n, p
  if not b then return nil end
  if b >= 0x80 and b <= 0x8f then n, p = b - 0x80, 2
  elseif (b == 0xde and #s >= 3) or (b == 0xdf and #s >= 5) then
    local h = b == 0xde and 2 or 4
    n, p = struct.unpack(h == 2 and '>I2' or '>I4', s, 2), 2 + h
    if n > MAX_LEN and n <= #s then huge = n end
  else
    mp_read(s, 1)
    return nil
  end
  local seq, session, broken = nil, nil, false
  for _ = 1, math.min(n, MAX_ITEMS) do
    local k, v
    k, p = mp_read(s, p)
    if k ~= nil then v, p = mp_read(s, p) end
    if k == nil or v == nil or huge then broken = true break end
    if k == 'seq' then seq = v elseif k == 'session' then session = v end
  end
  if broken and not (seq and session) then return nil end
  if type(seq) ~= 'number' or seq < 0 then return nil end
  if type(session) ~= 'string' then session = '' end
  return seq, session
end
local function scan(s)
  steps, huge = MAX_ITEMS, nil
  local ok, seq, session = pcall(frame_seq, s)
  if not ok then return nil, nil, huge end
  return seq, session, huge
end
local function fields_prefix(fields)
  local out, room = {}, PREFIX
  for i = 1, #fields, 2 do
    if room <= 0 then break end
    local piece = string.sub(fields[i], 1, room)
    if #piece < room then piece = piece .. '=' .. string.sub(fields[i + 1], 1, room - #piece - 1) end
    out[#out + 1], room = piece, room - #piece
  end
  return table.concat(out)
end
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[3]),
                     'STREAMS', KEYS[1], '>')
if not r then
  local top = '0-0'
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local name, id = nil, nil
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then id = g[i + 1] end
    end
    if name == ARGV[1] and id then top = id end
  end
  return {{}, 0, top, 0, {}}
end
local entries = r[1][2]
local max_bytes = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[2], 'session', 'seq', 'ms')
local session, last, last_ms = state[1], tonumber(state[2]), tonumber(state[3])
local gaps, odd, refused = 0, 0, {}
for _, e in ipairs(entries) do
  local fields = e[2]
  local payload, size = nil, 0
  for i = 1, #fields, 2 do
    size = size + #fields[i] + #fields[i + 1] + 1
    if fields[i] == 'msg' then payload = fields[i + 1] end
  end
  local seq, s, huge = nil, nil, nil
  if payload and #payload <= max_bytes then seq, s, huge = scan(payload) end
  local kind, n = nil, nil
  if not payload then kind, n = 'no_msg', size
  elseif #payload > max_bytes then kind, n = 'bytes', #payload
  elseif huge then kind, n = 'items', huge end
  if kind then
    refused[#refused + 1] = {e[1], kind, n, payload and #payload or size}
    e[2] = {'prefix', payload and string.sub(payload, 1, PREFIX) or fields_prefix(fields)}
    seq = nil
  end
  if seq then
    local ms = tonumber(string.match(e[1], '^(%d+)'))
    if seq >= SEQ_MAX then
      odd, session = odd + 1, false
    elseif s ~= session or not last then
      session, last, last_ms = s, seq, ms
    else
      local gap = seq - last - 1
      if gap < 0 or gap > GAP_PER_MS * math.max(0, ms - (last_ms or ms)) + GAP_SLACK then
        odd = odd + 1
      else
        gaps = gaps + gap
      end
      last, last_ms = seq, ms
    end
  end
end
if session and last then
  redis.call('HSET', KEYS[2], 'session', session, 'seq', last)
  if last_ms then redis.call('HSET', KEYS[2], 'ms', last_ms) end
elseif state[1] then
  redis.call('HDEL', KEYS[2], 'session', 'seq', 'ms')
end
return {entries, gaps, entries[#entries][1], odd, refused}
"""
)
"""KEYS: frames stream, seq hash. ARGV: group, consumer, count, max payload bytes.

Returns {entries, trimmed gaps, last id (when none: the group's last-delivered id), odd seqs,
refusals ({id, kind, n, bytes} per entry returned cut, see above)}."""

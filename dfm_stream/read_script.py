"""The Lua script that delivers a camera's new frames to a consumer and counts ``seq`` gaps.

One camera per call (cluster safe: the frame stream and the seq hash share the ``{camera}`` hash
tag). How it is used, and why the accounting is exact, is told in :mod:`dfm_stream.consumer`; the
constants below bound the work the script does per entry, whatever the entry holds.
"""

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
"""
    + """
local steps = 0
local mp_read
local function mp_skip_items(s, p, count, depth)
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
  if t >= 0x80 and t <= 0x8f then return mp_skip_items(s, p + 1, 2 * (t - 0x80), depth) end
  if t >= 0x90 and t <= 0x9f then return mp_skip_items(s, p + 1, t - 0x90, depth) end
  if t == 0xdc then return mp_skip_items(s, p + 3, struct.unpack('>I2', s, p + 1), depth) end
  if t == 0xdd then return mp_skip_items(s, p + 5, struct.unpack('>I4', s, p + 1), depth) end
  if t == 0xde then return mp_skip_items(s, p + 3, 2 * struct.unpack('>I2', s, p + 1), depth) end
  if t == 0xdf then return mp_skip_items(s, p + 5, 2 * struct.unpack('>I4', s, p + 1), depth) end
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
  steps = MAX_ITEMS
  local b = string.byte(s, 1)
  local n, p
  if not b then return nil end
  if b >= 0x80 and b <= 0x8f then n, p = b - 0x80, 2
  elseif b == 0xde then n, p = struct.unpack('>I2', s, 2), 4
  elseif b == 0xdf then n, p = struct.unpack('>I4', s, 2), 6
  else return nil end
  local seq, session = nil, nil
  for _ = 1, math.min(n, MAX_ITEMS) do
    local k, v
    k, p = mp_read(s, p)
    if k == nil then return nil end
    v, p = mp_read(s, p)
    if v == nil then return nil end
    if k == 'seq' then seq = v elseif k == 'session' then session = v end
    if seq and session then break end
  end
  if type(seq) ~= 'number' or seq < 0 then return nil end
  if type(session) ~= 'string' then session = '' end
  return seq, session
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
  return {{}, 0, top, 0}
end
local entries = r[1][2]
local max_bytes = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[2], 'session', 'seq', 'ms')
local session, last, last_ms = state[1], tonumber(state[2]), tonumber(state[3])
local gaps, odd = 0, 0
for _, e in ipairs(entries) do
  local fields = e[2]
  local payload = nil
  for i = 1, #fields, 2 do
    if fields[i] == 'msg' then payload = fields[i + 1] end
  end
  local ok, seq, s = false, nil, nil
  if payload and #payload <= max_bytes then ok, seq, s = pcall(frame_seq, payload) end
  if ok and seq then
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
return {entries, gaps, entries[#entries][1], odd}
"""
)
"""KEYS: frames stream, seq hash. ARGV: group, consumer, count, max payload bytes.

Returns {entries, trimmed gaps, last id (when none: the group's last-delivered id), odd seqs}."""

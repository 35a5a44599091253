"""Lua scripts of the Redis directory. Each runs atomically on the namespace's node.

A block record is a hash: fields ``"<instance>|<tier>"`` map to a deadline in Redis
server milliseconds (so instance clocks do not matter), plus ``"sz"`` (page bytes,
set by the first ``record_store``). A location is live while its deadline is in the
future; expired fields are deleted when a script meets them and the whole record
carries a TTL, so a dead instance's locations vanish on their own.

"Usable by me" means: a live location of my own instance, or a live location in one
of my shared tiers, written by any instance. Conventions: ARGV[1] = my instance id,
ARGV[2] = my shared tiers joined by ",", ARGV[3] = entry TTL in ms. Commands that
may meet a foreign-typed key use ``redis.pcall``: a broken record reads as a miss
instead of failing the whole batch.
"""

from __future__ import annotations

_PRELUDE = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function csv_set(csv)
  local set = {}
  for item in string.gmatch(csv, '[^,]+') do set[item] = true end
  return set
end

local function split_field(field)
  local bar = string.find(field, '|', 1, true)
  if not bar then return nil, nil end
  return string.sub(field, 1, bar - 1), string.sub(field, bar + 1)
end

-- Make sure `key` lives at least `ttl` ms more (PTTL is -1 without a TTL).
local function keep_alive(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end

local function int(x)
  return string.format('%d', x)
end

-- Usable tiers of one record (a table tier -> true) and whether there is any.
-- Deletes expired fields; with `refresh`, renews usable deadlines past half-life.
local function usable(key, me, shared, now, ttl, refresh)
  local flat = redis.pcall('HGETALL', key)
  local tiers, found = {}, false
  if type(flat) ~= 'table' or flat.err then return tiers, false end
  local expired, renewed = {}, false
  for i = 1, #flat, 2 do
    local inst, tier = split_field(flat[i])
    if inst then
      local deadline = tonumber(flat[i + 1]) or 0
      if deadline <= now then
        expired[#expired + 1] = flat[i]
      elseif inst == me or shared[tier] then
        tiers[tier] = true
        found = true
        if refresh and deadline - now < ttl / 2 then
          redis.call('HSET', key, flat[i], int(now + ttl))
          renewed = true
        end
      end
    end
  end
  if #expired > 0 then redis.call('HDEL', key, unpack(expired)) end
  if renewed then keep_alive(key, ttl) end
  return tiers, found
end

local function has_location(key)
  local fields = redis.pcall('HKEYS', key)
  if type(fields) ~= 'table' or fields.err then return false end
  for _, f in ipairs(fields) do
    if string.find(f, '|', 1, true) then return true end
  end
  return false
end

-- Drop locations: tier '' = all of mine; else that tier's (everyone's if shared).
-- A record left without locations is deleted (with its "sz"). True if any dropped.
local function drop(key, me, tier, everyone)
  local fields = redis.pcall('HKEYS', key)
  if type(fields) ~= 'table' or fields.err then return false end
  local doomed = {}
  for _, f in ipairs(fields) do
    local inst, t = split_field(f)
    if inst and ((tier == '' and inst == me) or (t == tier and (everyone or inst == me))) then
      doomed[#doomed + 1] = f
    end
  end
  if #doomed == 0 then return false end
  redis.call('HDEL', key, unpack(doomed))
  if not has_location(key) then redis.call('DEL', key) end
  return true
end
"""

# KEYS: block records in prefix order. Returns how many leading ones are usable.
LOOKUP = _PRELUDE + r"""
local me, shared, ttl = ARGV[1], csv_set(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
for i, key in ipairs(KEYS) do
  local _, found = usable(key, me, shared, now, ttl, true)
  if not found then return i - 1 end
end
return #KEYS
"""

# KEYS: block records. Returns, per key, its usable tiers joined by ",".
TIERS = _PRELUDE + r"""
local me, shared, ttl = ARGV[1], csv_set(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local out = {}
for i, key in ipairs(KEYS) do
  local tiers = usable(key, me, shared, now, ttl, false)
  local names = {}
  for tier in pairs(tiers) do names[#names + 1] = tier end
  table.sort(names)
  out[i] = table.concat(names, ',')
end
return out
"""

# KEYS[1]: one block record. Returns its live fields "<instance>|<tier>" (any instance).
LOCATIONS = _PRELUDE + r"""
local flat = redis.pcall('HGETALL', KEYS[1])
local out = {}
if type(flat) ~= 'table' or flat.err then return out end
local now = now_ms()
for i = 1, #flat, 2 do
  if split_field(flat[i]) and (tonumber(flat[i + 1]) or 0) > now then
    out[#out + 1] = flat[i]
  end
end
return out
"""

# KEYS: block records. ARGV[1] = field "<instance>|<tier>", ARGV[2] = TTL ms.
ADD = _PRELUDE + r"""
local field, ttl = ARGV[1], tonumber(ARGV[2])
local deadline = int(now_ms() + ttl)
for _, key in ipairs(KEYS) do
  if type(redis.pcall('HSET', key, field, deadline)) == 'number' then keep_alive(key, ttl) end
end
return #KEYS
"""

# KEYS: block records. ARGV[1] = me, ARGV[2] = tier ('' = all mine), ARGV[3] = '1' if
# the tier is shared. Returns how many records lost a location.
REMOVE = _PRELUDE + r"""
local removed = 0
for _, key in ipairs(KEYS) do
  if drop(key, ARGV[1], ARGV[2], ARGV[3] == '1') then removed = removed + 1 end
end
return removed
"""

# KEYS: (block record, lease) pairs. Same ARGV as REMOVE. Drops the tier's locations
# of unleased blocks only; returns the 1-based pair indexes it collected.
COLLECT = _PRELUDE + r"""
local out = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    drop(KEYS[i], ARGV[1], ARGV[2], ARGV[3] == '1')
    out[#out + 1] = (i + 1) / 2
  end
end
return out
"""

# KEYS: (block record, lease) pairs in prefix order. ARGV[1..3] as LOOKUP, ARGV[4] =
# lease TTL ms. Leases the leading usable blocks; returns how many.
ACQUIRE_LEASE = _PRELUDE + r"""
local me, shared, ttl, lease_ttl = ARGV[1], csv_set(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
for i = 1, #KEYS, 2 do
  local _, found = usable(KEYS[i], me, shared, now, ttl, true)
  if not found then return (i - 1) / 2 end
  if type(redis.pcall('HINCRBY', KEYS[i + 1], me, 1)) ~= 'number' then return (i - 1) / 2 end
  keep_alive(KEYS[i + 1], lease_ttl)
end
return #KEYS / 2
"""

# KEYS: leases. ARGV[1] = me. Drops one reference of mine from each.
RELEASE_LEASE = r"""
for _, key in ipairs(KEYS) do
  local n = redis.pcall('HINCRBY', key, ARGV[1], -1)
  if type(n) == 'number' and n <= 0 then
    redis.call('HDEL', key, ARGV[1])
    if redis.call('HLEN', key) == 0 then redis.call('DEL', key) end
  end
end
return #KEYS
"""

# KEYS: block records, then the stats hash last. ARGV[1] = page bytes, ARGV[2] = TTL ms.
# A block is physical when its record had neither "sz" nor a location; every block
# is logical. Returns the number of physical blocks.
RECORD_STORE = _PRELUDE + r"""
local nbytes, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local stats = KEYS[#KEYS]
local physical = 0
for i = 1, #KEYS - 1 do
  local fresh = not has_location(KEYS[i])
  if redis.pcall('HSETNX', KEYS[i], 'sz', ARGV[1]) == 1 then
    keep_alive(KEYS[i], ttl)
    if fresh then physical = physical + 1 end
  end
end
local logical = #KEYS - 1
redis.call('HINCRBY', stats, 'logical_blocks', logical)
redis.call('HINCRBY', stats, 'logical_bytes', int(logical * nbytes))
redis.call('HINCRBY', stats, 'physical_blocks', physical)
redis.call('HINCRBY', stats, 'physical_bytes', int(physical * nbytes))
return physical
"""

"""Lua scripts of the Redis page tier: a fleet-wide byte budget with LRU eviction.

Per namespace (all in the namespace's hash slot, see ``redis_keys.py``):
``page:<member>`` holds one page value, the ``lru`` sorted set scores each member
(``<chain-hex>.r<rank>``) by last use in server milliseconds, ``pagesz`` records the
bytes each member was charged, and ``used`` is their sum. Scripts keep the four
consistent; charging recorded sizes (not STRLEN at delete time) keeps ``used`` exact
even when a value is damaged or replaced behind symram's back. Eviction skips
blocks with a directory lease (``lease:<chain-hex>``), so a page another instance
has been promised stays until the lease ends. Victim keys are built inside the
scripts from the namespace prefix: they share the hash tag, so they live on the
same Cluster node.

Bookkeeping keys of the wrong type (a hand edit, another program writing into the
namespace: ``lru`` turned into a hash) would make every script fail with WRONGTYPE
and switch the tier off until a person deleted them. So every script first checks the
three types (one TYPE each, microseconds) and ``repair`` rebuilds what is wrong from
the page keys themselves (one SCAN of the namespace, rare): sizes from STRLEN, the LRU
with every page as recent as now, ``used`` as the sum of sizes. Scripts return how
many keys they repaired, and the tier counts it.
"""

from __future__ import annotations

_PRELUDE = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function charged(sizes, member)
  return tonumber(redis.call('HGET', sizes, member)) or 0
end

local function get_used(key)
  return tonumber(redis.pcall('GET', key)) or 0
end

local function set_used(key, n)
  if n < 0 then n = 0 end
  redis.call('SET', key, string.format('%d', n))
end

local function type_ok(key, want)
  local t = redis.call('TYPE', key)['ok']
  return t == 'none' or t == want
end

-- Reset bookkeeping keys of the wrong type and rebuild them from the page keys.
-- Returns the number of keys that were of the wrong type (0: nothing done).
local function repair(prefix, lru, sizes, used_key)
  local bad = 0
  local bad_lru = not type_ok(lru, 'zset')
  local bad_sizes = not type_ok(sizes, 'hash')
  if bad_lru then redis.call('DEL', lru); bad = bad + 1 end
  if bad_sizes then redis.call('DEL', sizes); bad = bad + 1 end
  if not type_ok(used_key, 'string') then redis.call('DEL', used_key); bad = bad + 1 end
  if bad == 0 then return 0 end
  local now = now_ms()
  local pattern = string.gsub(prefix, '([%*%?%[%]\\])', '\\%1') .. 'page:*'
  local first = string.len(prefix) + 6
  local seen = {}
  local cursor = '0'
  repeat
    local reply = redis.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 1000)
    cursor = reply[1]
    for _, k in ipairs(reply[2]) do
      local member = string.sub(k, first)
      if redis.call('TYPE', k)['ok'] == 'string' then
        seen[member] = true
        if redis.call('HEXISTS', sizes, member) == 0 then
          redis.call('HSET', sizes, member, redis.call('STRLEN', k))
        end
        redis.call('ZADD', lru, 'NX', now, member)
      else
        redis.call('DEL', k)
      end
    end
  until cursor == '0'
  local total = 0
  local recorded = redis.call('HGETALL', sizes)
  for i = 1, #recorded, 2 do
    if seen[recorded[i]] then
      total = total + (tonumber(recorded[i + 1]) or 0)
    else
      redis.call('HDEL', sizes, recorded[i])
      redis.call('ZREM', lru, recorded[i])
    end
  end
  set_used(used_key, total)
  return bad
end
"""

# KEYS: page, lru, used, pagesz. ARGV: value, member, capacity, prefix, max victims
# scanned. Returns {stored (0/1), keys repaired, evicted member...}.
SET_PAGE = _PRELUDE + r"""
local page, lru, used_key, sizes = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local value, member, capacity = ARGV[1], ARGV[2], tonumber(ARGV[3])
local prefix, max_scan = ARGV[4], tonumber(ARGV[5])
local repaired = repair(prefix, lru, sizes, used_key)
local size = string.len(value)
if size > capacity then return {0, repaired} end
local mine = charged(sizes, member)
local used = get_used(used_key) - mine
local evicted, skipped, scanned = {}, 0, 0
while used + size > capacity and scanned < max_scan do
  local batch = redis.call('ZRANGE', lru, skipped, skipped + 31)
  if #batch == 0 then break end
  for _, victim in ipairs(batch) do
    if used + size <= capacity or scanned >= max_scan then break end
    scanned = scanned + 1
    local chain = string.match(victim, '^(%x+)%.r%d+$')
    if victim == member or (chain and redis.call('EXISTS', prefix .. 'lease:' .. chain) == 1) then
      skipped = skipped + 1
    else
      used = used - charged(sizes, victim)
      redis.call('DEL', prefix .. 'page:' .. victim)
      redis.call('ZREM', lru, victim)
      redis.call('HDEL', sizes, victim)
      evicted[#evicted + 1] = victim
    end
  end
end
-- Nothing left to account for: whatever `used` says is drift (pages deleted by hand).
if redis.call('ZCARD', lru) == 0 then
  used = 0
  redis.call('DEL', sizes)
end
if used + size > capacity then
  set_used(used_key, used + mine)
  return {0, repaired, unpack(evicted)}
end
redis.call('DEL', page)
redis.call('SET', page, value)
redis.call('ZADD', lru, now_ms(), member)
redis.call('HSET', sizes, member, size)
set_used(used_key, used + size)
return {1, repaired, unpack(evicted)}
"""

# KEYS: page, lru, used, pagesz. ARGV: member, prefix. Returns {keys repaired, the value
# or nil}; a hit refreshes its LRU score.
GET_PAGE = _PRELUDE + r"""
local repaired = repair(ARGV[2], KEYS[2], KEYS[4], KEYS[3])
local value = redis.pcall('GET', KEYS[1])
if type(value) ~= 'string' then return {repaired} end
redis.call('ZADD', KEYS[2], 'XX', now_ms(), ARGV[1])
return {repaired, value}
"""

# KEYS: page, lru, used, pagesz. ARGV: member, prefix. Returns {1 if a page was deleted,
# keys repaired}.
DELETE_PAGE = _PRELUDE + r"""
local repaired = repair(ARGV[2], KEYS[2], KEYS[4], KEYS[3])
local n = charged(KEYS[4], ARGV[1])
local existed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
set_used(KEYS[3], get_used(KEYS[3]) - n)
return {existed, repaired}
"""

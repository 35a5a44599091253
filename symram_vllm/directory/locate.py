"""Fleet-wide prefix lookup for routing: which instance holds how much of a prompt.

One read-only Lua script per namespace answers, for every named instance, the
leading run of a prompt's blocks it holds in DRAM, on its disk, and in any of its
tiers (the three numbers an engine's control endpoint answers). The gateway sends
one such script per model namespace in one pipeline: one round trip, whatever the
number of engines. Nothing here imports torch or vLLM (the gateway uses it).

Only an instance's *own* locations count: the shared tiers (the Redis page tier,
other engines' disk slots) are equally reachable by every engine, so they do not
make one engine a better route than another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from symram_vllm.directory.redis_scripts import _PRELUDE
from symram_vllm.redis_keys import RedisKeys, check_name, normalize_namespace

# KEYS: block records in prefix order. ARGV: instance ids. Returns, per instance,
# dram, disk, any (flattened). Stops at the first block no instance holds.
LOCATE = _PRELUDE + r"""
local now = now_ms()
local n = #ARGV
local dram, disk, any, open_d, open_k, open_a = {}, {}, {}, {}, {}, {}
for j = 1, n do
  dram[j], disk[j], any[j] = 0, 0, 0
  open_d[j], open_k[j], open_a[j] = true, true, true
end
for _, key in ipairs(KEYS) do
  local flat = redis.pcall('HGETALL', key)
  if type(flat) ~= 'table' or flat.err then break end
  local has = {}
  for f = 1, #flat, 2 do
    local inst, tier = split_field(flat[f])
    if inst and (tonumber(flat[f + 1]) or 0) > now then
      local h = has[inst] or {}
      has[inst] = h
      h.any = true
      if tier == 'dram' then h.dram = true end
      if tier == 'disk' or string.sub(tier, 1, 5) == 'disk.' then h.disk = true end
    end
  end
  local still = false
  for j = 1, n do
    local h = has[ARGV[j]]
    if open_a[j] then
      if h then any[j] = any[j] + 1; still = true else open_a[j] = false end
    end
    if open_d[j] then
      if h and h.dram then dram[j] = dram[j] + 1 else open_d[j] = false end
    end
    if open_k[j] then
      if h and h.disk then disk[j] = disk[j] + 1 else open_k[j] = false end
    end
  end
  if not still then break end
end
local out = {}
for j = 1, n do
  out[#out + 1] = dram[j]
  out[#out + 1] = disk[j]
  out[#out + 1] = any[j]
end
return out
"""
LOCATE_SHA = hashlib.sha1(LOCATE.encode()).hexdigest()


@dataclass(frozen=True)
class LocateCommand:
    """One namespace's script call: EVALSHA LOCATE_SHA len(keys) *keys *instances."""

    keys: list[str]
    instances: list[str]

    def args(self) -> list[str | int]:
        return ["EVALSHA", LOCATE_SHA, len(self.keys), *self.keys, *self.instances]


def locate_command(
    namespace: bytes | str, chain_keys: Sequence[bytes], instances: Sequence[str]
) -> LocateCommand:
    """The script call for `chain_keys` (prefix order) of one namespace (the model
    signature digest, as the engines' directories use it)."""
    keys = RedisKeys(normalize_namespace(namespace))
    return LocateCommand([keys.block(k) for k in chain_keys],
                         [check_name("instance id", i) for i in instances])


def parse_locate(answer: Sequence[object], instances: Sequence[str]
                 ) -> dict[str, tuple[int, int, int]]:
    """The script's flat answer as {instance: (dram, disk, any)} leading blocks;
    ValueError if it is malformed."""
    values = [int(v) for v in answer]  # type: ignore[call-overload]
    if len(values) != 3 * len(instances):
        raise ValueError(f"LOCATE answered {len(values)} numbers for {len(instances)} instances")
    return {inst: (values[3 * j], values[3 * j + 1], values[3 * j + 2])
            for j, inst in enumerate(instances)}

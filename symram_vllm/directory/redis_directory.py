"""Shared block directory in Redis: which instance holds which block, in which tier.

One object serves one instance (``instance_id``) of one namespace (model signature,
optionally tenant). A block is *usable by this instance* when it has a live
location of this instance in any tier, or a live location in one of
``shared_tiers`` from any instance (``"redis"`` for the Redis page tier; add
``"disk"`` when every instance mounts the same disk-tier path). ``longest_prefix``
and ``tiers_of`` answer with that rule. Every instance of a namespace must agree on
``shared_tiers``.

Locations expire ``ttl_s`` after they were added or last hit, so a dead instance's
entries vanish. ``remove(keys)`` (no tier) drops this instance's own locations;
``remove(keys, tier)`` for a shared tier drops every instance's location of that
tier (the shared storage no longer has the page). Redis outages never raise: see
``symram_vllm.redis_link``. Layout and trade-offs: docs/directory.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from symram_vllm.directory import redis_scripts as lua
from symram_vllm.directory.base import DedupeStats, Directory
from symram_vllm.directory.batch import BatchResult, DirectoryBatch
from symram_vllm.redis_keys import RedisKeys, check_name, normalize_namespace
from symram_vllm.redis_link import LinkOptions, RedisLink

DEFAULT_SHARED_TIERS = frozenset({"redis"})


@dataclass(frozen=True)
class RedisDirectoryOptions:
    ttl_s: float = 3600.0
    lease_ttl_s: float = 30.0
    # Keys per prefix-script call: a small first call, because many lookups are for
    # new prompts and miss at once (no need to ship 512 key names for that), then
    # large calls: one call never blocks Redis for long (scripts run one at a time)
    # and an 8k-token prompt at block size 16 takes two. docs/directory.md has the
    # measurements.
    first_chunk: int = 64
    lookup_chunk: int = 512
    write_chunk: int = 512
    link: LinkOptions = field(default_factory=LinkOptions)

    def __post_init__(self) -> None:
        if self.ttl_s < 0.001 or self.lease_ttl_s < 0.001:
            raise ValueError("RedisDirectoryOptions: ttl_s and lease_ttl_s must be >= 1 ms")
        if min(self.first_chunk, self.lookup_chunk, self.write_chunk) < 1:
            raise ValueError("RedisDirectoryOptions: chunk sizes must be >= 1")


def _chunks(items: Sequence[Any], size: int, first: int | None = None) -> Iterator[Sequence[Any]]:
    start, step = 0, first or size
    while start < len(items):
        yield items[start : start + step]
        start, step = start + step, size


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisDirectory(Directory):
    shared = True

    def __init__(
        self,
        url: str,
        *,
        namespace: bytes | str,
        instance_id: str,
        shared_tiers: Iterable[str] = DEFAULT_SHARED_TIERS,
        options: RedisDirectoryOptions | None = None,
    ) -> None:
        self.options = options or RedisDirectoryOptions()
        self.keys = RedisKeys(normalize_namespace(namespace))
        self.instance_id = check_name("instance id", instance_id)
        self.shared_tiers = frozenset(check_name("tier", t) for t in shared_tiers)
        self._shared_csv = ",".join(sorted(self.shared_tiers))
        self._ttl_ms = _ms(self.options.ttl_s)
        # Connecting is lazy: a directory built while Redis is down starts degraded.
        self.link = RedisLink(
            url, options=self.options.link, client_name=f"symram-dir-{self.instance_id}"
        )
        client = self.link.client
        self._lookup = client.register_script(lua.LOOKUP)
        self._tiers = client.register_script(lua.TIERS)
        self._locations = client.register_script(lua.LOCATIONS)
        self._add = client.register_script(lua.ADD)
        self._remove = client.register_script(lua.REMOVE)
        self._collect = client.register_script(lua.COLLECT)
        self._acquire = client.register_script(lua.ACQUIRE_LEASE)
        self._release = client.register_script(lua.RELEASE_LEASE)
        self._record = client.register_script(lua.RECORD_STORE)
        self.lookups = 0
        self.hits = 0
        self.misses = 0
        self.hit_blocks = 0
        from symram_vllm.directory.redis_batch import RedisBatcher

        self._batcher = RedisBatcher(self)
        self._batcher.preload()

    # -- reads -----------------------------------------------------------------------------
    def _me(self) -> list[str | int]:
        return [self.instance_id, self._shared_csv, self._ttl_ms]

    def longest_prefix(self, chain_keys: Sequence[bytes]) -> int:
        held = self.link.call(
            lambda r: self._leading(r, chain_keys, self._lookup, self._block_keys, []), 0
        )
        self._count_lookup(held)
        return held

    def _leading(
        self,
        r: redis.Redis,
        chain_keys: Sequence[bytes],
        script: Any,
        redis_keys: Callable[[Sequence[bytes]], list[str]],
        extra: list[Any],
    ) -> int:
        """Run a prefix script chunk by chunk; stop at the first chunk with a miss."""
        held = 0
        opts = self.options
        for chunk in _chunks(chain_keys, opts.lookup_chunk, opts.first_chunk):
            n = int(script(keys=redis_keys(chunk), args=[*self._me(), *extra], client=r))
            held += n
            if n < len(chunk):
                break
        return held

    def _count_lookup(self, held: int) -> None:
        self.lookups += 1
        self.hit_blocks += held
        if held:
            self.hits += 1
        else:
            self.misses += 1

    def tiers_of(self, chain_key: bytes) -> frozenset[str]:
        return self.tiers_of_many([chain_key])[0]

    def tiers_of_many(self, chain_keys: Sequence[bytes]) -> list[frozenset[str]]:
        empty = [frozenset[str]()] * len(chain_keys)

        def query(r: redis.Redis) -> list[frozenset[str]]:
            out: list[frozenset[str]] = []
            for chunk in _chunks(chain_keys, self.options.lookup_chunk):
                rows = self._tiers(keys=self._block_keys(chunk), args=self._me(), client=r)
                out.extend(
                    frozenset(t for t in row.decode(errors="replace").split(",") if t)
                    for row in rows
                )
            return out

        return self.link.call(query, empty) if chain_keys else []

    def locations(self, chain_key: bytes) -> frozenset[tuple[str, str]]:
        """Every live (instance, tier) of a block, whatever this instance can use."""

        def query(r: redis.Redis) -> frozenset[tuple[str, str]]:
            fields = self._locations(keys=[self.keys.block(chain_key)], client=r)
            out: set[tuple[str, str]] = set()
            for name in fields:
                instance, _, tier = name.decode(errors="replace").partition("|")
                out.add((instance, tier))
            return frozenset(out)

        return self.link.call(query, frozenset())

    def __len__(self) -> int:
        """Block records in the namespace (all instances). O(records): a SCAN, for
        inspection and tests, not for the request path. 0 while Redis is down."""

        def count(r: redis.Redis) -> int:
            return sum(1 for _ in r.scan_iter(match=self.keys.block_pattern, count=1000))

        return self.link.call(count, 0)

    # -- writes ----------------------------------------------------------------------------
    def location(self, tier: str) -> str:
        return f"{self.instance_id}|{check_name('tier', tier)}"

    def add(self, chain_keys: Iterable[bytes], tier: str) -> None:
        location = self.location(tier)
        blocks = self._block_keys(list(chain_keys))
        for chunk in _chunks(blocks, self.options.write_chunk):
            self.link.write(
                lambda r, c=chunk: self._add(keys=c, args=[location, self._ttl_ms], client=r)
            )

    def remove(self, chain_keys: Iterable[bytes], tier: str | None = None) -> None:
        args = self._drop_args(tier)
        blocks = self._block_keys(list(chain_keys))
        for chunk in _chunks(blocks, self.options.write_chunk):
            self.link.write(lambda r, c=chunk: self._remove(keys=c, args=args, client=r))

    def remove_own(self, chain_keys: Iterable[bytes], tier: str) -> None:
        args = self._own_args(tier)
        blocks = self._block_keys(list(chain_keys))
        for chunk in _chunks(blocks, self.options.write_chunk):
            self.link.write(lambda r, c=chunk: self._remove(keys=c, args=args, client=r))

    def _own_args(self, tier: str | None) -> list[str]:
        return [self.instance_id, check_name("tier", tier or ""), "0"]

    def _drop_args(self, tier: str | None) -> list[str]:
        if tier is None:
            return [self.instance_id, "", "0"]
        everyone = "1" if check_name("tier", tier) in self.shared_tiers else "0"
        return [self.instance_id, tier, everyone]

    def _block_keys(self, chain_keys: Sequence[bytes]) -> list[str]:
        return [self.keys.block(k) for k in chain_keys]

    def _pair_keys(self, chain_keys: Sequence[bytes]) -> list[str]:
        out: list[str] = []
        for k in chain_keys:
            out += [self.keys.block(k), self.keys.lease(k)]
        return out

    def collect(self, chain_keys: Iterable[bytes], tier: str) -> list[bytes]:
        """Forget `tier` for the unleased keys; returns them (their pages may go).
        Returns [] while Redis is down: nothing may be deleted without the check."""
        keys = list(chain_keys)
        args = self._drop_args(tier)

        def run(r: redis.Redis) -> list[bytes]:
            out: list[bytes] = []
            for chunk in _chunks(keys, self.options.write_chunk):
                picked = self._collect(keys=self._pair_keys(chunk), args=args, client=r)
                out.extend(chunk[int(i) - 1] for i in picked)
            return out

        return self.link.call(run, []) if keys else []

    def acquire_lease(self, chain_keys: Sequence[bytes], ttl_s: float | None = None) -> int:
        """Lease the leading usable keys (a `longest_prefix` that also protects them
        from `collect` and from Redis page-tier eviction); returns how many. Release
        exactly ``chain_keys[:n]``. 0 while Redis is down."""
        lease_ms = _ms(self.options.lease_ttl_s if ttl_s is None else ttl_s)
        held = self.link.call(
            lambda r: self._leading(r, chain_keys, self._acquire, self._pair_keys, [lease_ms]),
            0,
        )
        self._count_lookup(held)
        return held

    def release_lease(self, chain_keys: Iterable[bytes]) -> None:
        leases = [self.keys.lease(k) for k in chain_keys]
        for chunk in _chunks(leases, self.options.write_chunk):
            self.link.write(
                lambda r, c=chunk: self._release(keys=c, args=[self.instance_id], client=r)
            )

    # -- dedupe accounting -------------------------------------------------------------------
    def record_store(self, chain_keys: Sequence[bytes], nbytes: int) -> int:
        """Count a request to store `chain_keys` (pages of `nbytes`) in the namespace's
        fleet-wide counters; returns how many are new. While Redis is down the
        request is queued and 0 is returned."""
        if nbytes < 0:
            raise ValueError(f"record_store: nbytes must be >= 0, got {nbytes}")
        physical = 0
        args = [nbytes, self._ttl_ms]
        for chunk in _chunks(list(chain_keys), self.options.write_chunk):
            keys = [*self._block_keys(chunk), self.keys.stats]

            def op(r: redis.Redis, keys: list[str] = keys) -> int:
                return int(self._record(keys=keys, args=args, client=r))

            result = self.link.call(op, None)
            if result is not None:
                physical += result
            elif not self.link.available:  # an outage, not a rejected script: replay later
                self.link.write(op)
        return physical

    def dedupe(self) -> DedupeStats:
        """The namespace's fleet-wide counters (zeros while Redis is down)."""

        def read(r: redis.Redis) -> DedupeStats:
            raw = r.hgetall(self.keys.stats)
            values: dict[str, int] = {}
            for name in ("logical_bytes", "physical_bytes", "logical_blocks", "physical_blocks"):
                with contextlib.suppress(TypeError, ValueError):
                    values[name] = int(raw.get(name.encode(), 0))
            return DedupeStats(**values)

        return self.link.call(read, DedupeStats())

    # -- batches -----------------------------------------------------------------------------
    def apply_batch(self, batch: DirectoryBatch) -> BatchResult:
        """The whole batch in one pipelined round trip (see redis_batch.py)."""
        return self._batcher.apply(batch)

    # -- housekeeping ----------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Local counters of this object (no Redis round trip)."""
        return {
            "lookups": float(self.lookups),
            "hits": float(self.hits),
            "misses": float(self.misses),
            "hit_blocks": float(self.hit_blocks),
            "round_trips": float(self._batcher.round_trips),
            **self.link.counters(),
        }

    def close(self) -> None:
        self.link.close()

"""Redis page tier: page bytes in Redis, for fleets without a shared filesystem.

The verbs follow SGLang HiCache's storage interface: ``get`` / ``exists`` / ``set``
plus ``delete``, ``stats`` and ``close``, on bytes (callers hand over
``tensor.numpy()`` or a memoryview). A byte budget holds fleet-wide: one Lua script
per ``set`` keeps a used-bytes counter and an LRU sorted set and evicts the oldest
pages (never leased ones, see ``redis_page_scripts.py``) to make room.

Every value carries a header naming its key and length and a BLAKE2b digest of
header and payload, so a value written for another key, truncated or flipped reads
as a miss (counted in ``integrity_failures`` and deleted), never as wrong bytes.
Redis being down is a miss, a declined ``set`` or a False, quickly, never an
exception; pages are not queued for replay (they are large and recomputable).
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from symram_vllm.directory.redis_keys import RedisKeys, normalize_namespace
from symram_vllm.keys import KEY_BYTES, BlockKey
from symram_vllm.redis_link import LinkOptions, RedisLink
from symram_vllm.tiers import redis_page_scripts as lua
from symram_vllm.tiers.base import TierStats

logger = logging.getLogger(__name__)

MAGIC = b"SYRP"
VERSION = 1
DIGEST_BYTES = 16
# magic, version, rank, chain, payload length; then the BLAKE2b digest of those
# bytes followed by the payload.
_FIELDS = struct.Struct(f"<4sBxxxI{KEY_BYTES}sQ")
HEADER_BYTES = _FIELDS.size + DIGEST_BYTES

EvictCallback = Callable[[list[BlockKey]], None]


def _digest(fields: bytes, payload: memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"symram-redispg")
    h.update(fields)
    h.update(payload)
    return h.digest()


def pack_page(key: BlockKey, payload: memoryview) -> bytes:
    fields = _FIELDS.pack(MAGIC, VERSION, key.rank, key.chain, payload.nbytes)
    return b"".join((fields, _digest(fields, payload), payload))


def unpack_page(key: BlockKey, value: bytes) -> memoryview | None:
    """The payload if `value` is an intact page of `key`, else None."""
    if len(value) < HEADER_BYTES:
        return None
    view = memoryview(value)
    fields = bytes(view[: _FIELDS.size])
    magic, version, rank, chain, length = _FIELDS.unpack(fields)
    payload = view[HEADER_BYTES:]
    if (
        magic != MAGIC
        or version != VERSION
        or rank != key.rank
        or chain != key.chain
        or length != payload.nbytes
        or _digest(fields, payload) != bytes(view[_FIELDS.size : HEADER_BYTES])
    ):
        return None
    return payload


def _parse_members(members: list[bytes]) -> list[BlockKey]:
    """Evicted LRU members as keys; a member that is not one (foreign data) is skipped."""
    out = []
    for member in members:
        try:
            out.append(BlockKey.from_hex(member.decode()))
        except (UnicodeDecodeError, ValueError):
            continue
    return out


@dataclass(frozen=True)
class RedisPageTierOptions:
    # Pages are large: give a read more time than a directory lookup.
    link: LinkOptions = field(
        default_factory=lambda: LinkOptions(socket_timeout_s=2.0, connect_timeout_s=0.25)
    )
    # Oldest pages examined per set() when making room (leased ones are skipped).
    max_evict_scan: int = 256


class RedisPageTier:
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        namespace: bytes | str,
        capacity_bytes: int,
        options: RedisPageTierOptions | None = None,
        on_evict: EvictCallback | None = None,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"RedisPageTier capacity_bytes must be > 0, got {capacity_bytes}")
        self.options = options or RedisPageTierOptions()
        self.keys = RedisKeys(normalize_namespace(namespace))
        self.capacity_bytes = capacity_bytes
        self.on_evict = on_evict
        self.link = RedisLink(url, options=self.options.link, client_name="symram-pages")
        client = self.link.client
        self._set = client.register_script(lua.SET_PAGE)
        self._get = client.register_script(lua.GET_PAGE)
        self._delete = client.register_script(lua.DELETE_PAGE)
        self._stats = TierStats(bytes_capacity=capacity_bytes)

    def _member(self, key: BlockKey) -> str:
        return key.hex

    # -- the verbs ---------------------------------------------------------------------------
    def get(self, key: BlockKey) -> bytes | None:
        """The page bytes, or None on a miss, a damaged value or an outage."""
        keys = [self.keys.page(key), self.keys.lru]
        value = self.link.call(
            lambda r: self._get(keys=keys, args=[self._member(key)], client=r), None
        )
        if not isinstance(value, bytes):
            self._stats.misses += 1
            return None
        payload = unpack_page(key, value)
        if payload is None:
            self._stats.integrity_failures += 1
            self._stats.misses += 1
            logger.warning("symram: Redis page %s failed verification; deleted", key)
            self.delete(key)
            return None
        self._stats.hits += 1
        return payload.tobytes()

    def exists(self, key: BlockKey) -> bool:
        return bool(self.link.call(lambda r: r.exists(self.keys.page(key)), 0))

    def set(self, key: BlockKey, data: bytes | bytearray | memoryview) -> bool:
        """Store a page; False when it does not fit the budget or Redis is down."""
        payload = memoryview(data).cast("B")
        value = pack_page(key, payload)
        keys = [self.keys.page(key), self.keys.lru, self.keys.used, self.keys.page_sizes]
        args = [
            value,
            self._member(key),
            self.capacity_bytes,
            self.keys.prefix,
            self.options.max_evict_scan,
        ]
        result = self.link.call(lambda r: self._set(keys=keys, args=args, client=r), None)
        if not isinstance(result, list) or not result:
            self._stats.rejected_puts += 1
            return False
        evicted = _parse_members(result[1:])
        self._stats.evictions += len(evicted)
        if evicted and self.on_evict is not None:
            try:
                self.on_evict(evicted)
            except Exception:
                logger.exception("symram: Redis page tier on_evict callback failed")
        if int(result[0]) != 1:
            self._stats.rejected_puts += 1
            return False
        self._stats.puts += 1
        return True

    def delete(self, key: BlockKey) -> bool:
        keys = [self.keys.page(key), self.keys.lru, self.keys.used, self.keys.page_sizes]
        deleted = self.link.call(
            lambda r: self._delete(keys=keys, args=[self._member(key)], client=r), 0
        )
        return bool(deleted)

    # -- housekeeping ------------------------------------------------------------------------
    def stats(self) -> TierStats:
        """This object's counters plus the namespace's fleet-wide usage (one round
        trip; usage reads 0 while Redis is down)."""

        def usage(r: redis.Redis) -> tuple[int, int]:
            pipe = r.pipeline(transaction=False)
            pipe.get(self.keys.used)
            pipe.zcard(self.keys.lru)
            used, pages = pipe.execute()
            try:
                return int(used or 0), int(pages)
            except ValueError:
                return 0, int(pages)

        used, pages = self.link.call(usage, (0, 0))
        s = self._stats
        return TierStats(
            hits=s.hits,
            misses=s.misses,
            puts=s.puts,
            evictions=s.evictions,
            rejected_puts=s.rejected_puts,
            integrity_failures=s.integrity_failures,
            bytes_used=used,
            bytes_capacity=self.capacity_bytes,
            pages=pages,
            extra=self.link.counters(),
        )

    def close(self) -> None:
        self.link.close()

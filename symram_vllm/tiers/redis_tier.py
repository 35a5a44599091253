"""Redis page tier: page bytes in Redis, for fleets without a shared filesystem.

The verbs follow SGLang HiCache's storage interface: ``get`` / ``exists`` / ``set``
plus ``delete``, ``stats`` and ``close``, on bytes (callers hand over
``tensor.numpy()`` or a memoryview). A byte budget holds fleet-wide: one Lua script
per ``set`` keeps a used-bytes counter and an LRU sorted set and evicts the oldest
pages (never leased ones, see ``redis_page_scripts.py``) to make room.

Every value carries a header naming its key and length. A plaintext value (v1) adds
a BLAKE2b digest of header and payload, so a value written for another key, truncated
or flipped reads as a miss (counted in ``integrity_failures`` and deleted), never as
wrong bytes; but anyone who can write to Redis can recompute it. With a ``cipher``
(encryption at rest, ``crypto.py``) values are sealed (v2): the payload is AES-256-GCM
ciphertext and the tag authenticates it together with the header (key, rank, length,
key id, nonce), so a value forged, moved to another key or re-headed fails to open,
and no KV byte is readable in Redis. A value that fails is deleted and counted (Redis
has no quarantine; the page is recomputed); a value sealed under another key id is a
miss left in place for whoever holds that key (``other_key_pages``). With encryption
``required`` a plaintext value is refused like a forged one.

Redis being down is a miss, a declined ``set`` or a False, quickly, never an
exception; pages are not queued for replay (they are large and recomputable).
Bookkeeping keys of the wrong type are repaired by the scripts themselves
(``redis_page_scripts.py``) and counted in ``bookkeeping_repairs``.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from symram_vllm.keys import KEY_BYTES, BlockKey
from symram_vllm.redis_keys import RedisKeys, normalize_namespace
from symram_vllm.redis_link import LinkOptions, RedisLink
from symram_vllm.tiers import redis_page_scripts as lua
from symram_vllm.tiers.base import TierStats
from symram_vllm.tiers.crypto import (
    KEY_ID_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    PageAuthError,
    PageCipher,
)

logger = logging.getLogger(__name__)

MAGIC = b"SYRP"
VERSION = 1
VERSION_SEALED = 2
DIGEST_BYTES = 16
# magic, version, rank, chain, payload length; then the BLAKE2b digest of those
# bytes followed by the payload.
_FIELDS = struct.Struct(f"<4sBxxxI{KEY_BYTES}sQ")
HEADER_BYTES = _FIELDS.size + DIGEST_BYTES
# Sealed: the same fields (version 2), the key id and the nonce, all of them the
# AES-GCM associated data; then ciphertext || tag.
_SEALED = struct.Struct(f"<4sBxxxI{KEY_BYTES}sQ{KEY_ID_BYTES}s{NONCE_BYTES}s")
SEALED_OVERHEAD = _SEALED.size + TAG_BYTES

EvictCallback = Callable[[list[BlockKey]], None]


class PageRejected(ValueError):
    """A Redis value that is not a readable page of the key asked for; `reason` is one
    of damaged, auth, plaintext, other-key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def value_bytes(payload_len: int, sealed: bool) -> int:
    """Bytes one page of `payload_len` takes in Redis (and from the budget)."""
    return payload_len + (SEALED_OVERHEAD if sealed else HEADER_BYTES)


def _digest(fields: bytes, payload: memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"symram-redispg")
    h.update(fields)
    h.update(payload)
    return h.digest()


def pack_page(key: BlockKey, payload: memoryview, cipher: PageCipher | None = None) -> bytes:
    if cipher is not None:
        aad = _SEALED.pack(
            MAGIC, VERSION_SEALED, key.rank, key.chain, payload.nbytes, cipher.key_id,
            cipher.new_nonce(),
        )
        return aad + cipher.seal(aad[-NONCE_BYTES:], aad, payload)
    fields = _FIELDS.pack(MAGIC, VERSION, key.rank, key.chain, payload.nbytes)
    return b"".join((fields, _digest(fields, payload), payload))


def open_page(key: BlockKey, value: bytes, cipher: PageCipher | None = None) -> memoryview:
    """The payload of `value` if it is an intact, authentic page of `key` under `cipher`'s
    policy; raises PageRejected otherwise."""
    view = memoryview(value)
    if len(value) < _FIELDS.size:
        raise PageRejected("damaged", f"{len(value)} bytes, shorter than a header")
    magic, version, rank, chain, length = _FIELDS.unpack(bytes(view[: _FIELDS.size]))
    if magic != MAGIC or rank != key.rank or chain != key.chain:
        raise PageRejected("damaged", "not a page of this key")
    if version == VERSION_SEALED:
        if len(value) != _SEALED.size + length + TAG_BYTES:
            raise PageRejected("damaged", f"{len(value)} bytes for a sealed page of {length}")
        aad = bytes(view[: _SEALED.size])
        key_id, nonce = _SEALED.unpack(aad)[-2:]
        if cipher is None or key_id != cipher.key_id:
            raise PageRejected("other-key", f"sealed under key id {key_id.hex()}")
        try:
            return memoryview(cipher.open(nonce, aad, view[_SEALED.size :]))
        except PageAuthError as exc:
            raise PageRejected("auth", str(exc)) from None
    if version != VERSION:
        raise PageRejected("damaged", f"value format v{version}")
    if cipher is not None and cipher.required:
        raise PageRejected("plaintext", "not encrypted, and encryption is required")
    fields = bytes(view[: _FIELDS.size])
    payload = view[HEADER_BYTES:]
    if length != payload.nbytes or _digest(fields, payload) != bytes(
        view[_FIELDS.size : HEADER_BYTES]
    ):
        raise PageRejected("damaged", "length or digest does not match")
    return payload


def unpack_page(key: BlockKey, value: bytes, cipher: PageCipher | None = None) -> memoryview | None:
    """The payload if `value` is an intact page of `key`, else None."""
    try:
        return open_page(key, value, cipher)
    except PageRejected:
        return None


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
        cipher: PageCipher | None = None,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"RedisPageTier capacity_bytes must be > 0, got {capacity_bytes}")
        self.options = options or RedisPageTierOptions()
        self.keys = RedisKeys(normalize_namespace(namespace))
        self.capacity_bytes = capacity_bytes
        self.on_evict = on_evict
        self.cipher = cipher
        self.link = RedisLink(url, options=self.options.link, client_name="symram-pages")
        client = self.link.client
        self._set = client.register_script(lua.SET_PAGE)
        self._get = client.register_script(lua.GET_PAGE)
        self._delete = client.register_script(lua.DELETE_PAGE)
        self._stats = TierStats(bytes_capacity=capacity_bytes)
        self._counters: dict[str, int] = dict.fromkeys(
            ("auth_failures", "plaintext_rejected", "other_key_pages", "bookkeeping_repairs"), 0
        )

    def value_bytes(self, payload_len: int) -> int:
        """Bytes a page of `payload_len` takes from the budget, as this tier writes it."""
        return value_bytes(payload_len, self.cipher is not None)

    def _member(self, key: BlockKey) -> str:
        return key.hex

    # -- the verbs ---------------------------------------------------------------------------
    def get(self, key: BlockKey) -> bytes | None:
        """The page bytes, or None on a miss, a rejected value or an outage."""
        keys = [self.keys.page(key), self.keys.lru, self.keys.used, self.keys.page_sizes]
        args = [self._member(key), self.keys.prefix]
        reply = self.link.call(lambda r: self._get(keys=keys, args=args, client=r), None)
        value = self._repaired(reply)[1:2] if isinstance(reply, list) else []
        if not value or not isinstance(value[0], bytes):
            self._stats.misses += 1
            return None
        try:
            payload = open_page(key, value[0], self.cipher)
        except PageRejected as exc:
            self._stats.misses += 1
            return self._rejected(key, exc)
        self._stats.hits += 1
        return payload.tobytes()

    def _rejected(self, key: BlockKey, exc: PageRejected) -> None:
        """Count a value that did not open; delete it unless it is another key's to read."""
        if exc.reason == "other-key":
            self._counters["other_key_pages"] += 1
            logger.warning("symram: Redis page %s is sealed under another key (%s); a miss",
                           key, exc)
            return
        self._stats.integrity_failures += 1
        if exc.reason == "auth":
            self._counters["auth_failures"] += 1
        elif exc.reason == "plaintext":
            self._counters["plaintext_rejected"] += 1
        logger.warning("symram: Redis page %s rejected (%s); deleted", key, exc)
        self.delete(key)

    def _repaired(self, reply: list) -> list:
        """Count the bookkeeping keys a script repaired (its reply's first number)."""
        repaired = int(reply[0]) if reply else 0
        if repaired:
            self._counters["bookkeeping_repairs"] += repaired
            logger.warning(
                "symram: Redis page tier %s: %d bookkeeping key(s) had the wrong type and "
                "were rebuilt from the pages", self.keys.prefix, repaired,
            )
        return reply

    def exists(self, key: BlockKey) -> bool:
        return bool(self.link.call(lambda r: r.exists(self.keys.page(key)), 0))

    def set(self, key: BlockKey, data: bytes | bytearray | memoryview) -> bool:
        """Store a page; False when it does not fit the budget or Redis is down."""
        payload = memoryview(data).cast("B")
        value = pack_page(key, payload, self.cipher)
        keys = [self.keys.page(key), self.keys.lru, self.keys.used, self.keys.page_sizes]
        args = [
            value,
            self._member(key),
            self.capacity_bytes,
            self.keys.prefix,
            self.options.max_evict_scan,
        ]
        result = self.link.call(lambda r: self._set(keys=keys, args=args, client=r), None)
        if not isinstance(result, list) or len(result) < 2:
            self._stats.rejected_puts += 1
            return False
        evicted = _parse_members(self._repaired(result[1:])[1:])
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
        args = [self._member(key), self.keys.prefix]
        reply = self.link.call(lambda r: self._delete(keys=keys, args=args, client=r), None)
        if not isinstance(reply, list) or len(reply) < 2:
            return False
        self._repaired(reply[1:])
        return bool(reply[0])

    # -- housekeeping ------------------------------------------------------------------------
    def counters(self) -> dict[str, float]:
        """This object's failure and repair counters (no round trip to Redis)."""
        out = {k: float(v) for k, v in self._counters.items()}
        out["integrity_failures"] = float(self._stats.integrity_failures)
        return out

    def stats(self) -> TierStats:
        """This object's counters plus the namespace's fleet-wide usage (one round
        trip; usage reads 0 while Redis is down)."""

        def usage(r: redis.Redis) -> tuple[int, int]:
            pipe = r.pipeline(transaction=False)
            pipe.get(self.keys.used)
            pipe.zcard(self.keys.lru)
            # A key of the wrong type reads as 0 here; the next script call repairs it.
            values = []
            for value in pipe.execute(raise_on_error=False):
                try:
                    values.append(int(value or 0))
                except (TypeError, ValueError):
                    values.append(0)
            return values[0], values[1]

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
            extra={
                **self.link.counters(),
                **{k: float(v) for k, v in self._counters.items()},
                "encrypted": float(self.cipher is not None),
            },
        )

    def close(self) -> None:
        self.link.close()

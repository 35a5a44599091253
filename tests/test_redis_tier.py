"""The Redis page tier against a real redis-server: round trips, integrity, the
fleet-wide byte budget with LRU eviction and leases, outages, bookkeeping repair. Every
test runs with plaintext values and with values sealed by AES-256-GCM (tests/at_rest.py)."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis
import torch
from at_rest import MODES, cipher_for

from symram_vllm.directory.redis_directory import RedisDirectory, RedisDirectoryOptions
from symram_vllm.keys import BlockKey
from symram_vllm.redis_link import LinkOptions
from symram_vllm.tiers.crypto import PageCipher
from symram_vllm.tiers.peer_redis import RedisPages
from symram_vllm.tiers.redis_tier import (
    HEADER_BYTES,
    RedisPageTier,
    RedisPageTierOptions,
    pack_page,
    unpack_page,
    value_bytes,
)

pytestmark = pytest.mark.timeout(120)

SIG = hashlib.blake2b(b"model-signature", digest_size=32).digest()
PAGE = 4096
VALUE = HEADER_BYTES + PAGE  # bytes one page takes from the budget (per mode: at_rest)
CIPHER: PageCipher | None = None
# Outages here are a killed redis-server (refused at once): a 2 s socket timeout only
# keeps a busy host's slow answer from reading as an outage (a miss, a refused put).
FAST = LinkOptions(
    socket_timeout_s=2.0, connect_timeout_s=2.0, backoff_initial_s=0.02, backoff_max_s=0.2
)


def bkey(i: int, rank: int = 0) -> BlockKey:
    return BlockKey(hashlib.blake2b(str(i).encode(), digest_size=32).digest(), rank)


def page(i: int) -> bytes:
    return hashlib.shake_256(str(i).encode()).digest(PAGE)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture(autouse=True, params=MODES)
def at_rest(request, monkeypatch) -> str:
    cipher = cipher_for(request.param)
    monkeypatch.setattr(sys.modules[__name__], "CIPHER", cipher)
    monkeypatch.setattr(sys.modules[__name__], "VALUE", value_bytes(PAGE, cipher is not None))
    return request.param


@pytest.fixture
def open_tiers(redis_server) -> Iterator[Callable[..., RedisPageTier]]:
    made: list[RedisPageTier] = []

    def make(capacity: int = 64 * VALUE, namespace: bytes | str = SIG, **kw) -> RedisPageTier:
        tier = RedisPageTier(
            redis_server.url,
            namespace=namespace,
            capacity_bytes=capacity,
            options=RedisPageTierOptions(link=FAST),
            cipher=kw.pop("cipher", CIPHER),
            **kw,
        )
        made.append(tier)
        return tier

    yield make
    for tier in made:
        tier.close()


def raw(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url, socket_timeout=2)


# -- round trips -----------------------------------------------------------------------------
def test_set_get_exists_delete(open_tiers) -> None:
    tier = open_tiers()
    k = bkey(1)
    assert tier.get(k) is None and not tier.exists(k)
    assert tier.set(k, page(1))
    assert tier.exists(k) and tier.get(k) == page(1)
    assert tier.set(k, page(2)), "overwrite"
    assert tier.get(k) == page(2)
    assert tier.delete(k) and not tier.delete(k)
    assert tier.get(k) is None
    s = tier.stats()
    assert (s.hits, s.misses, s.puts, s.pages, s.bytes_used) == (2, 2, 2, 0, 0)


def test_buffers_of_any_kind(open_tiers) -> None:
    tier = open_tiers()
    data = page(7)
    sources = {
        "memoryview": memoryview(data),
        "bytearray": bytearray(data),
        "numpy": np.frombuffer(data, dtype=np.uint8),
        "torch": torch.frombuffer(bytearray(data), dtype=torch.uint8).numpy(),
        "wide dtype": np.frombuffer(data, dtype=np.float32),
    }
    for i, src in enumerate(sources.values()):
        assert tier.set(bkey(100 + i), src)
        assert tier.get(bkey(100 + i)) == data


def test_ranks_are_separate_pages(open_tiers) -> None:
    tier = open_tiers()
    tier.set(bkey(1, rank=0), page(10))
    tier.set(bkey(1, rank=1), page(11))
    assert tier.get(bkey(1, rank=0)) == page(10)
    assert tier.get(bkey(1, rank=1)) == page(11)


def test_header_round_trip_and_rejections() -> None:
    k = bkey(3)
    value = pack_page(k, memoryview(page(3)), CIPHER)
    assert len(value) == VALUE
    assert bytes(unpack_page(k, value, CIPHER)) == page(3)
    assert unpack_page(bkey(4), value, CIPHER) is None
    assert unpack_page(bkey(3, rank=1), value, CIPHER) is None
    assert unpack_page(k, value[:-1], CIPHER) is None
    assert unpack_page(k, value[:10], CIPHER) is None
    assert unpack_page(k, value + b"\0", CIPHER) is None
    flipped = bytearray(value)
    flipped[HEADER_BYTES + 100] ^= 1
    assert unpack_page(k, bytes(flipped), CIPHER) is None


# -- integrity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "other_key",
                                    "garbage", "empty"])
def test_damaged_values_read_as_misses(open_tiers, redis_server, damage: str) -> None:
    tier = open_tiers()
    k, other = bkey(1), bkey(2)
    tier.set(k, page(1))
    tier.set(other, page(2))
    r = raw(redis_server)
    value = bytearray(r.get(tier.keys.page(k)))
    if damage == "flip_payload":
        value[-1] ^= 0x80
    elif damage == "flip_header":
        value[6] ^= 0x01
    elif damage == "truncate":
        value = value[: len(value) // 2]
    elif damage == "other_key":
        value = bytearray(r.get(tier.keys.page(other)))
    elif damage == "garbage":
        value = bytearray(os.urandom(len(value)))
    else:
        value = bytearray()
    r.set(tier.keys.page(k), bytes(value))
    assert tier.get(k) is None
    s = tier.stats()
    assert s.integrity_failures == 1 and s.misses == 1
    assert not tier.exists(k), "a damaged value is deleted"
    assert s.bytes_used == VALUE and s.pages == 1, "and its bytes leave the budget"
    assert tier.get(other) == page(2)


def test_foreign_type_at_a_page_key(open_tiers, redis_server) -> None:
    tier = open_tiers()
    k = bkey(1)
    raw(redis_server).hset(tier.keys.page(k), "x", "y")
    assert tier.get(k) is None
    assert tier.set(k, page(1)), "set replaces foreign data"
    assert tier.get(k) == page(1)
    assert tier.stats().extra["available"] == 1.0


# -- budget ----------------------------------------------------------------------------------------
def test_budget_evicts_least_recently_used(open_tiers) -> None:
    evicted: list[BlockKey] = []
    tier = open_tiers(capacity=4 * VALUE, on_evict=evicted.extend)
    for i in range(4):
        assert tier.set(bkey(i), page(i))
        time.sleep(0.002)  # distinct LRU scores (server milliseconds)
    assert tier.get(bkey(0)) == page(0)  # 0 becomes the most recently used
    time.sleep(0.002)
    assert tier.set(bkey(4), page(4))
    assert tier.set(bkey(5), page(5))
    assert evicted == [bkey(1), bkey(2)]
    held = [i for i in range(6) if tier.exists(bkey(i))]
    assert held == [0, 3, 4, 5]
    s = tier.stats()
    assert s.bytes_used == 4 * VALUE and s.pages == 4 and s.evictions == 2


def test_budget_is_fleet_wide(open_tiers) -> None:
    a = open_tiers(capacity=4 * VALUE)
    b = open_tiers(capacity=4 * VALUE)
    for i in range(3):
        assert a.set(bkey(i), page(i))
        assert b.set(bkey(10 + i), page(10 + i))
        time.sleep(0.002)
    # Alone, each would fit its 3 pages; together they share one budget of 4.
    assert a.stats().pages == 4 and a.stats().bytes_used == 4 * VALUE
    assert (a.stats().evictions, b.stats().evictions) == (1, 1)
    assert [k for k in (0, 1, 2, 10, 11, 12) if a.exists(bkey(k))] == [1, 2, 11, 12]


def test_page_larger_than_budget_is_declined(open_tiers) -> None:
    tier = open_tiers(capacity=VALUE - 1)
    assert not tier.set(bkey(1), page(1))
    assert tier.stats().rejected_puts == 1 and tier.get(bkey(1)) is None


def test_leased_pages_are_not_evicted(open_tiers, redis_server) -> None:
    tier = open_tiers(capacity=3 * VALUE)
    directory = RedisDirectory(
        redis_server.url, namespace=SIG, instance_id="reader",
        options=RedisDirectoryOptions(link=FAST),
    )
    try:
        for i in range(3):
            tier.set(bkey(i), page(i))
            time.sleep(0.002)
        directory.add([bkey(i).chain for i in range(3)], "redis")
        assert directory.acquire_lease([bkey(0).chain, bkey(1).chain], ttl_s=30) == 2
        assert tier.set(bkey(3), page(3))
        assert [tier.exists(bkey(i)) for i in range(4)] == [True, True, False, True]
        directory.acquire_lease([bkey(3).chain], ttl_s=30)  # not in the directory: no lease
        assert tier.set(bkey(4), page(4))
        assert [tier.exists(bkey(i)) for i in range(5)] == [True, True, False, False, True]
        directory.add([bkey(4).chain], "redis")
        assert directory.acquire_lease([bkey(4).chain], ttl_s=30) == 1
        assert not tier.set(bkey(5), page(5)), "everything is leased: no room"
        directory.release_lease([bkey(0).chain])
        assert tier.set(bkey(5), page(5))
        assert not tier.exists(bkey(0))
    finally:
        directory.close()


def test_used_counter_heals_when_pages_vanish(open_tiers, redis_server) -> None:
    tier = open_tiers(capacity=2 * VALUE)
    tier.set(bkey(1), page(1))
    tier.set(bkey(2), page(2))
    r = raw(redis_server)
    r.delete(tier.keys.lru, tier.keys.page(bkey(1)), tier.keys.page(bkey(2)))  # not `used`
    assert tier.stats().bytes_used == 2 * VALUE
    assert tier.set(bkey(3), page(3))
    assert tier.stats().bytes_used == VALUE
    assert r.hkeys(tier.keys.page_sizes) == [bkey(3).hex.encode()]


def test_flushall_under_use(open_tiers, redis_server) -> None:
    tier = open_tiers(capacity=2 * VALUE)
    tier.set(bkey(1), page(1))
    raw(redis_server).flushall()
    assert tier.get(bkey(1)) is None
    assert tier.set(bkey(2), page(2)) and tier.set(bkey(3), page(3))
    assert tier.get(bkey(3)) == page(3)
    s = tier.stats()
    assert s.extra["errors"] == 0 and s.bytes_used == 2 * VALUE


def test_namespaces_are_isolated(open_tiers) -> None:
    a = open_tiers(namespace="tenant-a")
    b = open_tiers(namespace="tenant-b")
    a.set(bkey(1), page(1))
    assert b.get(bkey(1)) is None and not b.exists(bkey(1))


# -- bookkeeping keys of the wrong type ------------------------------------------------
def _corrupt(r: redis.Redis, key: str, kind: str) -> None:
    r.delete(key)
    if kind == "hash":
        r.hset(key, "x", "y")
    elif kind == "list":
        r.rpush(key, "x")
    else:
        r.set(key, "not a number")


@pytest.mark.parametrize(
    ("targets", "first_call"),
    [(("lru",), "get"), (("lru",), "set"), (("page_sizes",), "delete"), (("used",), "set"),
     (("lru", "page_sizes", "used"), "get")],
)
def test_wrong_typed_bookkeeping_is_repaired_and_counted(
    open_tiers, redis_server, targets: tuple[str, ...], first_call: str
) -> None:
    """The audit turned the `lru` sorted set into a hash: every script then failed with
    WRONGTYPE and the tier stayed off until a person deleted the key. Now the next call
    rebuilds the bookkeeping from the pages, counts it, and the budget still holds."""
    tier = open_tiers(capacity=3 * VALUE)
    for i in range(3):
        assert tier.set(bkey(i), page(i))
        time.sleep(0.002)
    r = raw(redis_server)
    kinds = {"lru": "hash", "page_sizes": "list", "used": "hash"}
    for name in targets:
        _corrupt(r, getattr(tier.keys, name), kinds[name])
    if first_call == "get":
        assert tier.get(bkey(0)) == page(0)
    elif first_call == "set":
        assert tier.set(bkey(9), page(9))  # evicts one of the three: the budget holds
    else:
        assert tier.delete(bkey(2))
    s = tier.stats()
    assert s.extra["bookkeeping_repairs"] == len(targets)
    assert r.type(tier.keys.lru) == b"zset" and r.type(tier.keys.page_sizes) == b"hash"
    held = sum(tier.exists(bkey(i)) for i in (0, 1, 2, 9))
    assert s.pages == held and s.bytes_used == held * VALUE
    assert int(r.get(tier.keys.used)) == held * VALUE
    for i in range(10, 14):  # keeps working within budget, with no further repairs
        assert tier.set(bkey(i), page(i))
        assert tier.get(bkey(i)) == page(i)
    s = tier.stats()
    assert s.pages == 3 and s.bytes_used == 3 * VALUE
    assert s.extra["bookkeeping_repairs"] == len(targets)


def test_repair_drops_page_keys_of_the_wrong_type(open_tiers, redis_server) -> None:
    tier = open_tiers(capacity=4 * VALUE)
    tier.set(bkey(1), page(1))
    r = raw(redis_server)
    r.hset(tier.keys.page(bkey(2)), "x", "y")  # foreign data under a page name
    _corrupt(r, tier.keys.lru, "hash")
    assert tier.get(bkey(1)) == page(1)
    assert not r.exists(tier.keys.page(bkey(2)))
    s = tier.stats()
    assert s.pages == 1 and s.bytes_used == VALUE


# -- outages ---------------------------------------------------------------------------------------
def test_killed_redis_is_a_fast_miss_and_recovers(open_tiers, redis_server) -> None:
    tier = open_tiers()
    pages = RedisPages(tier)  # what the worker reports (symram:redis_tier_available)
    tier.set(bkey(1), page(1))
    assert pages.stats()["available"] == 1.0
    redis_server.kill()
    slowest = 0.0
    for i in range(100):
        start = time.monotonic()
        assert tier.get(bkey(1)) is None
        assert not tier.exists(bkey(1))
        assert not tier.set(bkey(i), page(i))
        assert not tier.delete(bkey(1))
        s = tier.stats()
        slowest = max(slowest, time.monotonic() - start)
    assert slowest < 1.0, f"a call took {slowest:.3f} s with Redis down"
    assert s.extra["available"] == 0.0 and s.rejected_puts == 100 and s.bytes_used == 0
    assert pages.stats()["available"] == 0.0
    redis_server.restart()
    assert wait_until(lambda: tier.stats().extra["available"] == 1.0)
    assert pages.stats()["available"] == 1.0
    assert tier.set(bkey(2), page(2)) and tier.get(bkey(2)) == page(2)
    assert tier.stats().extra["reconnects"] == 1
    pages.close()  # closes the tier too; the fixture's second close is harmless


def test_constructor_rejects_bad_arguments(redis_server) -> None:
    with pytest.raises(ValueError):
        RedisPageTier(redis_server.url, namespace=SIG, capacity_bytes=0)
    with pytest.raises(ValueError):
        RedisPageTier("memcached://x", namespace=SIG, capacity_bytes=1)

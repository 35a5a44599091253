"""The Redis directory against a real redis-server: prefix lookups, instances and
shared tiers, leases, TTLs, namespaces and tenants, dedupe accounting, outages."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from redis_fixtures import key, keys, wait_until

from symram_vllm.directory import (
    DedupeStats,
    Directory,
    EmbeddedDirectory,
    make_directory,
    namespace_for,
)
from symram_vllm.directory.redis_directory import RedisDirectory, RedisDirectoryOptions
from symram_vllm.redis_keys import RedisKeys
from symram_vllm.redis_link import LinkOptions

pytestmark = pytest.mark.timeout(120)

SIG = hashlib.blake2b(b"model-signature", digest_size=32).digest()
# Outages here are a killed redis-server (refused at once) or a silent listener with its
# own options: a 2 s socket timeout only keeps a busy host's slow answer from reading
# as an outage (a miss, and calls short-circuited until the backoff ends).
FAST = LinkOptions(
    socket_timeout_s=2.0, connect_timeout_s=2.0, backoff_initial_s=0.02, backoff_max_s=0.2
)



@pytest.fixture
def open_dirs(redis_server) -> Iterator[Callable[..., RedisDirectory]]:
    made: list[RedisDirectory] = []

    def make(instance_id: str = "a", namespace: bytes | str = SIG, **kw) -> RedisDirectory:
        shared = kw.pop("shared_tiers", frozenset({"redis"}))
        opts = RedisDirectoryOptions(link=kw.pop("link", FAST), **kw)
        d = RedisDirectory(
            redis_server.url,
            namespace=namespace,
            instance_id=instance_id,
            shared_tiers=shared,
            options=opts,
        )
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture(params=["embedded", "redis"])
def directory(request) -> Directory:
    if request.param == "embedded":
        return EmbeddedDirectory()
    return request.getfixturevalue("open_dirs")(first_chunk=3, lookup_chunk=4)


def raw(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url, socket_timeout=2)


# -- the Directory contract, on both implementations ---------------------------------------
def test_longest_prefix_stops_at_first_miss(directory: Directory) -> None:
    ks = keys(20)
    directory.add(ks[:10] + ks[11:], "dram")
    assert directory.longest_prefix(ks) == 10
    assert directory.longest_prefix(ks[11:]) == 9
    assert directory.longest_prefix([key(99), *ks]) == 0
    assert directory.longest_prefix([]) == 0
    assert len(directory) == 19


@pytest.mark.parametrize("miss_at", [0, 2, 3, 4, 6, 7, 8, 11, 12])
def test_prefix_across_chunk_boundaries(directory: Directory, miss_at: int) -> None:
    # The Redis directory here sends 3 keys, then 4 per script call (boundaries at
    # 3, 7, 11): misses on, before and after a boundary must all count exactly.
    ks = keys(12)
    directory.add([k for i, k in enumerate(ks) if i != miss_at], "disk")
    assert directory.longest_prefix(ks) == miss_at


def test_add_remove_and_tiers(directory: Directory) -> None:
    ks = keys(3)
    directory.add(ks, "dram")
    directory.add(ks[:1], "disk")
    assert directory.tiers_of(ks[0]) == {"dram", "disk"}
    assert directory.tiers_of_many(ks) == [{"dram", "disk"}, {"dram"}, {"dram"}]
    directory.remove(ks[:2], "dram")
    assert directory.tiers_of_many(ks) == [{"disk"}, frozenset(), {"dram"}]
    assert directory.longest_prefix(ks) == 1
    directory.remove(ks)
    assert directory.tiers_of_many(ks) == [frozenset()] * 3
    assert len(directory) == 0


def test_dedupe_sixteen_sessions_share_a_system_prompt(directory: Directory) -> None:
    page = 1 << 20
    system = keys(32, "system")
    for session in range(16):
        prompt = system + keys(4, f"user-{session}")
        directory.record_store(prompt, page)
        directory.add(prompt, "dram")  # what the workers then report as saved
    d = directory.dedupe()
    unique = 32 + 16 * 4
    assert d.logical_blocks == 16 * 36 and d.logical_bytes == 16 * 36 * page
    assert d.physical_blocks == unique and d.physical_bytes == unique * page
    assert d.ratio == pytest.approx(16 * 36 / unique)


def test_dedupe_counts_a_block_stored_again_after_removal(directory: Directory) -> None:
    ks = keys(4)
    assert directory.record_store(ks, 100) == 4
    directory.add(ks, "dram")
    assert directory.record_store(ks, 100) == 0
    directory.remove(ks[:1])
    assert directory.record_store(ks, 100) == 1  # gone, so storing it again is physical
    assert directory.dedupe() == DedupeStats(1200, 500, 12, 5)


# -- instances and shared tiers --------------------------------------------------------------
def test_instances_see_own_tiers_and_shared_tiers_of_others(open_dirs) -> None:
    shared = frozenset({"redis", "disk"})
    a = open_dirs("a", shared_tiers=shared)
    b = open_dirs("b", shared_tiers=shared)
    ks = keys(4)
    a.add(ks, "dram")
    assert a.longest_prefix(ks) == 4
    assert b.longest_prefix(ks) == 0, "another instance's DRAM is not usable here"
    assert b.tiers_of(ks[0]) == frozenset()
    a.add(ks[:2], "disk")
    assert b.longest_prefix(ks) == 2, "a shared disk location is usable by everyone"
    assert b.tiers_of(ks[0]) == {"disk"}
    assert a.tiers_of(ks[0]) == {"dram", "disk"}
    assert b.locations(ks[0]) == {("a", "dram"), ("a", "disk")}


def test_a_tier_is_shared_only_where_configured(open_dirs) -> None:
    a = open_dirs("a", shared_tiers={"redis", "disk"})
    c = open_dirs("c", shared_tiers={"redis"})  # its disk is its own
    ks = keys(2)
    a.add(ks, "disk")
    assert c.longest_prefix(ks) == 0
    a.add(ks, "redis")
    assert c.longest_prefix(ks) == 2


def test_remove_private_tier_drops_own_location_only(open_dirs) -> None:
    a, b = open_dirs("a"), open_dirs("b")
    ks = keys(3)
    a.add(ks, "dram")
    b.add(ks, "dram")
    a.remove(ks, "dram")
    assert a.longest_prefix(ks) == 0
    assert b.longest_prefix(ks) == 3
    assert b.locations(ks[0]) == {("b", "dram")}


def test_remove_shared_tier_drops_every_instances_location(open_dirs) -> None:
    a, b = open_dirs("a"), open_dirs("b")
    ks = keys(2)
    a.add(ks, "redis")
    b.add(ks, "redis")
    b.add(ks, "dram")
    a.remove(ks, "redis")  # the shared page is gone, whoever recorded it
    assert a.longest_prefix(ks) == 0
    assert b.tiers_of(ks[0]) == {"dram"}


def test_remove_without_tier_drops_all_own_locations(open_dirs) -> None:
    a, b = open_dirs("a"), open_dirs("b")
    ks = keys(2)
    a.add(ks, "dram")
    a.add(ks, "redis")
    b.add(ks, "dram")
    a.remove(ks)
    assert b.locations(ks[0]) == {("b", "dram")}


# -- leases ------------------------------------------------------------------------------------
def test_lease_protects_blocks_from_collect(open_dirs) -> None:
    a, b = open_dirs("a"), open_dirs("b")
    ks = keys(4)
    a.add(ks[:2] + ks[3:], "redis")
    assert b.acquire_lease(ks, ttl_s=30) == 2, "leases stop at the first block not held"
    assert a.collect(ks, "redis") == ks[2:], "leased blocks are kept and not returned"
    assert b.longest_prefix(ks) == 2
    assert b.tiers_of(ks[3]) == frozenset()
    b.release_lease(ks[:2])
    assert a.collect(ks[:2], "redis") == ks[:2]
    assert b.longest_prefix(ks) == 0


def test_lease_is_refcounted_per_instance(open_dirs) -> None:
    a, b = open_dirs("a"), open_dirs("b")
    ks = keys(1)
    a.add(ks, "redis")
    assert b.acquire_lease(ks, ttl_s=30) == 1
    assert b.acquire_lease(ks, ttl_s=30) == 1
    assert a.acquire_lease(ks, ttl_s=30) == 1
    b.release_lease(ks)
    a.release_lease(ks)
    assert a.collect(ks, "redis") == [], "b still holds one reference"
    b.release_lease(ks)
    assert a.collect(ks, "redis") == ks


def test_lease_expires(open_dirs) -> None:
    a = open_dirs("a")
    ks = keys(1)
    a.add(ks, "redis")
    assert a.acquire_lease(ks, ttl_s=2.0) == 1
    assert a.collect(ks, "redis") == []  # within the lease (2 s: room for a busy host)
    assert wait_until(lambda: a.collect(ks, "redis") == ks, 10.0), "the lease never expired"


# -- TTLs --------------------------------------------------------------------------------------
def test_entries_of_a_dead_instance_expire(open_dirs, redis_server) -> None:
    dead = open_dirs("dead", ttl_s=1.0)  # long enough to see them first on a busy host
    alive = open_dirs("alive")
    ks = keys(3)
    dead.add(ks, "dram")
    assert alive.locations(ks[0]) == {("dead", "dram")}
    dead.close()
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:  # lookups by others do not keep them alive
        assert alive.longest_prefix(ks) == 0
        time.sleep(0.05)
    assert alive.locations(ks[0]) == frozenset()
    assert wait_until(lambda: raw(redis_server).dbsize() == 0, 10.0), "records carry a TTL"


def test_shared_locations_outlive_their_writer_while_used(open_dirs) -> None:
    # A page in a shared tier stays after its writer dies: hits by anyone renew it.
    writer, reader = open_dirs("writer", ttl_s=2.0), open_dirs("reader", ttl_s=2.0)
    ks = keys(2)
    writer.add(ks, "redis")
    writer.close()
    for _ in range(10):  # 3 s: well past the writer's TTL
        time.sleep(0.3)
        assert reader.longest_prefix(ks) == 2


def test_hits_refresh_entries(open_dirs) -> None:
    # Times from when the add returned (the server set the TTLs before): 1.5 s of slack
    # on either side of the renewal for a busy host.
    d = open_dirs("a", ttl_s=3.0)
    hit, control = keys(1, "hit"), keys(1, "control")
    d.add(hit + control, "dram")
    added = time.monotonic()
    time.sleep(1.6)  # past half-life: a hit renews the deadline
    assert d.longest_prefix(hit) == 1
    time.sleep(max(0.0, added + 3.1 - time.monotonic()))
    # The control has expired (3 s after the add), the renewed hit key not.
    assert d.longest_prefix(control) == 0
    assert d.longest_prefix(hit) == 1


# -- namespaces, tenants, key layout -----------------------------------------------------------
def test_namespaces_are_isolated(open_dirs) -> None:
    other_sig = hashlib.blake2b(b"other model", digest_size=32).digest()
    a = open_dirs("a", namespace=SIG)
    b = open_dirs("a", namespace=other_sig)
    ks = keys(4)
    a.add(ks, "dram")
    a.record_store(ks, 10)
    assert b.longest_prefix(ks) == 0
    assert len(b) == 0 and b.dedupe() == DedupeStats()


def test_tenant_namespaces_never_see_each_other(open_dirs) -> None:
    ns_a, ns_b, ns_none = (namespace_for(SIG, t) for t in ("tenant-a", "tenant-b", None))
    assert len({ns_a, ns_b, ns_none}) == 3
    assert namespace_for(SIG) == ns_none == RedisKeys(ns_none).namespace
    a = open_dirs("i1", namespace=ns_a, shared_tiers={"redis", "dram"})
    b = open_dirs("i1", namespace=ns_b, shared_tiers={"redis", "dram"})
    ks = keys(8)
    a.add(ks, "dram")
    a.add(ks, "redis")
    assert a.longest_prefix(ks) == 8
    assert b.longest_prefix(ks) == 0
    assert b.tiers_of_many(ks) == [frozenset()] * 8
    assert b.acquire_lease(ks, 10) == 0
    assert b.collect(ks, "redis") == ks and a.longest_prefix(ks) == 8


def test_signature_bytes_and_namespace_for_agree(open_dirs) -> None:
    a = open_dirs("a", namespace=SIG)
    b = open_dirs("a", namespace=namespace_for(SIG))
    a.add(keys(2), "dram")
    assert b.longest_prefix(keys(2)) == 2


def test_all_keys_of_a_namespace_share_one_cluster_slot(open_dirs, redis_server) -> None:
    from redis.crc import key_slot

    a = open_dirs("a", namespace=namespace_for(SIG, "t1"))
    b = open_dirs("b", namespace=namespace_for(SIG, "t2"))
    for d in (a, b):
        ks = keys(50)
        d.add(ks, "dram")
        d.record_store(ks, 1)
        d.acquire_lease(ks, 30)
    r = raw(redis_server)
    slots: dict[str, set[int]] = {}
    for name in r.scan_iter(count=1000):
        ns = name.split(b"{", 1)[1].split(b"}", 1)[0].decode()
        slots.setdefault(ns, set()).add(key_slot(name))
    assert set(slots) == {a.keys.namespace, b.keys.namespace}
    for ns, seen in slots.items():
        assert seen == {key_slot(ns.encode())}, f"namespace {ns} spans slots {seen}"


@pytest.mark.parametrize("bad", ["", "has space", "a|b", "x" * 200, "{tag}"])
def test_bad_names_are_rejected(redis_server, bad: str) -> None:
    with pytest.raises(ValueError):
        RedisDirectory(redis_server.url, namespace=bad, instance_id="a")
    with pytest.raises(ValueError):
        RedisDirectory(redis_server.url, namespace=SIG, instance_id=bad)


# -- bad data in Redis ---------------------------------------------------------------------------
def test_foreign_values_read_as_misses(open_dirs, redis_server) -> None:
    d = open_dirs("a")
    ks = keys(5)
    d.add(ks, "dram")
    r = raw(redis_server)
    r.delete(d.keys.block(ks[2]))
    r.set(d.keys.block(ks[2]), b"not a hash")  # WRONGTYPE for every hash command
    r.hset(d.keys.block(ks[3]), mapping={"a|dram": "garbage", "no-bar": "1"})
    r.hset(d.keys.block(ks[4]), b"a|\xff\xfe", b"99999999999999")  # not UTF-8
    assert d.longest_prefix(ks) == 2
    assert d.longest_prefix(ks[3:]) == 0
    assert d.tiers_of_many(ks) == [{"dram"}, {"dram"}, frozenset(), frozenset(),
                                   {"dram", "\ufffd\ufffd"}]
    assert len(d.locations(ks[4])) == 2
    d.add(ks, "dram")  # writes over foreign data must not raise either
    d.remove(ks)
    assert d.collect(ks, "dram") == ks
    assert d.acquire_lease(ks, 5) == 0
    assert d.stats()["available"] == 1.0


def test_flushall_under_use_reads_as_misses(open_dirs, redis_server) -> None:
    d = open_dirs("a")
    ks = keys(8)
    d.add(ks, "dram")
    assert d.longest_prefix(ks) == 8
    r = raw(redis_server)
    r.flushall()
    assert d.longest_prefix(ks) == 0
    r.script_flush()  # scripts are re-sent transparently (NOSCRIPT)
    d.add(ks, "dram")
    assert d.longest_prefix(ks) == 8
    stats = d.stats()
    assert stats["errors"] == 0 and stats["available"] == 1.0


# -- outages -------------------------------------------------------------------------------------
def test_killed_redis_returns_misses_fast_and_never_raises(open_dirs, redis_server) -> None:
    d = open_dirs("a")
    ks = keys(64)
    d.add(ks, "dram")
    assert d.longest_prefix(ks) == 64
    redis_server.kill()
    slowest = 0.0
    for _ in range(50):
        for call in (
            lambda: d.longest_prefix(ks),
            lambda: d.tiers_of(ks[0]),
            lambda: d.tiers_of_many(ks),
            lambda: d.acquire_lease(ks, 5),
            lambda: d.collect(ks, "dram"),
            lambda: len(d),
            lambda: d.locations(ks[0]),
        ):
            start = time.monotonic()
            result = call()
            slowest = max(slowest, time.monotonic() - start)
            miss = not any(result) if isinstance(result, list) else not result
            assert miss, f"outage must read as a miss, got {result!r}"
        start = time.monotonic()
        d.add(ks[:1], "disk")
        d.remove(ks[:1], "dram")
        d.release_lease(ks[:1])
        d.record_store(ks[:1], 10)
        slowest = max(slowest, time.monotonic() - start)
    assert d.dedupe() == DedupeStats()
    assert slowest < 1.0, f"a call took {slowest:.3f} s with Redis down"
    stats = d.stats()
    assert stats["available"] == 0.0 and stats["outages"] == 1.0
    assert stats["short_circuits"] > 300, "the breaker must stop calls reaching the network"
    assert stats["queued"] == 200 and stats["misses"] >= 100


def test_restart_reconnects_and_flushes_queued_writes(open_dirs, redis_server) -> None:
    d = open_dirs("a")
    before, during = keys(4, "before"), keys(4, "during")
    d.add(before, "dram")
    redis_server.kill()
    assert d.longest_prefix(before) == 0
    d.record_store(during, 7)
    d.add(during, "dram")
    d.add(during[:1], "disk")
    d.remove(during[:1], "disk")  # order is kept on replay
    assert d.stats()["queued"] == 4
    redis_server.restart()
    assert wait_until(lambda: d.stats()["available"] == 1.0), "no reconnect"
    stats = d.stats()
    assert stats["reconnects"] == 1 and stats["flushed"] == 4 and stats["queued"] == 0
    assert d.longest_prefix(during) == 4
    assert d.tiers_of(during[0]) == {"dram"}
    assert d.longest_prefix(before) == 0, "the restarted server is empty"
    assert d.dedupe() == DedupeStats(28, 28, 4, 4)


def test_write_queue_is_bounded_and_drops_oldest(open_dirs, redis_server) -> None:
    d = open_dirs("a", link=LinkOptions(
        socket_timeout_s=0.25, connect_timeout_s=0.25, backoff_initial_s=0.02,
        backoff_max_s=0.2, queue_max_ops=3,
    ))
    redis_server.kill()
    batches = [keys(2, f"batch-{i}") for i in range(5)]
    for batch in batches:
        d.add(batch, "dram")
    stats = d.stats()
    assert stats["dropped"] == 2 and stats["queued"] == 3
    redis_server.restart()
    assert wait_until(lambda: d.stats()["available"] == 1.0)
    assert [d.longest_prefix(b) for b in batches] == [0, 0, 2, 2, 2]


def test_redis_down_at_start(open_dirs, redis_server) -> None:
    redis_server.kill()
    d = open_dirs("a")
    start = time.monotonic()
    assert d.longest_prefix(keys(8)) == 0
    d.add(keys(8), "dram")
    assert time.monotonic() - start < 1.0
    redis_server.restart()
    assert wait_until(lambda: d.longest_prefix(keys(8)) == 8)


def test_unresponsive_redis_costs_one_timeout_not_one_per_call() -> None:
    # A listener that accepts connections and never answers: every command would
    # wait for the socket timeout if the breaker did not open.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        start = time.monotonic()  # the start-up probe pays the one timeout
        d = RedisDirectory(
            f"redis://127.0.0.1:{port}/0",
            namespace=SIG,
            instance_id="a",
            options=RedisDirectoryOptions(link=LinkOptions(
                socket_timeout_s=0.3, connect_timeout_s=0.3, backoff_initial_s=5.0,
                backoff_max_s=5.0,
            )),
        )
        try:
            results = [d.longest_prefix(keys(4)) for _ in range(50)]
            elapsed = time.monotonic() - start
        finally:
            d.close()
    assert results == [0] * 50
    # One 0.3 s timeout, not fifty (15 s).
    assert 0.25 < elapsed < 1.5, f"50 lookups took {elapsed:.2f} s (one timeout expected)"


def test_concurrent_callers_during_an_outage(open_dirs, redis_server) -> None:
    d = open_dirs("a")
    ks = keys(16)
    d.add(ks, "dram")
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(200):
                d.longest_prefix(ks)
                d.add(ks[:1], "dram")
        except BaseException as exc:  # the test fails on any exception
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    redis_server.kill()
    time.sleep(0.2)
    redis_server.restart()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert wait_until(lambda: d.stats()["available"] == 1.0)
    assert d.longest_prefix(ks[:1]) == 1


# -- construction ------------------------------------------------------------------------------
def test_make_directory(redis_server) -> None:
    assert isinstance(make_directory(None, namespace=SIG, instance_id="a"), EmbeddedDirectory)
    assert isinstance(make_directory("  ", namespace=SIG, instance_id="a"), EmbeddedDirectory)
    d = make_directory(redis_server.url, namespace=SIG, instance_id="a")
    try:
        assert isinstance(d, RedisDirectory)
        d.add(keys(1), "dram")
        assert d.longest_prefix(keys(1)) == 1
    finally:
        d.close()
    for bad in ("http://127.0.0.1:6379", "127.0.0.1:6379", "redis://host:notaport/0"):
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            make_directory(bad, namespace=SIG, instance_id="a")


def test_embedded_optional_methods_have_safe_defaults() -> None:
    d = EmbeddedDirectory()
    ks = keys(3)
    d.add(ks[:2], "dram")
    assert d.acquire_lease(ks, 5) == 2
    d.release_lease(ks[:2])
    assert d.collect(ks[:1], "dram") == ks[:1]
    assert d.longest_prefix(ks) == 0
    assert d.stats() == {"entries": 1.0}
    d.close()


def test_lookup_stats(open_dirs) -> None:
    d = open_dirs("a")
    d.add(keys(2), "dram")
    d.longest_prefix(keys(3))
    d.longest_prefix(keys(1, "x"))
    s = d.stats()
    assert (s["lookups"], s["hits"], s["misses"], s["hit_blocks"]) == (2, 1, 1, 2)

"""The directory and the Redis page tier on a real Redis Cluster (3 masters + 3
replicas on 127.0.0.1, tests/redis_fixtures.py): every script's keys in one slot,
batches split per node by the cluster pipeline, namespaces spread over the masters,
and a master killed under load costs misses, never a wrong answer, and hits resume
after the replica takes over."""

from __future__ import annotations

import threading
import time

import pytest
from redis_fixtures import key, keys, redis_cluster, wait_until  # noqa: F401 - session fixture

from symram_vllm.directory import make_directory, namespace_for
from symram_vllm.directory.async_directory import AsyncDirectory, AsyncDirectoryOptions
from symram_vllm.directory.redis_directory import RedisDirectory, RedisDirectoryOptions
from symram_vllm.keys import BlockKey
from symram_vllm.redis_keys import RedisKeys
from symram_vllm.redis_link import LinkOptions, RedisLink
from symram_vllm.tiers.redis_tier import RedisPageTier, RedisPageTierOptions

pytestmark = pytest.mark.timeout(120)

# A killed node refuses connections at once; a 2 s socket timeout (as the product's
# redis.socket_timeout_s) keeps a busy host's slow answer from counting as an outage
# (misses, and one more outage than the failover test allows).
FAST = LinkOptions(socket_timeout_s=2.0, connect_timeout_s=0.5, backoff_initial_s=0.05,
                   backoff_max_s=0.3)



def open_dir(cluster, ns: str = "cluster-ns", instance: str = "a", **kw) -> RedisDirectory:
    return RedisDirectory(cluster.url, namespace=ns, instance_id=instance,
                          options=RedisDirectoryOptions(link=FAST, **kw))


def test_directory_on_a_cluster(redis_cluster):  # noqa: F811
    a, b = open_dir(redis_cluster, instance="a"), open_dir(redis_cluster, instance="b")
    try:
        assert a.link.cluster
        doc = keys(40, "doc")
        a.add(doc[:30], "dram")
        b.add(doc[:10], "redis")
        assert a.longest_prefix(doc) == 30 and b.longest_prefix(doc) == 10
        assert a.tiers_of_many(doc[:2]) == [frozenset({"dram", "redis"})] * 2
        assert b.acquire_lease(doc, 5.0) == 10
        assert a.collect(doc[:12], "redis") == doc[10:12]  # leased ones are kept
        b.release_lease(doc[:10])
        assert a.record_store(doc[30:], 100) == 10
        assert a.dedupe().physical_blocks >= 10
        assert len(a) >= 30
    finally:
        a.close()
        b.close()


def test_cluster_flag_with_a_plain_url(redis_cluster):  # noqa: F811
    url = f"redis://127.0.0.1:{redis_cluster.ports[0]}/0"
    d = RedisDirectory(url, namespace="flag-ns", instance_id="a",
                       options=RedisDirectoryOptions(link=LinkOptions(cluster=True)))
    try:
        d.add(keys(3, "flag"), "dram")
        assert d.longest_prefix(keys(3, "flag")) == 3
    finally:
        d.close()


def test_namespaces_spread_over_the_masters(redis_cluster):  # noqa: F811
    masters = {redis_cluster.master_of(RedisKeys(namespace_for(bytes([i]) * 32)).stats)
               for i in range(24)}
    assert len(masters) == 3


def test_a_batch_is_one_pipelined_round_trip(redis_cluster):  # noqa: F811
    # Batches are counted per step: no idle flush (after 1 s without a step, by default)
    # may send part of one when a busy host stalls the test between two steps.
    d = AsyncDirectory(open_dir(redis_cluster, ns="batch-ns"),
                       AsyncDirectoryOptions(interval_s=0.001, idle_flush_s=60))
    try:
        shared = keys(8, "shared")
        d.inner.add(shared, "redis")
        for step in range(5):
            for r in range(64):
                d.record_store([key(step, f"r{r}")], 1024)
                d.register([key(step, f"r{r}")], "dram")
            d.lookup(f"w{step}", shared)
            d.end_step()
            assert wait_until(lambda s=step: d.stats()["round_trips"] == s + 1, 10)
        assert d.inner.stats()["round_trips"] == 5  # no hidden SCRIPT EXISTS / retries
        assert d.lookup("w4", shared).leased == 8
        assert d.inner.longest_prefix([key(s, "r63") for s in range(5)]) == 5
    finally:
        d.close()


def test_page_tier_on_a_cluster(redis_cluster):  # noqa: F811
    tier = RedisPageTier(redis_cluster.url, namespace="pages-ns", capacity_bytes=3000,
                         options=RedisPageTierOptions(link=FAST))
    try:
        pages = [BlockKey(key(i, "pg"), 0) for i in range(4)]
        for page in pages:
            assert tier.set(page, b"p" * 900)
        # The budget holds 3: one of the first three went (sets in one millisecond tie
        # on the LRU score), the last one is there.
        assert tier.get(pages[3]) == b"p" * 900
        assert sum(tier.get(page) is None for page in pages[:3]) == 1
        assert tier.stats().pages == 3
    finally:
        tier.close()


def test_make_directory_accepts_cluster_urls(redis_cluster):  # noqa: F811
    d = make_directory(redis_cluster.url, namespace="factory-ns", instance_id="a")
    try:
        assert isinstance(d, RedisDirectory) and d.link.cluster
    finally:
        d.close()
    with pytest.raises(ValueError, match="bad port"):
        RedisLink("redis+cluster://127.0.0.1:notaport", verify=False)


def test_killed_master_costs_misses_then_hits_resume(redis_cluster):  # noqa: F811
    ns = "failover-ns"
    d = open_dir(redis_cluster, ns=ns)
    fleet = AsyncDirectory(open_dir(redis_cluster, ns=ns, instance="async"),
                           AsyncDirectoryOptions(interval_s=0.01, idle_flush_s=0.05))
    victim = redis_cluster.master_of(RedisKeys(ns).stats)
    held = keys(32, "held")
    never = keys(8, "never")
    d.add(held, "dram")
    assert d.longest_prefix(held) == 32
    redis_cluster.wait_replicated(victim)
    results: list[tuple[int, int]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            try:
                results.append((d.longest_prefix(held), d.longest_prefix(never)))
                d.add([key(i, "load")], "dram")
                fleet.register([key(i, "async")], "dram")
                fleet.end_step()
            except BaseException as exc:  # the directory must never raise
                failures.append(exc)
            i += 1
            time.sleep(0.005)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        assert wait_until(lambda: len(results) > 20)
        redis_cluster.kill(victim)
        assert wait_until(lambda: any(r == (0, 0) for r in results[-5:]), 10)  # misses
        assert wait_until(lambda: victim not in redis_cluster.masters()
                          and len(redis_cluster.masters()) == 3, 30, step=0.2)
        assert wait_until(lambda: d.longest_prefix(held) == 32, 30), "hits did not resume"
        registered_during = len(results)
        assert wait_until(lambda: len(results) > registered_during + 20)
    finally:
        stop.set()
        worker.join(10)
    try:
        assert not failures
        assert all(n in (0, 32) and m == 0 for n, m in results)  # a miss, never a wrong hit
        assert d.link.available
        # One outage per failover: the breaker stays open until every master of the
        # re-read slot map answers (a random node would answer too early and the
        # breaker would flap). A loaded machine may add one more timeout.
        assert 1 <= d.link.outages <= 2 and 1 <= fleet.inner.link.outages <= 2
        # Writes queued by the async directory during the outage were replayed.
        late = [key(i, "async") for i in range(len(results) - 10, len(results))]
        assert wait_until(lambda: fleet.inner.longest_prefix(late) == len(late), 10)
    finally:
        fleet.close()
        d.close()
        redis_cluster.restart(victim)
        redis_cluster.wait_healthy()


def test_cluster_url_parsing():
    from symram_vllm.redis_link import _cluster_nodes, make_client

    nodes, extra = _cluster_nodes(
        "rediss+cluster://user:p%40ss@10.0.0.1:7000,10.0.0.2/?ssl_ca_certs=/etc/ca.pem")
    assert [(n.host, n.port) for n in nodes] == [("10.0.0.1", 7000), ("10.0.0.2", 6379)]
    assert extra == {"username": "user", "password": "p@ss", "ssl_ca_certs": "/etc/ca.pem"}
    with pytest.raises(ValueError, match="no host:port"):
        make_client("redis+cluster://", LinkOptions())
    with pytest.raises(ValueError, match="unsupported Redis URL"):
        make_client("http://127.0.0.1:1", LinkOptions())


def test_cluster_down_at_start_serves_misses_then_connects(redis_cluster):  # noqa: F811
    from symram_vllm.serving.engine_process import free_port

    dead = f"redis+cluster://127.0.0.1:{free_port()}"
    start = time.monotonic()
    d = RedisDirectory(dead, namespace="late-ns", instance_id="a",
                       options=RedisDirectoryOptions(link=FAST))
    try:
        assert time.monotonic() - start < 2.0
        assert not d.link.available and d.longest_prefix(keys(3, "late")) == 0
        d.add(keys(3, "late"), "dram")  # queued
        d.link.url = redis_cluster.url  # the nodes answer now (test-only redirection)
        assert wait_until(lambda: d.link.available, 20)
        assert wait_until(lambda: d.longest_prefix(keys(3, "late")) == 3, 20)
    finally:
        d.close()

"""The asynchronous directory over a real redis-server: a scheduler step of 256
running requests is one pipelined round trip (counted by the server itself), leases
taken by batches protect pages from collection, scripts lost by a restart are loaded
again, and writes queued during an outage reach Redis when it is back."""

from __future__ import annotations

import threading

import pytest
import redis
from redis_fixtures import key, keys, wait_until

from symram_vllm.directory import open_fleet_directory
from symram_vllm.directory.async_directory import AsyncDirectory, AsyncDirectoryOptions
from symram_vllm.directory.batch import DirectoryBatch, LeaseQuery, WriteOp
from symram_vllm.directory.redis_directory import RedisDirectory, RedisDirectoryOptions
from symram_vllm.directory.redis_settings import RedisSettings
from symram_vllm.redis_link import LinkOptions

pytestmark = pytest.mark.timeout(120)

# The outage here is a killed redis-server (refused at once): a 2 s socket timeout only
# keeps a busy host's slow answer from reading as an outage.
FAST = LinkOptions(socket_timeout_s=2.0, connect_timeout_s=2.0, backoff_initial_s=0.02,
                   backoff_max_s=0.2)



@pytest.fixture
def dirs(redis_server):
    made: list[RedisDirectory | AsyncDirectory] = []

    def sync(instance: str = "a", **kw) -> RedisDirectory:
        d = RedisDirectory(redis_server.url, namespace="ns-async", instance_id=instance,
                           options=RedisDirectoryOptions(link=FAST, **kw))
        made.append(d)
        return d

    def fleet(instance: str = "a", **kw) -> AsyncDirectory:
        kw.setdefault("interval_s", 0.001)
        d = AsyncDirectory(sync(instance), AsyncDirectoryOptions(**kw))
        made.append(d)
        return d

    yield sync, fleet
    for d in reversed(made):
        d.close()


def client_commands(r: redis.Redis) -> int:
    """Commands clients sent (INFO commandstats counts calls made inside scripts too,
    so count the script calls themselves)."""
    stats = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
               for name in ("evalsha", "eval", "hgetall"))


def test_a_step_of_256_requests_is_one_round_trip(dirs, redis_server):
    sync, fleet = dirs
    other = sync("other")
    doc = keys(16, "doc")
    other.add(doc, "redis")
    # Batches are counted per step: no idle flush (after 1 s without a step, by default)
    # may send part of one when a busy host stalls the test between two steps.
    d = fleet("a", idle_flush_s=60)
    calls_on_scheduler: list[str] = []
    inner = d.inner
    for name in ("add", "remove", "acquire_lease", "record_store", "tiers_of_many", "dedupe"):
        original = getattr(inner, name)

        def spy(*a, _name=name, _original=original, **kw):
            if threading.current_thread() is threading.main_thread():
                calls_on_scheduler.append(_name)
            return _original(*a, **kw)

        setattr(inner, name, spy)
    raw = redis.Redis.from_url(redis_server.url)
    steps = 10
    for step in range(steps):
        for r in range(256):
            filled = [key(step, f"req{r}")]
            d.record_store(filled, 4096)
            d.held_local(filled)
            d.register(filled, "dram")
        d.lookup(f"waiting{step}", doc)
        d.end_step()
        assert wait_until(lambda s=step: d.stats()["round_trips"] == s + 1)
    assert not calls_on_scheduler
    assert inner.stats()["round_trips"] == steps
    assert d.stats()["fleet_answers"] == steps
    assert d.lookup(f"waiting{steps - 1}", doc).leased == 16
    assert inner.longest_prefix([key(s, "req255") for s in range(steps)]) == steps
    # Commands per step do not grow with the batch: ~4 script calls, not 256 x 3.
    before = client_commands(raw)
    for r in range(256):
        d.record_store([key(99, f"req{r}")], 4096)
        d.register([key(99, f"req{r}")], "dram")
    d.end_step()
    assert wait_until(lambda: d.stats()["round_trips"] == steps + 1)
    assert client_commands(raw) - before <= 4  # add + record_store (+ dedupe)
    raw.close()


def test_batch_leases_protect_pages_from_collection(dirs):
    sync, _ = dirs
    a, b = sync("a"), sync("b")
    doc = keys(6, "lease")
    b.add(doc, "redis")
    result = a.apply_batch(DirectoryBatch(leases=[LeaseQuery(doc, 5.0)]))
    assert result.ok and result.leased == [6]
    assert b.collect(doc, "redis") == []  # all leased
    a.apply_batch(DirectoryBatch(writes=[WriteOp("release", doc)]))
    assert b.collect(doc, "redis") == doc


def test_keys_leased_past_a_gap_are_returned_for_release(dirs):
    sync, _ = dirs
    a, b = sync("a", lookup_chunk=4, first_chunk=4), sync("b")
    doc = keys(12, "gap")
    b.add(doc[:2] + doc[4:], "redis")  # blocks 2 and 3 are missing
    result = a.apply_batch(DirectoryBatch(leases=[LeaseQuery(doc, 5.0)]))
    assert result.leased == [2]
    assert result.over_leased == doc[4:12]  # later chunks answered anyway
    a.apply_batch(DirectoryBatch(writes=[WriteOp("release", doc[:2] + result.over_leased)]))
    assert b.collect(doc[4:5], "redis") == doc[4:5]
    fleet = AsyncDirectory(a, AsyncDirectoryOptions(interval_s=0.001))
    try:
        fleet.lookup("r", doc)
        fleet.end_step()
        assert wait_until(lambda: fleet.stats()["fleet_answers"] == 1)
        fleet.end_step()  # the release of the over-leased keys goes out
        assert wait_until(lambda: b.collect(doc[5:], "redis") == doc[5:])
    finally:
        fleet.close()


def test_scripts_lost_by_the_server_are_loaded_again(dirs, redis_server):
    sync, _ = dirs
    d = sync("a")
    raw = redis.Redis.from_url(redis_server.url)
    raw.script_flush()
    result = d.apply_batch(DirectoryBatch(writes=[WriteOp("add", keys(3, "ns"), "dram")],
                                          leases=[LeaseQuery(keys(3, "ns"), 1.0)]))
    assert result.ok and result.leased == [3]
    assert d._batcher.noscript_reloads == 1
    raw.close()


def test_writes_queued_during_an_outage_reach_redis(dirs, redis_server):
    _, fleet = dirs
    d = fleet("a", idle_flush_s=0.02)
    redis_server.kill()
    d.register(keys(5, "outage"), "dram")
    d.record_store(keys(5, "outage"), 10)
    answer = d.lookup("r", keys(8, "outage"))
    assert answer.held == 5 and answer.pending  # local knowledge answers at once
    d.end_step()
    assert wait_until(lambda: d.stats()["round_trips"] >= 1 and d.stats()["available"] == 0.0)
    assert wait_until(lambda: d.lookup("r", keys(8, "outage")).held == 5)
    redis_server.restart()
    assert wait_until(lambda: d.stats()["available"] == 1.0)
    assert wait_until(lambda: d.inner.longest_prefix(keys(5, "outage")) == 5)


def test_fleet_directory_from_settings(redis_server):
    settings = RedisSettings(batch_interval_s=0.001, lease_ttl_s=5, fleet_answer_ttl_s=1)
    d = open_fleet_directory(redis_server.url, namespace="ns-settings", instance_id="x",
                             settings=settings)
    try:
        assert d.inner.options.lease_ttl_s == 5 and d.options.answer_ttl_s == 1
        assert d.inner.link.options.pool_size == settings.pool_size
    finally:
        d.close()
    embedded = open_fleet_directory(None, namespace="ns", instance_id="x")
    try:
        assert not embedded.inner.shared
    finally:
        embedded.close()


def test_a_full_connection_pool_is_not_an_outage(redis_server):
    d = RedisDirectory(redis_server.url, namespace="ns-pool", instance_id="a",
                       options=RedisDirectoryOptions(link=LinkOptions(pool_size=1)))
    try:
        d.add(keys(2, "pool"), "dram")
        held = d.link.client.connection_pool.get_connection()  # the only connection
        assert d.longest_prefix(keys(2, "pool")) == 0  # the fallback, at once
        assert d.link.available and d.link.outages == 0
        d.link.client.connection_pool.release(held)
        assert d.longest_prefix(keys(2, "pool")) == 2
    finally:
        d.close()

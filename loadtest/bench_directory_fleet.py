"""Fleet figures of the directory benchmark (part of `make bench-directory`):

* **cluster next to single node**: 64-key prefix lookups (an 8k-token prompt at block
  size 128) on one redis-server and on a 3-master + 3-replica Redis Cluster;
* **sharding** on the cluster: every key of a namespace in one slot (one script call
  on one node: symram's layout) against keys spread over all slots (a per-node
  pipeline of HGETALLs, judged client-side: the only way once keys live on several
  nodes);
* **the scheduling path**: the time one scheduler step with 256 running requests
  spends in directory calls, synchronous (record_store + tiers_of_many per request,
  add per report: today's calls) against the AsyncDirectory (in-process only), and
  its round trips per step;
* **ask or mirror**: one batched lease lookup for 32 waiting requests (one round trip
  per step) against refreshing a local mirror of a 100k-entry namespace (SCAN +
  HGETALL), the alternative the issue named.

Arms alternate inside each repeat; medians over repeats are reported.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.bench_timing import alternate, ms, percentile
from loadtest.redis_cluster import RedisClusterServers, cluster_binaries
from symram_vllm.directory.async_directory import AsyncDirectory, AsyncDirectoryOptions
from symram_vllm.directory.batch import DirectoryBatch, LeaseQuery
from symram_vllm.directory.redis_directory import RedisDirectory, RedisDirectoryOptions
from symram_vllm.redis_link import LinkOptions

BLOCKS = 64
BENCH = RedisDirectoryOptions(link=LinkOptions(socket_timeout_s=10.0, connect_timeout_s=5.0))
RUNNING = 256


def chain(i: int, salt: str = "") -> bytes:
    return hashlib.blake2b(f"{salt}/{i}".encode(), digest_size=32).digest()


def spread_keys(ns: str, chain_keys: list[bytes]) -> list[str]:
    """Block records without a hash tag: each key hashes to its own slot."""
    return [f"symram:spread:{ns}:blk:{k.hex()}" for k in chain_keys]


def spread_lookup(client: Any, names: list[str], me: bytes) -> int:
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(name)
    held, now_ms = 0, time.time() * 1000
    for row in pipe.execute():
        if not any(f.startswith(me + b"|") and float(v) > now_ms for f, v in row.items()):
            break
        held += 1
    return held


def bench_lookup_and_sharding(single_url: str, cluster_url: str, repeats: int, n: int) -> dict:
    keys = [chain(i, "fleet") for i in range(BLOCKS)]
    single = RedisDirectory(single_url, namespace="bench-fleet", instance_id="bench",
                            options=BENCH)
    cluster = RedisDirectory(cluster_url, namespace="bench-fleet", instance_id="bench",
                             options=BENCH)
    try:
        for d in (single, cluster):
            d.add(keys, "dram")
            assert d.longest_prefix(keys) == BLOCKS
        names = spread_keys("bench-fleet", keys)
        client = cluster.link.client
        deadline = str(int(time.time() * 1000) + 3_600_000)
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hset(name, "bench|dram", deadline)
        pipe.execute()
        nodes = {client.get_node_from_key(name).name for name in names}
        assert spread_lookup(client, names, b"bench") == BLOCKS
        result = alternate(repeats, n, {
            "single_node": lambda: single.longest_prefix(keys),
            "cluster_namespace_slot": lambda: cluster.longest_prefix(keys),
            "cluster_spread_slots": lambda: spread_lookup(client, names, b"bench"),
        })
        result["spread_nodes"] = len(nodes)
        return result
    finally:
        single.close()
        cluster.close()


def scheduler_step_sync(d: RedisDirectory, step: int) -> None:
    """Today's calls of one step: per running request whose block filled,
    record_store + tiers_of_many (build_connector_meta), then add (the workers'
    reports) - each a round trip."""
    for r in range(RUNNING):
        filled = [chain(step, f"req{r}")]
        d.record_store(filled, 4096)
        d.tiers_of_many(filled)
    d.add([chain(step - 1, f"req{r}") for r in range(RUNNING)], "dram")


def scheduler_step_async(d: AsyncDirectory, step: int, waiting: int = 4) -> None:
    for r in range(RUNNING):
        filled = [chain(step, f"req{r}")]
        d.record_store(filled, 4096)
        d.held_local(filled)
    d.register([chain(step - 1, f"req{r}") for r in range(RUNNING)], "dram")
    for w in range(waiting):
        d.lookup(f"w{step}-{w}", [chain(i, "fleet") for i in range(BLOCKS)])
    d.end_step()


def bench_scheduler_path(url: str, label: str, steps: int) -> dict:
    sync = RedisDirectory(url, namespace=f"bench-step-{label}", instance_id="bench", options=BENCH)
    fleet = AsyncDirectory(RedisDirectory(url, namespace=f"bench-step-{label}",
                                          instance_id="bench-async", options=BENCH),
                           AsyncDirectoryOptions(interval_s=0.001))
    sync_s, async_s = [], []
    try:
        for step in range(steps):
            start = time.perf_counter()
            scheduler_step_sync(sync, step)
            sync_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            scheduler_step_async(fleet, step)
            async_s.append(time.perf_counter() - start)
            deadline = time.monotonic() + 10  # "the model runs": the batch goes out
            while fleet.stats()["round_trips"] < step + 1 and time.monotonic() < deadline:
                time.sleep(0.0005)
        trips = fleet.stats()["round_trips"]
        return {
            "running_requests": RUNNING,
            "steps": steps,
            "sync_step_ms_median": ms(statistics.median(sync_s)),
            "async_step_ms_median": ms(statistics.median(async_s)),
            "async_step_ms_p95": ms(percentile(async_s, 0.95)),
            "sync_over_async": round(statistics.median(sync_s) / statistics.median(async_s), 1),
            "async_round_trips_per_step": round(trips / steps, 3),
            "async_batch_ms_last": ms(fleet.stats()["last_batch_s"]),
        }
    finally:
        sync.close()
        fleet.close()


def bench_ask_or_mirror(url: str, repeats: int, entries: int = 100_000,
                        waiting: int = 32) -> dict:
    d = RedisDirectory(url, namespace="bench-mirror", instance_id="bench", options=BENCH)
    try:
        filler = [chain(i, "mirror") for i in range(entries)]
        for s in range(0, entries, 2048):
            d.add(filler[s:s + 2048], "dram")
        prompts = [[chain(i, "mirror") for i in range(w * BLOCKS, (w + 1) * BLOCKS)]
                   for w in range(waiting)]
        client = d.link.client

        def mirror() -> int:
            count = 0
            pipe = client.pipeline(transaction=False)
            for name in client.scan_iter(match=d.keys.block_pattern, count=5000):
                pipe.hgetall(name)
                count += 1
                if len(pipe) >= 5000:
                    pipe.execute()
            pipe.execute()
            return count

        def ask() -> list[int]:
            batch = DirectoryBatch(leases=[LeaseQuery(p, 1.0) for p in prompts])
            return d.apply_batch(batch).leased

        assert ask() == [BLOCKS] * waiting
        ask_s, mirror_s = [], []
        for r in range(repeats):
            order = [("ask", ask, ask_s), ("mirror", mirror, mirror_s)]
            for _, fn, out in (order if r % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                fn()
                out.append(time.perf_counter() - start)
        return {
            "entries": entries,
            "waiting_requests": waiting,
            "blocks_per_request": BLOCKS,
            "ask_one_round_trip_ms": ms(statistics.median(ask_s)),
            "mirror_refresh_ms": ms(statistics.median(mirror_s)),
            "mirror_over_ask": round(statistics.median(mirror_s) / statistics.median(ask_s), 1),
        }
    finally:
        d.close()


def run(single_url: str, repeats: int, lookups: int) -> dict:
    """All fleet figures; starts (and stops) its own 3+3 Redis Cluster."""
    binaries = cluster_binaries()
    out: dict[str, Any] = {
        "scheduler_path_single_node": bench_scheduler_path(single_url, "single", 30),
        "ask_or_mirror": bench_ask_or_mirror(single_url, repeats),
    }
    if binaries is None:
        out["cluster"] = "skipped: redis-server / redis-cli not installed"
        return out
    cluster = RedisClusterServers(Path(tempfile.mkdtemp(prefix="symram-bench-cluster-")),
                                  *binaries).start()
    try:
        out["lookup_64_keys"] = bench_lookup_and_sharding(single_url, cluster.url, repeats,
                                                          lookups)
        out["scheduler_path_cluster"] = bench_scheduler_path(cluster.url, "cluster", 30)
        out["cluster_nodes"] = {"masters": 3, "replicas": 3}
    finally:
        cluster.stop()
    return out

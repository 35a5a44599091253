"""Directory benchmark (not a timed test): the embedded directory against the Redis one.

* prefix-lookup latency p50/p95 for an 8k-token prompt: 64 block keys (block size
  128, the demo model's) and 512 keys (block size 16, vLLM's default), all held;
* the lookup strategy behind docs/directory.md: the Lua script the directory uses
  (64 keys, then up to 512 per call) against one call for all keys and against a
  pipeline of HGETALLs evaluated client-side (32 keys per round trip), on a full
  hit and on a miss at the first key;
* `tiers_of` per key (what the scheduler does today) against one `tiers_of_many`;
* registration throughput (keys/s) in batches of 64 keys, as workers report them;
* dedupe on 16 sessions sharing a 32-block system prompt (4 own blocks each):
  physical bytes over unique blocks x page size (1.0 = perfect dedupe);
* the Redis page tier's set/get throughput on 1.5 MiB pages, for scale;
* fleet figures (loadtest/bench_directory_fleet.py): the same lookups on a 3-master +
  3-replica Redis Cluster next to the single node, namespace-slot against spread-slot
  sharding, a 256-request scheduler step synchronous against the AsyncDirectory,
  and one batched lookup per step against refreshing a local mirror.

A and B alternate inside each repeat; medians over repeats are reported. Starts its
own redis-server and Redis Cluster on free 127.0.0.1 ports (nothing persisted) and
stops them. The machine is shared with other sessions: figures are noisy.
Writes loadtest/results/directory.json.

    python -m loadtest.bench_directory [--repeats 5] [--lookups 200]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from loadtest import bench_directory_fleet
from loadtest.bench_timing import alternate
from loadtest.machine import describe_machine
from symram_vllm.directory import Directory, EmbeddedDirectory, namespace_for
from symram_vllm.directory.redis_directory import RedisDirectory, RedisDirectoryOptions
from symram_vllm.keys import BlockKey
from symram_vllm.redis_link import LinkOptions
from symram_vllm.serving.engine_process import free_port
from symram_vllm.tiers.redis_tier import RedisPageTier

RESULTS = Path(__file__).parent / "results"
PROMPT_TOKENS = 8192
SIG = hashlib.blake2b(b"bench-directory", digest_size=32).digest()
# A benchmark measures latency, not outages: a busy shared machine must not open the
# breaker (the 0.25 s production socket timeout would, now and then).
BENCH = RedisDirectoryOptions(link=LinkOptions(socket_timeout_s=10.0, connect_timeout_s=5.0))


def chain(i: int, salt: str = "") -> bytes:
    return hashlib.blake2b(f"{salt}/{i}".encode(), digest_size=32).digest()


class RedisProcess:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.workdir = Path(tempfile.mkdtemp(prefix="symram-bench-redis-"))
        self.port = free_port()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.02)
        self.version = client.info("server")["redis_version"]
        client.close()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def pipeline_lookup(d: RedisDirectory, chain_keys: list[bytes], chunk: int = 32) -> int:
    """The alternative to the Lua lookup: HGETALLs pipelined, judged client-side (own
    instance only, server clock not used: enough to time the round trips)."""
    r = d.link.client
    held, now_ms = 0, time.time() * 1000
    for start in range(0, len(chain_keys), chunk):
        part = chain_keys[start : start + chunk]
        pipe = r.pipeline(transaction=False)
        for k in part:
            pipe.hgetall(d.keys.block(k))
        n = 0
        for row in pipe.execute():
            if not any(f.startswith(d.instance_id.encode() + b"|") and float(v) > now_ms
                       for f, v in row.items()):
                break
            n += 1
        held += n
        if n < len(part):
            break
    return held


def bench_lookups(url: str, repeats: int, n: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    embedded = EmbeddedDirectory()
    red = RedisDirectory(url, namespace=SIG, instance_id="bench", options=BENCH)
    # The same lookups in one script call for all keys (no small first call).
    single = RedisDirectory(url, namespace=SIG, instance_id="bench", options=RedisDirectoryOptions(
        first_chunk=512, lookup_chunk=512, link=BENCH.link))
    try:
        for block_size in (128, 16):
            nkeys = PROMPT_TOKENS // block_size
            keys = [chain(i, f"bs{block_size}") for i in range(nkeys)]
            miss = [chain(-1, "miss"), *keys]
            for d in (embedded, red):
                d.add(keys, "dram")
            assert embedded.longest_prefix(keys) == nkeys == red.longest_prefix(keys)
            assert pipeline_lookup(red, keys) == nkeys
            arms: dict[str, Callable[[], object]] = {
                "embedded": lambda k=keys: embedded.longest_prefix(k),
                "redis": lambda k=keys: red.longest_prefix(k),
                "redis_single_call": lambda k=keys: single.longest_prefix(k),
                "redis_pipeline_32": lambda k=keys: pipeline_lookup(red, k),
                "embedded_miss": lambda k=miss: embedded.longest_prefix(k),
                "redis_miss": lambda k=miss: red.longest_prefix(k),
                "redis_single_call_miss": lambda k=miss: single.longest_prefix(k),
                "redis_tiers_of_per_key": lambda k=keys: [red.tiers_of(x) for x in k],
                "redis_tiers_of_many": lambda k=keys: red.tiers_of_many(k),
            }
            if block_size == 16:  # 512 single round trips x n: keep the run short
                arms["redis_tiers_of_per_key"] = lambda k=keys[:64]: [red.tiers_of(x) for x in k]
            result = alternate(repeats, n, arms)
            result["keys"] = {"count": nkeys, "block_size": block_size}
            if block_size == 16:
                result["redis_tiers_of_per_key"]["keys"] = 64
            out[f"block_size_{block_size}"] = result
    finally:
        red.close()
        single.close()
    return out


def bench_registration(url: str, repeats: int, total: int = 20_000, batch: int = 64) -> dict:
    rates: dict[str, list[float]] = {"embedded": [], "redis": []}
    red = RedisDirectory(url, namespace=namespace_for(SIG, "registration"), instance_id="bench",
                         options=BENCH)
    try:
        for r in range(repeats):
            keys = [chain(i, f"reg-{r}") for i in range(total)]
            dirs: dict[str, Directory] = {"embedded": EmbeddedDirectory(), "redis": red}
            for name in (["embedded", "redis"] if r % 2 == 0 else ["redis", "embedded"]):
                d = dirs[name]
                start = time.perf_counter()
                for s in range(0, total, batch):
                    d.add(keys[s : s + batch], "dram")
                rates[name].append(total / (time.perf_counter() - start))
            assert red.longest_prefix(keys) == total
    finally:
        red.close()
    return {
        "keys": total,
        "batch": batch,
        "embedded_keys_per_s": round(statistics.median(rates["embedded"])),
        "redis_keys_per_s": round(statistics.median(rates["redis"])),
    }


def bench_dedupe(url: str, page_bytes: int) -> dict:
    sessions, system_blocks, own_blocks = 16, 32, 4
    out: dict[str, object] = {}
    for name, instances in (("redis_two_instances", 2), ("embedded", 0)):
        ns = namespace_for(SIG, f"dedupe-{name}")
        if instances:
            dirs: list[Directory] = [
                RedisDirectory(url, namespace=ns, instance_id=f"i{i}", options=BENCH)
                for i in range(instances)
            ]
        else:
            dirs = [EmbeddedDirectory()]
        system = [chain(i, "system") for i in range(system_blocks)]
        for s in range(sessions):
            d = dirs[s % len(dirs)]  # sessions spread over the fleet
            prompt = system + [chain(i, f"session-{s}") for i in range(own_blocks)]
            d.record_store(prompt, page_bytes)
            d.add(prompt, "redis")  # a shared tier: every instance sees the pages
        stats = dirs[0].dedupe()
        for d in dirs:
            d.close()
        unique = system_blocks + sessions * own_blocks
        out[name] = {
            "logical_bytes": stats.logical_bytes,
            "physical_bytes": stats.physical_bytes,
            "unique_bytes": unique * page_bytes,
            "physical_over_unique": round(stats.physical_bytes / (unique * page_bytes), 4),
            "logical_over_physical": round(stats.ratio, 3),
        }
    out["workload"] = {"sessions": sessions, "system_blocks": system_blocks,
                       "own_blocks": own_blocks, "page_bytes": page_bytes}
    return out


def bench_page_tier(url: str, repeats: int, page_bytes: int, pages: int = 16) -> dict:
    tier = RedisPageTier(url, namespace=namespace_for(SIG, "pages"),
                         capacity_bytes=4 * pages * (page_bytes + 4096))
    data = hashlib.shake_256(b"page").digest(page_bytes)
    keys = [BlockKey(chain(i, "page")) for i in range(pages)]
    put, get = [], []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            if not all(tier.set(k, data) for k in keys):
                raise RuntimeError("page tier declined a set")
            put.append(time.perf_counter() - start)
            start = time.perf_counter()
            if any(tier.get(k) != data for k in keys):
                raise RuntimeError("page tier lost a page")
            get.append(time.perf_counter() - start)
    finally:
        tier.close()
    total = pages * page_bytes
    return {
        "page_bytes": page_bytes,
        "pages": pages,
        "set_gbps": round(total / statistics.median(put) / 1e9, 3),
        "get_gbps": round(total / statistics.median(get) / 1e9, 3),
    }


def fleet_summary(fleet: dict) -> dict:
    """The headline fleet figures (details under "fleet")."""
    out: dict[str, object] = {}
    single = fleet.get("scheduler_path_single_node", {})
    out["scheduler_step_ms_sync_256"] = single.get("sync_step_ms_median")
    out["scheduler_step_ms_async_256"] = single.get("async_step_ms_median")
    out["async_round_trips_per_step"] = single.get("async_round_trips_per_step")
    out["mirror_refresh_over_batched_lookup"] = fleet["ask_or_mirror"]["mirror_over_ask"]
    lookup = fleet.get("lookup_64_keys")
    if isinstance(lookup, dict):
        out["lookup_p95_ms_single_node_64"] = lookup["single_node"]["p95_ms"]
        out["lookup_p95_ms_cluster_64"] = lookup["cluster_namespace_slot"]["p95_ms"]
        out["lookup_p95_ms_cluster_spread_slots_64"] = lookup["cluster_spread_slots"]["p95_ms"]
        out["lookup_p50_ms_single_node_64"] = lookup["single_node"]["p50_ms"]
        out["lookup_p50_ms_cluster_64"] = lookup["cluster_namespace_slot"]["p50_ms"]
        out["lookup_p50_ms_cluster_spread_slots_64"] = lookup["cluster_spread_slots"]["p50_ms"]
        out["scheduler_step_ms_async_256_cluster"] = \
            fleet["scheduler_path_cluster"]["async_step_ms_median"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lookups", type=int, default=200, help="lookups per arm and repeat")
    parser.add_argument("--page-kib", type=int, default=1536, help="page size (mid model)")
    parser.add_argument("--out", type=Path, default=RESULTS / "directory.json")
    args = parser.parse_args()
    page_bytes = args.page_kib * 1024

    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    server = RedisProcess()
    try:
        lookups = bench_lookups(server.url, args.repeats, args.lookups)
        registration = bench_registration(server.url, args.repeats)
        dedupe = bench_dedupe(server.url, page_bytes)
        pages = bench_page_tier(server.url, args.repeats, page_bytes)
        fleet = bench_directory_fleet.run(server.url, args.repeats, args.lookups)
    finally:
        server.stop()

    bs128, bs16 = lookups["block_size_128"], lookups["block_size_16"]
    result = {
        "benchmark": "directory",
        "command": "python -m loadtest.bench_directory",
        "machine": {**describe_machine(), "redis_server": server.version},
        "notes": "2 cores shared with other sessions (load average "
                 f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end): absolute "
                 "figures are noisy; compare arms of the same run (they alternate).",
        "repeats": args.repeats,
        "lookups_per_repeat": args.lookups,
        "prompt_tokens": PROMPT_TOKENS,
        "lookup_p50_ms_embedded": bs128["embedded"]["p50_ms"],
        "lookup_p50_ms_redis": bs128["redis"]["p50_ms"],
        "lookup_p95_ms_embedded": bs128["embedded"]["p95_ms"],
        "lookup_p95_ms_redis": bs128["redis"]["p95_ms"],
        "lookup_p95_ms_embedded_bs16": bs16["embedded"]["p95_ms"],
        "lookup_p95_ms_redis_bs16": bs16["redis"]["p95_ms"],
        "lookup_p95_ms_redis_pipeline_bs16": bs16["redis_pipeline_32"]["p95_ms"],
        "registration_keys_per_s_embedded": registration["embedded_keys_per_s"],
        "registration_keys_per_s_redis": registration["redis_keys_per_s"],
        "dedupe_physical_over_unique": dedupe["redis_two_instances"]["physical_over_unique"],
        "dedupe_logical_over_physical": dedupe["redis_two_instances"]["logical_over_physical"],
        **fleet_summary(fleet),
        "lookups": lookups,
        "fleet": fleet,
        "registration": registration,
        "dedupe": dedupe,
        "page_tier": pages,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n8k-token prompt lookups (all blocks held), medians of {args.repeats} repeats:")
    print(f"{'keys':>5} {'arm':<24} {'p50 ms':>9} {'p95 ms':>9}")
    for label, res in (("64", bs128), ("512", bs16)):
        for arm in ("embedded", "redis", "redis_single_call", "redis_pipeline_32",
                    "embedded_miss", "redis_miss", "redis_single_call_miss",
                    "redis_tiers_of_per_key", "redis_tiers_of_many"):
            print(f"{label:>5} {arm:<24} {res[arm]['p50_ms']:>9.3f} {res[arm]['p95_ms']:>9.3f}")
    print(f"\nregistration (batches of {registration['batch']}): embedded "
          f"{registration['embedded_keys_per_s']:,} keys/s, redis "
          f"{registration['redis_keys_per_s']:,} keys/s")
    d = dedupe["redis_two_instances"]
    print(f"dedupe, 16 sessions x (32 shared + 4 own) blocks on 2 instances: physical/unique "
          f"{d['physical_over_unique']}, logical/physical {d['logical_over_physical']}")
    print(f"page tier ({pages['page_bytes'] >> 10} KiB pages): set {pages['set_gbps']} GB/s, "
          f"get {pages['get_gbps']} GB/s")
    for key, value in fleet_summary(fleet).items():
        print(f"{key}: {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

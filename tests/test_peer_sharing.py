"""KV sharing across engine instances, without an engine: the worker halves of two
"engines" over one disk_path or one Redis page tier, and the scheduler halves over one
real redis-server directory (no fakes for Redis). Every test runs with plaintext pages
and with encryption required (pages sealed with AES-256-GCM, tests/at_rest.py)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import torch
from at_rest import MASTER_KEY, MODES
from test_connector_halves import BS, SIG, FakeBlocks, FakeRequest, kv_caches, sched_output

from symram_vllm.config import SymramConfig
from symram_vllm.connectors.metadata import BlockJob, SymramConnectorMetadata, SymramWorkerMetadata
from symram_vllm.connectors.scheduler import SchedulerSide
from symram_vllm.connectors.symram_connector import shared_tier_names
from symram_vllm.connectors.worker import WorkerSide
from symram_vllm.directory import EmbeddedDirectory, make_directory
from symram_vllm.keys import BlockKey
from symram_vllm.redis_keys import RedisKeys, namespace_for
from symram_vllm.tiers.disk_layout import rank_slot_directories, slot_directory, store_id
from tests.meta_helpers import worker_meta

pytestmark = pytest.mark.timeout(120)

PAGE = 2 * 2 * BS * 64 * 2  # kv_caches(): 2 layers x 2 heads x BS tokens x 64 x bf16
KEYS = [bytes([i + 1]) * 32 for i in range(4)]
AT_REST: dict[str, str] = {}  # config for the test's mode, set by `at_rest`


@pytest.fixture(autouse=True, params=MODES)
def at_rest(request, monkeypatch) -> str:
    sealed = {"encryption": "required", "encryption_key": MASTER_KEY.hex()}
    monkeypatch.setattr(
        sys.modules[__name__], "AT_REST", sealed if request.param == "sealed" else {}
    )
    return request.param


def drain(worker: WorkerSide) -> set[str]:
    recving: set[str] = set()
    deadline = time.monotonic() + 30  # (was 500 polls, ~5 s: short for a busy host)
    while time.monotonic() < deadline:
        _, got = worker.get_finished(set())
        recving |= got
        if not worker.jobs.loads and not worker.jobs.saves:
            return recving
        time.sleep(0.01)
    raise AssertionError("transfers did not finish")


def worker(config: SymramConfig, kv: dict[str, torch.Tensor]) -> WorkerSide:
    side = WorkerSide(config, rank=0, namespace=SIG)
    side.register_kv_caches(kv)
    assert side.active
    return side


def save(side: WorkerSide, block_ids: list[int], keys: list[bytes]) -> SymramWorkerMetadata:
    side.submit_saves(SymramConnectorMetadata(saves=[BlockJob("s", block_ids, keys)]))
    drain(side)
    return side.build_worker_meta()


def load(side: WorkerSide, req: str, block_ids: list[int], keys: list[bytes]) -> set[int]:
    side.start_loads(SymramConnectorMetadata(loads=[BlockJob(req, block_ids, keys)]))
    assert req in drain(side)
    return side.take_load_errors()


def disk_config(path: Path, **kw) -> SymramConfig:
    return SymramConfig(
        dram_bytes=16 * PAGE, disk_path=path, disk_bytes=64 * PAGE,
        policy={"write_policy": "write_through_selective", "write_through_hits": 0},
        **{**AT_REST, **kw},
    )


# -- shared disk_path ------------------------------------------------------------------------
def test_second_engine_on_a_disk_path_takes_its_own_slot_and_reads_the_first(tmp_path):
    kv_a, kv_b = kv_caches(0), kv_caches(1)
    a = worker(disk_config(tmp_path), kv_a)
    b = worker(disk_config(tmp_path), kv_b)
    try:
        assert a.store.disk.root == slot_directory(tmp_path, SIG, 0, 0)
        assert b.store.disk.root == slot_directory(tmp_path, SIG, 0, 1)
        meta = save(a, [1, 2, 3], KEYS[:3])
        a.store.flush()
        meta = a.build_worker_meta() or meta
        assert set(KEYS[:3]) <= set(save_meta_disk(a, meta))
        # B never computed these blocks: it reads A's slot, verified, bit-exact.
        assert load(b, "r", [5, 6, 7], KEYS[:3]) == set()
        for name in kv_a:
            assert torch.equal(kv_b[name][[5, 6, 7]], kv_a[name][[1, 2, 3]])
        counters, gauges = b.take_counters()
        assert counters["peer_disk_hits"] == 3 and counters["loaded_blocks"] == 3
        assert gauges["peer_disk_slots"] == 1
        # Promoted into B's DRAM: reported as held by B, but not copied to B's slot,
        # not even by a flush (A's slot of the shared disk has them).
        assert set(KEYS[:3]) <= set(b.build_worker_meta().keys("local", "stored"))
        b.store.flush()
        b.store.stack.write_back_idle()
        assert not list((b.store.disk.root / "pages").rglob("*.page"))
    finally:
        a.shutdown()
        b.shutdown()
    # A restarted engine takes the first free slot again (warm restart).
    c = worker(disk_config(tmp_path), kv_caches(2))
    try:
        assert c.store.disk.root == slot_directory(tmp_path, SIG, 0, 0)
        assert len(rank_slot_directories(tmp_path, SIG, 0)) == 2
    finally:
        c.shutdown()


def save_meta_disk(side: WorkerSide, meta: SymramWorkerMetadata) -> list[bytes]:
    keys = list(meta.keys("disk", "stored"))
    more = side.build_worker_meta()
    return keys + (list(more.keys("disk", "stored")) if more else [])


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_or_missing_peer_page_is_a_load_error(tmp_path, damage):
    a = worker(disk_config(tmp_path), kv_caches(0))
    kv_b = kv_caches(1)
    b = worker(disk_config(tmp_path), kv_b)
    try:
        save(a, [1, 2], KEYS[:2])
        a.store.flush()
        page = a.store.disk.path_of(BlockKey(KEYS[1], 0))
        data = bytearray(page.read_bytes())
        if damage == "flip":
            data[-7] ^= 0x10
            page.write_bytes(bytes(data))
        elif damage == "truncate":
            page.write_bytes(bytes(data[: len(data) // 2]))
        else:
            page.unlink()
        before = kv_b["layer0"][6].clone()
        # Block 1 loads, block 2 cannot: vLLM recomputes it; nothing wrong is copied.
        assert load(b, "r", [5, 6], KEYS[:2]) == {6}
        assert torch.equal(kv_b["layer0"][6], before)
        assert b.build_worker_meta().load_failed == [KEYS[1]]
        counters, _ = b.take_counters()
        assert counters["load_failed_blocks"] == 1
        if damage != "delete":
            assert counters["peer_disk_integrity_failures"] == 1
    finally:
        a.shutdown()
        b.shutdown()


def test_peer_reads_pages_its_owner_stored_zstd_compressed(tmp_path):
    from symram_vllm.tiers.disk import DiskTierConfig

    if "compress" not in DiskTierConfig.model_fields:
        pytest.skip("the disk tier has no zstd stage in this tree")
    kv_a = kv_caches(0)
    kv_a["layer0"][1].zero_()  # compressible
    kv_a["layer1"][1].zero_()
    a = worker(disk_config(tmp_path, disk={"compress": "zstd"}), kv_a)
    kv_b = kv_caches(1)
    b = worker(disk_config(tmp_path), kv_b)
    try:
        save(a, [1], KEYS[:1])
        a.store.flush()
        assert a.store.disk.stats().extra["zstd_pages"] == 1
        assert load(b, "r", [5], KEYS[:1]) == set()
        assert torch.equal(kv_b["layer0"][5], kv_a["layer0"][1])
        assert torch.equal(kv_b["layer1"][5], kv_a["layer1"][1])
    finally:
        a.shutdown()
        b.shutdown()


def test_store_id_is_shared_per_filesystem_and_created_once(tmp_path):
    ids: list[str | None] = []
    threads = [threading.Thread(target=lambda: ids.append(store_id(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and ids[0] is not None and len(ids[0]) == 32
    assert store_id(tmp_path / "other") != ids[0]
    disk_tier, shared = shared_tier_names(SymramConfig(disk_path=tmp_path))
    assert disk_tier == f"disk.{ids[0][:16]}" and shared == {disk_tier}
    assert shared_tier_names(SymramConfig(disk_path=tmp_path, disk_share=False)) == (
        "disk", frozenset())
    assert shared_tier_names(SymramConfig(
        redis_pages_bytes="1MiB", directory_url="redis://h:1/0"))[1] == {"redis"}


def test_seed_counts_every_slot_of_a_shared_disk_path(tmp_path):
    a = worker(disk_config(tmp_path), kv_caches(0))
    b = worker(disk_config(tmp_path), kv_caches(1))
    try:
        save(a, [1], KEYS[:1])
        save(b, [2], KEYS[1:2])
        a.store.flush()
        b.store.flush()
    finally:
        a.shutdown()
        b.shutdown()
    side = SchedulerSide(SIG, BS, SymramConfig(disk_path=tmp_path), disk_tier="disk.x")
    assert side.seed_from_disk(1) == 2
    assert side.directory.tiers_local(KEYS[1:2]) == [frozenset({"disk.x"})]
    private = SchedulerSide(SIG, BS, SymramConfig(disk_path=tmp_path, disk_share=False))
    assert private.seed_from_disk(1) == 1


# -- Redis page tier -------------------------------------------------------------------------
def redis_config(url: str, **kw) -> SymramConfig:
    kw = {"dram_bytes": 16 * PAGE, "redis_pages_bytes": 64 * PAGE, **AT_REST, **kw}
    return SymramConfig(directory_url=url, **kw)


def settle(side: WorkerSide) -> SymramWorkerMetadata:
    side.store.redis_pages.drain()
    return side.build_worker_meta() or SymramWorkerMetadata()


def test_redis_page_tier_written_on_save_read_on_a_miss(redis_server):
    kv_a, kv_b = kv_caches(0), kv_caches(1)
    a = worker(redis_config(redis_server.url), kv_a)
    b = worker(redis_config(redis_server.url), kv_b)
    try:
        first = save(a, [1, 2, 3], KEYS[:3])
        written = list(first.keys("redis", "stored")) + list(settle(a).keys("redis", "stored"))
        assert sorted(written) == sorted(KEYS[:3])
        assert load(b, "r", [4, 5, 6], KEYS[:3]) == set()
        for name in kv_a:
            assert torch.equal(kv_b[name][[4, 5, 6]], kv_a[name][[1, 2, 3]])
        counters, _ = b.take_counters()
        assert counters["redis_hits"] == 3 and counters["remote_hits"] == 3
        # Promoted into B's DRAM: the second load is a DRAM hit.
        assert load(b, "r2", [7], KEYS[:1]) == set()
        assert b.take_counters()[0]["dram_hits"] >= 1
        # Redis flushed under the engines: a page only Redis had is a load error.
        redis.Redis.from_url(redis_server.url).flushall()
        assert load(b, "r3", [7], KEYS[3:4]) == {7}
        # Redis answered "not here": the directory must forget where it said it was.
        assert settle(b).load_failed == [KEYS[3]]
    finally:
        a.shutdown()
        b.shutdown()


def test_redis_budget_evictions_are_reported(redis_server):
    # Room for two values: the third save evicts the oldest page.
    budget = 2 * (PAGE + 100)
    a = worker(redis_config(redis_server.url, redis_pages_bytes=budget), kv_caches(0))
    try:
        meta = save(a, [1, 2, 3], KEYS[:3])
        meta2 = settle(a)
        removed = meta.keys("redis", "removed") + meta2.keys("redis", "removed")
        assert removed == [KEYS[0]]
        counters, _ = a.take_counters()
        assert counters["redis_pages_evicted"] == 1 and counters["redis_pages_written"] == 3
    finally:
        a.shutdown()


def test_redis_killed_mid_load_is_a_load_error_then_recovers(redis_server):
    kv_a, kv_b = kv_caches(0), kv_caches(1)
    a = worker(redis_config(redis_server.url), kv_a)
    b = worker(redis_config(redis_server.url), kv_b)
    try:
        save(a, [1, 2], KEYS[:2])
        settle(a)
        redis_server.kill()
        assert load(b, "r", [4, 5], KEYS[:2]) == {4, 5}
        # Redis could not be asked: the pages may well be there once it is back, so
        # the directory keeps its locations (no fleet-wide forgetting on an outage).
        assert settle(b).load_failed == []
        assert b.take_counters()[0]["load_unreachable_misses"] == 1
        redis_server.restart()
        # Reconnect probes back off (up to 5 s apart): 30 s each, for a busy host.
        deadline = time.monotonic() + 30
        while not a.store.redis_pages.tier.link.available:
            assert time.monotonic() < deadline, "A did not reconnect"
            a.store.redis_pages.tier.get(BlockKey(KEYS[0]))
            time.sleep(0.05)
        # The restarted Redis is empty; a new save goes through again and B reads it.
        save(a, [3], KEYS[2:3])
        settle(a)
        deadline = time.monotonic() + 30
        while not b.store.redis_pages.tier.link.available:
            assert time.monotonic() < deadline, "B did not reconnect"
            time.sleep(0.05)
        assert load(b, "r2", [6], KEYS[2:3]) == set()
        assert torch.equal(kv_b["layer1"][6], kv_a["layer1"][3])
    finally:
        a.shutdown()
        b.shutdown()


# -- scheduler halves over one Redis directory -------------------------------------------------
class Tally:
    """Counts directory calls, to check the save path batches them."""

    def __init__(self, inner):
        self.inner, self.calls = inner, {}

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args, **kw):
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kw)

        return counted


def ask(side: SchedulerSide, request: FakeRequest, computed: int = 0):
    """get_num_new_matched_tokens as vLLM drives it: a fleet lookup is answered at a
    later step (the first call says "ask again"), after the directory's batch went."""
    side.directory.flush()  # what earlier steps queued is in Redis
    answer = side.get_num_new_matched_tokens(request, computed)
    if answer[0] is None:
        assert side.directory.flush()
        answer = side.get_num_new_matched_tokens(request, computed)
    return answer


def scheduler(url: str, instance: str, shared: frozenset[str], table: dict) -> SchedulerSide:
    directory = make_directory(url, namespace=SIG, instance_id=instance, shared_tiers=shared)
    side = SchedulerSide(SIG, BS, SymramConfig(), directory=directory, page_bytes=PAGE,
                         disk_tier="disk.s1", shared_tiers=shared)
    side.kv_cache_manager = type("M", (), {"get_block_ids": lambda _, rid: (table[rid],)})()
    return side


def test_other_instances_blocks_count_only_in_shared_tiers(redis_server):
    url = redis_server.url
    a = scheduler(url, "a", frozenset({"redis"}), {"p-1": [1, 2, 3, 4]})
    b = scheduler(url, "b", frozenset({"redis"}), {"p-2": [9, 8, 7, 6]})
    loner = scheduler(url, "c", frozenset(), {})
    a.directory = Tally(a.directory)
    req = FakeRequest("p-1", 3 * BS + 5)
    a._state(req)
    meta = a.build_connector_meta(sched_output(new=[("p-1", 0)], scheduled={"p-1": 3 * BS + 5}))
    keys = meta.saves[0].keys
    # One in-process held query and one dedupe record for the request's step.
    assert a.directory.calls.get("held_local") == 1 and a.directory.calls["end_step"] == 1
    a.update_connector_output(worker_meta(stored=keys, processed=keys))
    a.directory.flush()
    other = FakeRequest("p-2", 3 * BS + 5)
    # Only in A's DRAM: private to A.
    assert ask(b, other) == (0, False)
    a.update_connector_output(worker_meta(redis_stored=keys[:2]))
    a.directory.flush()
    assert ask(b, other) == (2 * BS, True)
    assert ask(loner, other) == (0, False)
    # The promised load is leased until it finishes.
    r = redis.Redis.from_url(url)
    lease = RedisKeys(namespace_for(SIG)).lease(keys[0])
    assert r.hget(lease, "b") == b"1"
    b.update_state_after_alloc(other, FakeBlocks([9, 8, 7, 6]), 2 * BS)
    b.update_connector_output(None, {"p-2"})
    b.directory.flush()
    b.directory.flush()
    assert not r.exists(lease)
    # A Redis eviction reported by any engine removes the block for everyone.
    a.update_connector_output(worker_meta(redis_removed=keys[1:2]))
    a.directory.flush()
    assert ask(b, FakeRequest("p-3", 3 * BS + 5)) == (BS, True)
    # A load that found nothing makes the directory forget the location that misled it.
    b.update_connector_output(worker_meta(load_failed=keys[:1]))
    b.directory.flush()
    assert ask(b, FakeRequest("p-4", 3 * BS + 5)) == (0, False)
    assert ask(a, FakeRequest("p-5", 3 * BS + 5)) == (3 * BS, True)


def test_disk_locations_removed_per_instance_and_dedupe_is_fleet_wide(redis_server):
    url = redis_server.url
    shared = frozenset({"disk.s1"})
    a = scheduler(url, "a", shared, {"p-1": [1, 2, 3]})
    b = scheduler(url, "b", shared, {"p-2": [4, 5, 6]})
    ra, rb = FakeRequest("p-1", 3 * BS + 1), FakeRequest("p-2", 3 * BS + 1)
    a._state(ra), b._state(rb)
    ma = a.build_connector_meta(sched_output(new=[("p-1", 0)], scheduled={"p-1": 3 * BS + 1}))
    mb = b.build_connector_meta(sched_output(new=[("p-2", 0)], scheduled={"p-2": 3 * BS + 1}))
    keys = ma.saves[0].keys
    assert mb.saves[0].keys == keys  # both computed it before either stored it
    a.update_connector_output(worker_meta(disk_stored=keys, processed=keys))
    a.directory.flush()
    b.update_connector_output(worker_meta(disk_stored=keys, processed=keys))
    b.directory.flush()
    # Same prompt, two engines, 3 blocks: stored once as far as dedupe is concerned.
    assert a.directory.flush()  # a batch after both engines' writes reads the counters
    d = a.directory.dedupe()
    assert (d.logical_blocks, d.physical_blocks) == (6, 3)
    assert d.physical_bytes == 3 * PAGE
    # A evicts its copy: B's copy in its own slot still serves everyone.
    a.update_connector_output(worker_meta(disk_removed=keys))
    a.directory.flush()
    probe = FakeRequest("p-3", 3 * BS + 1)
    assert ask(a, probe) == (3 * BS, True)
    b.update_connector_output(worker_meta(removed=keys))
    b.directory.flush()
    assert ask(a, FakeRequest("p-4", 3 * BS + 1)) == (0, False)
    _, gauges = a.take_stats()
    assert gauges["dedupe_physical_bytes"] == 3 * PAGE and gauges["dedupe_ratio"] == 2.0
    assert gauges["directory_available"] == 1.0


def test_a_save_of_a_held_block_readvertises_it_after_the_directory_lost_it():
    kv = kv_caches(0)
    side = worker(SymramConfig(dram_bytes=16 * PAGE), kv)
    try:
        save(side, [1], KEYS[:1])
        again = save(side, [1], KEYS[:1])  # e.g. Redis was flushed: the scheduler asked again
        assert again.keys("local", "stored") == KEYS[:1]
    finally:
        side.shutdown()
    directory = EmbeddedDirectory()
    directory.record_store(KEYS[:2], PAGE)
    directory.record_store(KEYS[:2], PAGE)
    assert directory.dedupe().physical_blocks == 2 and directory.dedupe().logical_blocks == 4

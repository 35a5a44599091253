"""The two connector halves driven with vLLM-shaped inputs and real tensors, no engine."""

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from symram_vllm.config import SymramConfig
from symram_vllm.connectors.scheduler import SchedulerSide
from symram_vllm.connectors.worker import WorkerSide
from tests.meta_helpers import worker_meta

BS = 32
SIG = b"\x07" * 32


@dataclass
class FakeRequest:
    request_id: str
    num_prompt_tokens: int
    block_hashes: list = field(default_factory=list)
    lora_request: None = None

    def __post_init__(self):
        self.num_tokens = self.num_prompt_tokens
        self.all_token_ids = list(range(self.num_prompt_tokens))
        # vLLM hashes full blocks only; chain the block index into the fake hash.
        self.block_hashes = [
            (self.request_id.split("-")[0] + str(i)).encode().ljust(32, b".")
            for i in range(self.num_prompt_tokens // BS)
        ]


class FakeBlocks:
    def __init__(self, ids):
        self.ids = ids

    def get_block_ids(self):
        return (self.ids,)


def sched_output(new=(), cached=(), scheduled=None, preempted=None):
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, num_computed_tokens=c) for r, c in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, _ in cached], num_computed_tokens=[c for _, c in cached]
        ),
        num_scheduled_tokens=scheduled or {},
        preempted_req_ids=preempted,
    )


def make_scheduler(block_table):
    side = SchedulerSide(SIG, BS, SymramConfig())
    side.kv_cache_manager = SimpleNamespace(get_block_ids=lambda rid: (block_table[rid],))
    return side


def test_prefill_saves_full_blocks_only_and_never_claims_the_last_token():
    table = {"a-1": [5, 6, 7, 8]}
    side = make_scheduler(table)
    req = FakeRequest("a-1", 3 * BS + 5)  # 3 full blocks + 5 tokens
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)  # nothing stored yet
    meta = side.build_connector_meta(sched_output(new=[("a-1", 0)], scheduled={"a-1": 3 * BS + 5}))
    assert [job.block_ids for job in meta.saves] == [[5, 6, 7]]
    keys = meta.saves[0].keys
    assert side.request_finished(req) is True  # blocks held until the worker is done
    side.update_connector_output(worker_meta(stored=keys, processed=keys))
    assert side.build_connector_meta(sched_output()).delayed_free == ["a-1"]

    # Same prompt again: 3 blocks held, all loadable because a 4th partial block remains.
    again = FakeRequest("a-2", 3 * BS + 5)
    assert side.get_num_new_matched_tokens(again, 0) == (3 * BS, True)
    # Exactly 3 full blocks: the last token must be computed, so only 2 load.
    exact = FakeRequest("a-3", 3 * BS)
    assert side.get_num_new_matched_tokens(exact, 0) == (2 * BS, True)
    # With one block already in vLLM's own cache, only the rest is ours.
    assert side.get_num_new_matched_tokens(again, BS) == (2 * BS, True)


def test_load_job_targets_blocks_after_local_hits():
    side = make_scheduler({"a-1": [1, 2, 3]})
    first = FakeRequest("a-1", 3 * BS + 1)
    side._state(first)
    meta = side.build_connector_meta(
        sched_output(new=[("a-1", 0)], scheduled={"a-1": 3 * BS + 1})
    )
    keys = meta.saves[0].keys
    side.update_connector_output(worker_meta(stored=keys, processed=keys))
    req = FakeRequest("a-9", 3 * BS + 1)
    n, is_async = side.get_num_new_matched_tokens(req, BS)
    assert (n, is_async) == (2 * BS, True)
    side.update_state_after_alloc(req, FakeBlocks([40, 41, 42, 43]), n)
    meta = side.build_connector_meta(sched_output())
    assert [(j.req_id, j.block_ids, j.keys) for j in meta.loads] == [("a-9", [41, 42], keys[1:])]


def test_removed_keys_stop_matching_and_inflight_saves_are_not_duplicated():
    side = make_scheduler({"a-1": [1, 2], "a-2": [3, 4]})
    r1, r2 = FakeRequest("a-1", 2 * BS), FakeRequest("a-2", 2 * BS)
    side._state(r1), side._state(r2)
    meta = side.build_connector_meta(
        sched_output(new=[("a-1", 0), ("a-2", 0)], scheduled={"a-1": 2 * BS, "a-2": 2 * BS})
    )
    # Both requests share the prefix: each chain key is saved once.
    assert sum(len(j.keys) for j in meta.saves) == 2
    keys = [k for j in meta.saves for k in j.keys]
    side.update_connector_output(worker_meta(stored=keys, processed=keys))
    probe = FakeRequest("a-7", 2 * BS + 1)
    assert side.get_num_new_matched_tokens(probe, 0) == (2 * BS, True)
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as external

    stored = side.events.take()
    # vLLM KV events, keyed by vLLM's own block hashes, chained by parent hash.
    h0, h1 = (external(h) for h in r1.block_hashes)
    assert [e.block_hashes for e in stored] == [[h0], [h1]]
    assert stored[1].parent_block_hash == h0
    assert stored[1].token_ids == list(range(BS, 2 * BS)) and stored[0].medium == "CPU"
    side.update_connector_output(worker_meta(removed=keys[1:]))
    assert side.get_num_new_matched_tokens(probe, 0) == (BS, True)
    removed = side.events.take()
    assert len(removed) == 1 and removed[0].block_hashes == [h1]


def test_tp_aggregation_keeps_every_rank_report():
    a = worker_meta(rank=0, stored=[b"x", b"y"], removed=[b"r"], processed=[b"x"])
    b = worker_meta(rank=1, stored=[b"y"], removed=[b"s"], processed=[b"y"])
    merged = a.aggregate(b)
    # No intersection within a step: ranks report the same block in different steps.
    assert merged.keys("local", "stored") == [b"x", b"y", b"y"]
    assert set(merged.keys("local", "removed")) == {b"r", b"s"}
    assert set(merged.processed) == {b"x", b"y"}


def test_tp_store_completes_when_every_rank_reported_in_any_step():
    table = {"a-1": [5, 6, 7, 8]}
    side = SchedulerSide(SIG, BS, SymramConfig(), tp_size=2)
    side.kv_cache_manager = SimpleNamespace(get_block_ids=lambda rid: (table[rid],))
    req = FakeRequest("a-1", 3 * BS + 1)
    side.get_num_new_matched_tokens(req, 0)
    keys = side._state(req).keys
    # Step 1: only rank 0 has finished its shards (rank 1 sent nothing: vLLM skips it).
    side.update_connector_output(worker_meta(rank=0, stored=keys, processed=keys))
    assert side.get_num_new_matched_tokens(FakeRequest("a-2", 3 * BS + 1), 0) == (0, False)
    # Step 2: rank 1 reports two of them; step 3: rank 0 reports one again (a save that
    # found it held) and must not complete the third alone.
    side.update_connector_output(worker_meta(rank=1, stored=keys[:2]))
    side.update_connector_output(worker_meta(rank=0, stored=keys[2:]))
    assert side.get_num_new_matched_tokens(FakeRequest("a-3", 3 * BS + 1), 0) == (2 * BS, True)
    # A removal on either rank removes at once and forgets the partial report.
    side.update_connector_output(worker_meta(rank=1, removed=keys[1:2]))
    side.update_connector_output(worker_meta(rank=1, stored=keys[2:]))
    assert side.get_num_new_matched_tokens(FakeRequest("a-4", 3 * BS + 1), 0) == (BS, True)


def kv_caches(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return {f"layer{i}": torch.randn(8, 2, BS, 64, generator=gen).to(torch.bfloat16)
            for i in range(2)}


def drain(worker, finished=frozenset()):
    import time

    sending: set[str] = set()
    recving: set[str] = set()
    for _ in range(1000):
        done_sending, done_recving = worker.get_finished(set(finished))
        sending |= done_sending
        recving |= done_recving
        if not worker.jobs.loads and not worker.jobs.saves:
            return sending, recving
        time.sleep(0.01)
    raise AssertionError("transfers did not finish")


def test_worker_save_then_load_is_bit_exact_and_reports_misses():
    from symram_vllm.connectors.metadata import BlockJob, SymramConnectorMetadata

    kv = kv_caches(0)
    worker = WorkerSide(SymramConfig(dram_bytes=10 * 2 * 2 * BS * 64 * 2), rank=0)
    worker.register_kv_caches(kv)
    keys = [bytes([i]) * 32 for i in range(3)]
    worker.submit_saves(SymramConnectorMetadata(saves=[BlockJob("r1", [1, 2, 3], keys)]))
    drain(worker)
    meta = worker.build_worker_meta()
    assert meta.keys("local", "stored") == keys and meta.processed == keys
    expected = {name: t[[1, 2, 3]].clone() for name, t in kv.items()}
    for t in kv.values():
        t[[5, 6, 7]] = 0
    missing = b"\xee" * 32
    worker.start_loads(SymramConnectorMetadata(loads=[
        BlockJob("r2", [5, 6, 7], keys), BlockJob("r3", [0, 4], [keys[0], missing])
    ]))
    _, recving = drain(worker)
    assert recving == {"r2", "r3"}
    for name, t in kv.items():
        assert torch.equal(t[[5, 6, 7]], expected[name])
    assert worker.take_load_errors() == {4}  # the missing page: vLLM recomputes block 4
    counters, gauges = worker.take_counters()
    assert counters["loaded_blocks"] == 4 and counters["load_failed_blocks"] == 1
    assert counters["saved_blocks"] == 3 and gauges["dram_pages"] == 3


def test_worker_never_stores_a_page_with_inf_or_nan_under_a_quantizing_codec():
    from symram_vllm.connectors.metadata import BlockJob, SymramConnectorMetadata

    kv = kv_caches(1)
    kv["layer1"][2, 1, 5, 7] = float("inf")
    kv["layer0"][3, 0, 0, 0] = float("nan")
    worker = WorkerSide(SymramConfig(dram_bytes=10 * 2 * 2 * BS * 64 * 2, codec="int8"),
                        rank=0)
    worker.register_kv_caches(kv)
    keys = [bytes([i]) * 32 for i in range(3)]
    worker.submit_saves(SymramConnectorMetadata(saves=[BlockJob("r1", [1, 2, 3], keys)]))
    drain(worker)
    meta = worker.build_worker_meta()
    assert meta.keys("local", "stored") == keys[:1] and meta.processed == keys
    counters, gauges = worker.take_counters()
    assert counters["saved_blocks"] == 1 and counters["nonfinite_pages"] == 2
    assert gauges["dram_pages"] == 1


def test_worker_holds_finished_requests_until_their_saves_complete():
    from symram_vllm.connectors.metadata import BlockJob, SymramConnectorMetadata

    worker = WorkerSide(SymramConfig(dram_bytes=1 << 22), rank=0)
    worker.register_kv_caches(kv_caches(1))
    worker.submit_saves(SymramConnectorMetadata(
        saves=[BlockJob("r1", [1], [b"\x01" * 32])], delayed_free=[]))
    worker.handle_preemptions(SymramConnectorMetadata(preempted=["r1"]))  # waits for the copy
    assert all(f.done() for _, f in worker.jobs.saves["r1"])
    worker.submit_saves(SymramConnectorMetadata(delayed_free=["r1"]))
    sending, _ = drain(worker, {"r1"})
    if not sending:
        sending, _ = worker.get_finished(set())
    assert "r1" in sending


def test_worker_disables_itself_on_a_layout_it_cannot_serve():
    worker = WorkerSide(SymramConfig(), rank=0)
    worker.register_kv_caches({"a": torch.zeros(4, 2, 8, 8), "b": torch.zeros(5, 2, 8, 8)})
    assert not worker.active and "layout" in worker.disabled_reason
    from symram_vllm.connectors.metadata import BlockJob, SymramConnectorMetadata

    worker.start_loads(SymramConnectorMetadata(loads=[BlockJob("r", [1, 2], [b"k" * 32] * 2)]))
    _, recving = worker.get_finished(set())
    assert recving == {"r"} and worker.take_load_errors() == {1, 2}


def test_bypass_stops_hits_and_saves_and_resumes(monkeypatch):
    from symram_vllm import bypass

    monkeypatch.setattr(bypass, "_SWITCH", bypass.BypassSwitch(None))
    table = {"a-1": [5, 6, 7, 8]}
    side = make_scheduler(table)
    req = FakeRequest("a-1", 3 * BS + 1)
    side.get_num_new_matched_tokens(req, 0)
    keys = side._state(req).keys
    side.update_connector_output(worker_meta(stored=keys, processed=keys))
    probe = FakeRequest("a-2", 3 * BS + 1)
    assert side.get_num_new_matched_tokens(probe, 0) == (3 * BS, True)
    bypass.switch().set(True, by="test", reason="incident")
    assert side.get_num_new_matched_tokens(probe, 0) == (0, False)
    fresh = FakeRequest("b-1", 3 * BS + 1)
    side._state(fresh)
    table["b-1"] = [1, 2, 3, 4]
    meta = side.build_connector_meta(sched_output(new=[("b-1", 0)], scheduled={"b-1": 3 * BS + 1}))
    assert meta.saves == []
    # The worker refuses saves too (a job scheduled just before the switch flipped).
    from symram_vllm.connectors.metadata import BlockJob, SymramConnectorMetadata

    worker = WorkerSide(SymramConfig(dram_bytes=1 << 22), rank=0)
    worker.register_kv_caches(kv_caches(1))
    worker.submit_saves(SymramConnectorMetadata(saves=[BlockJob("r", [1], [b"\x09" * 32])]))
    drain(worker)
    assert worker.build_worker_meta().keys("local", "stored") == []
    bypass.switch().set(False, by="test")
    assert side.get_num_new_matched_tokens(probe, 0) == (3 * BS, True)


def test_jobs_larger_than_the_dram_tier_move_in_batches():
    from symram_vllm.connectors.metadata import BlockJob, SymramConnectorMetadata

    kv = kv_caches(2)
    page = 2 * 2 * BS * 64 * 2
    # 6 DRAM slots: a batch takes at most 3, so the arena never runs out of rows.
    worker = WorkerSide(SymramConfig(dram_bytes=6 * page), rank=0)
    worker.register_kv_caches(kv)
    keys = [bytes([i + 1]) * 32 for i in range(8)]
    worker.submit_saves(SymramConnectorMetadata(saves=[BlockJob("r1", list(range(8)), keys)]))
    drain(worker)
    counters, _ = worker.take_counters()
    assert counters["saved_blocks"] == 8  # every block saved; the oldest were evicted
    assert counters["transfer_ops"] == 3 * 2  # three batches, one op per layer each
    expected = {name: t[[2, 3, 4, 5, 6, 7]].clone() for name, t in kv.items()}
    for t in kv.values():
        t.zero_()
    # A 5-block prefix (more than half the arena) loads in two batches.
    worker.start_loads(SymramConnectorMetadata(loads=[BlockJob("r2", [0, 1, 2, 3, 4], keys[3:])]))
    drain(worker)
    assert worker.take_load_errors() == set()
    for name, t in kv.items():
        assert torch.equal(t[[0, 1, 2, 3, 4]], expected[name][1:])


def test_a_load_stages_its_next_batch_while_copying_the_current_one():
    """Double-buffered loads: batch k+1's pages are brought into DRAM (disk reads on a
    disk hit) while batch k is copied into the engine, never after it."""
    import threading
    import time

    from symram_vllm.connectors.metadata import BlockJob, SymramConnectorMetadata

    kv = kv_caches(3)
    page = 2 * 2 * BS * 64 * 2
    worker = WorkerSide(SymramConfig(dram_bytes=8 * page), rank=0)  # batches of 4
    worker.register_kv_caches(kv)
    keys = [bytes([i + 1]) * 32 for i in range(8)]
    worker.submit_saves(SymramConnectorMetadata(saves=[BlockJob("r1", list(range(8)), keys)]))
    drain(worker)
    expected = {name: t[:8].clone() for name, t in kv.items()}
    for t in kv.values():
        t.zero_()
    events: list[tuple[str, float, str]] = []
    store, mover = worker.store, worker.mover
    acquire, load = store.acquire_prefix, mover.load

    def recording_acquire(part):
        events.append(("stage", time.monotonic(), threading.current_thread().name))
        return acquire(part)

    def slow_load(*args):
        events.append(("copy", time.monotonic(), "start"))
        time.sleep(1.0)  # the staging thread's window: room for a busy host to run it
        ops = load(*args)
        events.append(("copy", time.monotonic(), "end"))
        return ops

    store.acquire_prefix, mover.load = recording_acquire, slow_load
    worker.start_loads(SymramConnectorMetadata(loads=[BlockJob("r2", list(range(8)), keys)]))
    drain(worker)
    assert worker.take_load_errors() == set()
    for name, t in kv.items():
        assert torch.equal(t[:8], expected[name])
    stages = [at for kind, at, _ in events if kind == "stage"]
    copies = [(kind, at, what) for kind, at, what in events if kind == "copy"]
    assert len(stages) == 2 and len(copies) == 4
    first_copy_end = copies[1][1]
    assert stages[1] < first_copy_end  # staged during the first copy, not after it
    assert all(name.startswith("symram-stage") for kind, _, name in events if kind == "stage")
    assert store.dram._readers == {}  # every batch's rows were released

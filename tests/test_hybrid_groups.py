"""Hybrid models under vLLM's hybrid allocator (SupportsHMA): several KV-cache groups,
each with its own block ids for the same token block, layers of different groups
sharing one tensor (as vLLM allocates them), and sliding-window groups whose blocks
outside the window are vLLM's null block. No engine: real tensors, vLLM-shaped inputs."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from symram_vllm.config import SymramConfig
from symram_vllm.connectors.metadata import BlockJob, SymramConnectorMetadata
from symram_vllm.connectors.page_mover import PageMover
from symram_vllm.connectors.scheduler import SchedulerSide, allocated_blocks
from symram_vllm.connectors.worker import WorkerSide
from symram_vllm.kernels import block_copy
from symram_vllm.layout import KVLayout
from tests.meta_helpers import worker_meta
from tests.test_connector_halves import BS, SIG, FakeRequest, sched_output

B, H, C = 24, 2, 64
GROUPS = {"full.0": 0, "window.0": 1, "full.1": 0, "window.1": 1}


def hybrid_caches(seed: int) -> dict[str, torch.Tensor]:
    """Two tensors, each shared by one layer of each group (vLLM's hybrid allocation
    for a model with as many sliding-window as full-attention layers)."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(2, B, H, BS, C, generator=gen).to(torch.bfloat16)
    return {"full.0": raw[0], "window.0": raw[0], "full.1": raw[1], "window.1": raw[1]}


def reference_page(layout: KVLayout, ids_at: list[int]) -> torch.Tensor:
    page = torch.empty(layout.page_bytes, dtype=torch.uint8)
    for dst, src in zip(layout.page_views(page), layout.block_views(ids_at), strict=True):
        dst.copy_(src)
    return page


def test_a_page_holds_each_groups_own_block_of_the_token_block():
    layout = KVLayout(hybrid_caches(0), GROUPS)
    assert layout.num_groups == 2 and len(layout.segments) == 4  # never merged across groups
    ids = [[3, 7, 11], [4, 9, 20]]  # group 0's and group 1's blocks for 3 token blocks
    pages = torch.zeros(5, layout.page_bytes, dtype=torch.uint8)
    layout.save_blocks(ids, pages, [1, 2, 3])
    for i, row in enumerate([1, 2, 3]):
        assert torch.equal(pages[row], reference_page(layout, [ids[0][i], ids[1][i]]))

    # A load skips a window group's part where vLLM left the block unallocated (-1).
    target = hybrid_caches(1)
    before = {name: t.clone() for name, t in target.items()}
    into = KVLayout(target, GROUPS)
    into.load_blocks(pages, [1, 2, 3], [[5, 6, 8], [-1, 13, 14]])
    for i, (g0, g1) in enumerate([(5, 4), (6, 13), (8, 14)]):
        want = layout.block_views([ids[0][i], ids[1][i]])
        got = into.block_views([g0, g1])
        for name, w, g, group in zip(GROUPS, want, got, GROUPS.values(), strict=True):
            if i == 0 and group == 1:
                continue
            assert torch.equal(w, g), (i, name)
    # The skipped block (group 1's would-be block 4) was not written.
    assert torch.equal(target["window.0"][4], before["window.0"][4])


def test_bad_group_ids_are_refused_before_any_copy():
    layout = KVLayout(hybrid_caches(0), GROUPS)
    pages = torch.zeros(4, layout.page_bytes, dtype=torch.uint8)
    with pytest.raises(block_copy.BlockCopyError, match="2 groups"):
        layout.save_blocks([1, 2], pages, [0, 1])  # one group's ids for a 2-group cache
    with pytest.raises(block_copy.BlockCopyError, match="must lie"):
        layout.save_blocks([[1], [-1]], pages, [0])  # a page is whole: no skips on save
    with pytest.raises(block_copy.BlockCopyError, match="once"):
        layout.load_blocks(pages, [0, 1], [[1, 2], [2, 5]])  # block 2 written twice
    with pytest.raises(ValueError, match="no KV-cache group"):
        KVLayout(hybrid_caches(0), {"full.0": 0})
    assert int(pages.count_nonzero()) == 0


def test_int8_codec_pages_of_a_hybrid_cache_match_the_single_group_pages():
    """Gathering each layer by its group's ids gives the codec the same blocks it
    would see in a single-group cache holding them at one id."""
    caches = hybrid_caches(2)
    mover = PageMover(KVLayout(caches, GROUPS), "int8")
    g0, g1 = [3, 7, 11], [4, 9, 20]
    pages = torch.zeros(4, mover.page_bytes, dtype=torch.uint8)
    nonfinite, _ = mover.save([g0, g1], pages, [0, 1, 2])
    assert nonfinite == [0, 0, 0]
    flat = {name: torch.stack([t[(g0 if GROUPS[name] == 0 else g1)[i]] for i in range(3)])
            for name, t in caches.items()}
    single = PageMover(KVLayout(flat), "int8")
    expected = torch.zeros_like(pages)
    single.save([0, 1, 2], expected, [0, 1, 2])
    assert torch.equal(pages, expected)

    # Decoding scatters each layer's blocks to its group's ids, skipping -1.
    target = hybrid_caches(3)
    untouched = target["window.1"][5].clone()
    PageMover(KVLayout(target, GROUPS), "int8").load(pages, [0, 1, 2], [[1, 2, 6], [-1, 8, 9]])
    decoded = {name: torch.zeros_like(t) for name, t in flat.items()}
    PageMover(KVLayout(decoded), "int8").load(expected, [0, 1, 2], [0, 1, 2])
    assert torch.equal(target["full.1"][[1, 2, 6]], decoded["full.1"])
    assert torch.equal(target["window.1"][[8, 9]], decoded["window.1"][1:])
    assert torch.equal(target["window.1"][5], untouched)
    assert not torch.equal(decoded["window.1"][1], flat["window.1"][1])  # int8 is lossy


# -- the scheduler half ---------------------------------------------------------------
class TwoGroupBlocks:
    def __init__(self, full, window):
        self.ids = (full, window)

    def get_block_ids(self):
        return self.ids


def step(tables, new=(), scheduled=None):
    """A SchedulerOutput-shaped step: new requests carry their block tables."""
    out = sched_output(new=new, scheduled=scheduled)
    for req in out.scheduled_new_reqs:
        req.block_ids = tables[req.req_id]
    out.scheduled_cached_reqs.new_block_ids = []
    return out


def two_group_scheduler(tables: dict[str, tuple[list[int], list[int]]]) -> SchedulerSide:
    side = SchedulerSide(SIG, BS, SymramConfig(), num_groups=2, windowed_groups=frozenset({1}))
    side.kv_cache_manager = SimpleNamespace(get_block_ids=lambda rid: tables[rid])
    return side


def test_saves_carry_every_groups_blocks_and_skip_blocks_the_window_freed():
    # Block 0 of the window group is already vLLM's null block: that page cannot be
    # whole, so it is not saved; blocks 1-2 are.
    tables = {"a-1": ([5, 6, 7], [0, 16, 17])}
    side = two_group_scheduler(tables)
    req = FakeRequest("a-1", 3 * BS + 1)
    side._state(req)
    meta = side.build_connector_meta(step(tables, [("a-1", 0)], {"a-1": 3 * BS}))
    (job,) = meta.saves
    assert job.block_ids == [6, 7] and job.group_block_ids == [[6, 7], [16, 17]]
    assert job.positions == [1, 2]
    counters, _ = side.take_stats()
    assert counters["save_window_missed_blocks"] == 1


def test_loads_skip_window_blocks_vllm_left_unallocated():
    tables = {"a-1": ([1, 2, 3], [4, 5, 6])}
    side = two_group_scheduler(tables)
    first = FakeRequest("a-1", 3 * BS + 1)
    side._state(first)
    meta = side.build_connector_meta(step(tables, [("a-1", 0)], {"a-1": 3 * BS}))
    keys = meta.saves[0].keys
    side.update_connector_output(worker_meta(stored=keys, processed=keys))
    again = FakeRequest("a-2", 3 * BS + 1)
    n, is_async = side.get_num_new_matched_tokens(again, 0)
    assert (n, is_async) == (3 * BS, True)
    # Window of ~2 blocks at the hit's end: vLLM allocated the window group's last two.
    side.update_state_after_alloc(again, TwoGroupBlocks([20, 21, 22, 23], [0, 31, 32, 33]), n)
    (load,) = side.build_connector_meta(step(tables)).loads
    assert load.group_block_ids == [[20, 21, 22], [-1, 31, 32]]
    assert load.engine_blocks() == {20, 21, 22, 31, 32}


def test_a_null_block_in_a_full_attention_group_is_an_error_not_a_wrong_load():
    tables = {"a-1": ([1, 2], [3, 4])}
    side = two_group_scheduler(tables)
    side._state(FakeRequest("a-1", 2 * BS + 1))
    meta = side.build_connector_meta(step(tables, [("a-1", 0)], {"a-1": 2 * BS}))
    keys = meta.saves[0].keys
    side.update_connector_output(worker_meta(stored=keys, processed=keys))
    again = FakeRequest("a-2", 2 * BS + 1)
    n, _ = side.get_num_new_matched_tokens(again, 0)
    with pytest.raises(RuntimeError, match="null block in full-attention KV-cache group 0"):
        side.update_state_after_alloc(again, TwoGroupBlocks([0, 9, 10], [11, 12, 13]), n)


def test_blocks_allocated_this_step_are_sent_to_the_workers():
    out = step({"n": ([3, 4], [0, 9])}, [("n", 0)])
    out.scheduled_cached_reqs.new_block_ids = [([12], [13]), None]
    assert allocated_blocks(out) == [3, 4, 9, 12, 13]
    side = two_group_scheduler({})
    assert side.build_connector_meta(out).allocated == [3, 4, 9, 12, 13]
    single = SchedulerSide(SIG, BS, SymramConfig())
    assert single.build_connector_meta(out).allocated == []  # nothing freed under a request


# -- the worker half ------------------------------------------------------------------
def hybrid_worker(seed: int, codec: str = "none") -> tuple[WorkerSide, dict]:
    kv = hybrid_caches(seed)
    worker = WorkerSide(SymramConfig(dram_bytes=1 << 22, codec=codec), rank=0)
    worker.register_kv_caches(kv, GROUPS)
    assert worker.active and worker.layout is not None and worker.layout.num_groups == 2
    return worker, kv


def settle(worker: WorkerSide) -> set[str]:
    from tests.test_connector_halves import drain

    return drain(worker)[1]


def test_worker_round_trip_with_group_ids_and_per_request_load_failures():
    worker, kv = hybrid_worker(4)
    keys = [bytes([i]) * 32 for i in range(3)]
    save = BlockJob("r1", [1, 2, 3], keys, [0, 1, 2], group_block_ids=[[1, 2, 3], [7, 8, 9]])
    worker.submit_saves(SymramConnectorMetadata(saves=[save]))
    settle(worker)
    expected = {name: t[[1, 2, 3] if GROUPS[name] == 0 else [7, 8, 9]].clone()
                for name, t in kv.items()}
    load = BlockJob("r2", [10, 11, 12], keys, [0, 1, 2],
                    group_block_ids=[[10, 11, 12], [-1, 14, 15]])
    missing = BlockJob("r3", [16, 17], [keys[0], b"\xee" * 32], [0, 1],
                       group_block_ids=[[16, 17], [18, 19]])
    worker.start_loads(SymramConnectorMetadata(loads=[load, missing]))
    recving = settle(worker)
    assert recving == {"r2", "r3"}
    assert torch.equal(kv["full.1"][[10, 11, 12]], expected["full.1"])
    assert torch.equal(kv["window.0"][[14, 15]], expected["window.0"][1:])
    # Several groups: vLLM takes a failed load per request (it recomputes the prompt);
    # block ids alone would not say which group they belong to.
    assert worker.take_load_errors() == set()
    assert worker.take_failed_loads(recving) == {"r3"}
    assert worker.take_failed_loads({"r3"}) == set()  # reported once


def test_a_block_reused_this_step_is_read_before_the_forward_overwrites_it():
    worker, _ = hybrid_worker(5)
    assert worker.mover is not None
    release = threading.Event()
    original = worker.mover.save

    def slow_save(*args, **kwargs):
        release.wait(10)
        return original(*args, **kwargs)

    worker.mover.save = slow_save  # type: ignore[method-assign]
    job = BlockJob("r1", [1], [b"\x01" * 32], [0], group_block_ids=[[1], [6]])
    worker.submit_saves(SymramConnectorMetadata(saves=[job]))
    # Block 6 (the window group's) was freed and handed to another request this step.
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (
        worker.handle_preemptions(SymramConnectorMetadata(allocated=[6, 30])), done.set()))
    waiter.start()
    assert not done.wait(0.3)  # held back while the copy still reads block 6
    release.set()
    assert done.wait(10)
    waiter.join()
    assert worker.take_counters()[0]["save_reuse_waits"] == 1
    # A step reusing none of the saved blocks does not wait.
    worker.mover.save = original  # type: ignore[method-assign]
    worker.handle_preemptions(SymramConnectorMetadata(allocated=[40]))

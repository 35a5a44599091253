"""Batched block moves: byte-identical to the per-block path, in every engine layout,
with a device-operation count that does not grow with the block count.

The Triton descriptor kernel runs under ``TRITON_INTERPRET=1`` in a fresh interpreter
(triton must be imported with the variable set), on CPU tensors, against the torch
path; on a CUDA host the GPU proof kit runs the same comparison compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from symram_vllm.kernels import block_copy
from symram_vllm.layout import KVLayout, LayoutError

pytestmark = pytest.mark.gpu  # part of the GPU proof kit (scripts/gpu_check.sh)
L, B, H, N, C = 4, 24, 2, 16, 32


def _fill(t: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    return t


def make_caches(layout: str, layers: int = L, blocks: int = B, dtype=torch.bfloat16):
    """Per-layer [B, H, N, C] views over one allocation in vLLM's physical layouts."""
    if layout == "LBHNC":
        raw = torch.empty(layers, blocks, H, N, C, dtype=dtype)
        views = [raw[i] for i in range(layers)]
    elif layout == "BLHNC":
        raw = torch.empty(blocks, layers, H, N, C, dtype=dtype)
        views = [raw[:, i] for i in range(layers)]
    elif layout == "LBNHC":  # heads inside tokens: a block is not [H, N, C]-contiguous
        raw = torch.empty(layers, blocks, N, H, C, dtype=dtype)
        views = [raw[i].permute(0, 2, 1, 3) for i in range(layers)]
    elif layout == "LHBNC":
        raw = torch.empty(layers, H, blocks, N, C, dtype=dtype)
        views = [raw[i].permute(1, 0, 2, 3) for i in range(layers)]
    else:
        raise ValueError(layout)
    _fill(raw, 7)
    return {f"model.layers.{i}.self_attn.attn": v for i, v in enumerate(views)}


def per_block_page(layout: KVLayout, block_id: int) -> torch.Tensor:
    """The per-block reference: one copy per layer into canonical page order."""
    page = torch.empty(layout.page_bytes, dtype=torch.uint8)
    for dst, src in zip(layout.page_views(page), layout.block_views(block_id), strict=True):
        dst.copy_(src)
    return page


LAYOUTS = ["LBHNC", "BLHNC", "LBNHC", "LHBNC"]
ID_LISTS = {
    "sorted": [0, 1, 2, 3, 4, 5],
    "unsorted": [17, 3, 9, 0, 23, 11],
    "noncontiguous": [2, 5, 8, 13, 21],
}


def test_segments_follow_the_physical_layout():
    assert len(KVLayout(make_caches("LBHNC")).segments) == L
    blhnc = KVLayout(make_caches("BLHNC"))
    assert blhnc.block_major and len(blhnc.segments) == 1
    assert not KVLayout(make_caches("LBHNC")).block_major
    assert [s.raw for s in KVLayout(make_caches("LBNHC")).segments] == [False] * L


@pytest.mark.parametrize("physical", LAYOUTS)
@pytest.mark.parametrize("ids_name", list(ID_LISTS))
@pytest.mark.parametrize("rows_kind", ["consecutive", "scattered"])
def test_batched_save_equals_per_block_pages(physical, ids_name, rows_kind):
    layout = KVLayout(make_caches(physical))
    ids = ID_LISTS[ids_name]
    pages = torch.zeros(40, layout.page_bytes, dtype=torch.uint8)
    rows = list(range(5, 5 + len(ids))) if rows_kind == "consecutive" else [
        31, 2, 17, 9, 38, 24][: len(ids)]
    layout.save_blocks(ids, pages, rows)
    for block_id, row in zip(ids, rows, strict=True):
        assert torch.equal(pages[row], per_block_page(layout, block_id)), (block_id, row)
    untouched = [r for r in range(40) if r not in rows]
    assert int(pages[untouched].count_nonzero()) == 0


def test_repeated_block_ids_save_to_each_row():
    layout = KVLayout(make_caches("LBHNC"))
    pages = torch.zeros(4, layout.page_bytes, dtype=torch.uint8)
    layout.save_blocks([6, 6, 2], pages, [0, 3, 1])
    assert torch.equal(pages[0], pages[3])
    assert torch.equal(pages[0], per_block_page(layout, 6))


@pytest.mark.parametrize("physical", LAYOUTS)
@pytest.mark.parametrize("rows_kind", ["consecutive", "scattered"])
def test_batched_load_writes_exactly_the_listed_blocks(physical, rows_kind):
    src = KVLayout(make_caches(physical))
    pages = torch.zeros(12, src.page_bytes, dtype=torch.uint8)
    rows = [3, 4, 5, 6] if rows_kind == "consecutive" else [9, 0, 7, 2]
    src.save_blocks([1, 8, 15, 22], pages, rows)
    kv = make_caches(physical)
    for view in kv.values():
        view.zero_()
    dst = KVLayout(kv)
    dst.load_blocks(pages, rows, [20, 0, 11, 7])
    for s, d in zip([1, 8, 15, 22], [20, 0, 11, 7], strict=True):
        for a, b in zip(dst.block_views(d), src.block_views(s), strict=True):
            assert torch.equal(a, b)
    untouched = [b for b in range(B) if b not in (20, 0, 11, 7)]
    for view in kv.values():
        assert int(view[untouched].count_nonzero()) == 0


@pytest.mark.parametrize(("saved_in", "loaded_in"), [("LBHNC", "BLHNC"), ("BLHNC", "LBHNC"),
                                                     ("LBNHC", "BLHNC")])
def test_a_page_saved_under_one_layout_loads_under_another(saved_in, loaded_in):
    src = KVLayout(make_caches(saved_in))
    dst_kv = make_caches(loaded_in)
    dst = KVLayout(dst_kv)
    assert src.description == dst.description  # same signature, so the same keys
    pages = torch.empty(3, src.page_bytes, dtype=torch.uint8)
    src.save_blocks([4, 9, 2], pages, [0, 1, 2])
    dst.load_blocks(pages, [0, 1, 2], [10, 11, 12])
    for s, d in zip([4, 9, 2], [10, 11, 12], strict=True):
        for a, b in zip(dst.block_views(d), src.block_views(s), strict=True):
            assert torch.equal(a, b)


def test_op_count_does_not_grow_with_blocks():
    # 32 layers, 512 blocks: at most one device op per layer for codec none.
    layers, blocks = 32, 600
    lb = KVLayout({f"l{i}": t for i, t in enumerate(
        torch.zeros(layers, blocks, 1, 4, 8, dtype=torch.bfloat16).unbind(0))})
    pages = torch.empty(512, lb.page_bytes, dtype=torch.uint8)
    ids = torch.randperm(blocks, generator=torch.Generator().manual_seed(0))[:512].tolist()
    assert lb.save_blocks(ids, pages, range(512)) <= 32
    assert lb.load_blocks(pages, range(512), ids) <= 32
    assert lb.save_blocks(ids[:32], pages, range(32)) == lb.save_blocks(ids, pages, range(512))
    raw = torch.zeros(blocks, layers, 1, 4, 8, dtype=torch.bfloat16)
    bl = KVLayout({f"l{i}": raw[:, i] for i in range(layers)})
    assert bl.save_blocks(ids, pages, range(512)) == 1
    assert bl.load_blocks(pages, range(512), ids) == 1


def test_bad_arguments_are_refused_before_any_copy():
    layout = KVLayout(make_caches("LBHNC"))
    pages = torch.zeros(4, layout.page_bytes, dtype=torch.uint8)
    with pytest.raises(block_copy.BlockCopyError, match="block ids must lie"):
        layout.save_blocks([B], pages, [0])
    with pytest.raises(block_copy.BlockCopyError, match="page rows must lie"):
        layout.save_blocks([0], pages, [4])
    with pytest.raises(block_copy.BlockCopyError, match="2 block ids but 1"):
        layout.load_blocks(pages, [0], [1, 2])
    with pytest.raises(block_copy.BlockCopyError, match="once"):
        layout.load_blocks(pages, [0, 1], [3, 3])
    with pytest.raises(LayoutError, match="pages must be uint8"):
        layout.save_blocks([0], pages[:, :-1], [0])
    assert int(pages.count_nonzero()) == 0


def test_backend_choice_on_cpu_is_torch():
    layout = KVLayout(make_caches("LBHNC"))
    pages = torch.zeros(2, layout.page_bytes, dtype=torch.uint8)
    assert block_copy.pick_backend(layout.segments, pages) == "torch"


TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from symram_vllm.kernels import block_copy, block_copy_triton
    from symram_vllm.layout import KVLayout
    from tests.test_block_copy import make_caches

    for physical in ("LBHNC", "BLHNC"):
        layout = KVLayout(make_caches(physical))
        ids = torch.tensor([17, 3, 9, 0, 23, 3])
        rows = torch.tensor([31, 2, 17, 9, 38, 5])
        ref = torch.zeros(40, layout.page_bytes, dtype=torch.uint8)
        block_copy.torch_save(layout.segments, ids, ref, rows)
        got = torch.zeros_like(ref)
        ops = block_copy_triton.save(layout.segments, ids, got, rows)
        assert ops == 1, ops
        assert torch.equal(got, ref), physical
        kv_ref, kv_got = make_caches(physical), make_caches(physical)
        lids = torch.tensor([20, 0, 11, 7, 5])
        lrows = torch.tensor([31, 2, 17, 9, 38])
        block_copy.torch_load(KVLayout(kv_ref).segments, ref, lrows, lids)
        block_copy_triton.load(KVLayout(kv_got).segments, ref, lrows, lids)
        for name in kv_ref:
            assert torch.equal(kv_ref[name], kv_got[name]), (physical, name)
    print("TRITON-BLOCK-COPY-OK")
    """
)


def test_triton_descriptor_kernel_matches_torch_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], env=env, cwd=root, capture_output=True,
        text=True, timeout=300,
    )
    assert "TRITON-BLOCK-COPY-OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("physical", ["LBHNC", "BLHNC"])
def test_parallel_host_scatter_writes_the_same_bytes(physical, monkeypatch):
    # Large host scatters are split across threads: force that path on small caches.
    monkeypatch.setattr(block_copy, "PARALLEL_SCATTER_BYTES", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    src = KVLayout(make_caches(physical))
    pages = torch.zeros(12, src.page_bytes, dtype=torch.uint8)
    src.save_blocks([1, 8, 15, 22, 3, 5, 7], pages, [0, 9, 2, 7, 4, 1, 11])  # a scatter
    kv = make_caches(physical)
    for view in kv.values():
        view.zero_()
    dst = KVLayout(kv)
    dst.load_blocks(pages, [0, 1, 2, 3, 4], [20, 0, 11, 6, 9])
    for row, d in zip([0, 1, 2, 3, 4], [20, 0, 11, 6, 9], strict=True):
        page = torch.empty(dst.page_bytes, dtype=torch.uint8)
        for out, block in zip(dst.page_views(page), dst.block_views(d), strict=True):
            out.copy_(block)
        assert torch.equal(page, pages[row])


# -- the staged DMA path (CUDA cache <-> host pages), run here with a CPU "device" -------
@pytest.mark.parametrize("physical", LAYOUTS)
@pytest.mark.parametrize("stage_limit", [1 << 30, 1])  # one chunk, or one block a chunk
def test_staged_path_writes_the_same_bytes_as_torch(physical, stage_limit, monkeypatch):
    from symram_vllm.kernels import block_copy_staged

    monkeypatch.setattr(block_copy_staged, "STAGE_LIMIT_BYTES", stage_limit)
    layout = KVLayout(make_caches(physical))
    ids = torch.tensor([[17, 3, 9, 0, 23, 3]])
    rows = torch.tensor([31, 32, 33, 9, 38, 5])  # three runs: 31-33, 9, 38, 5
    assert block_copy_staged.consecutive_runs(rows) == [(0, 31, 3), (3, 9, 1), (4, 38, 1),
                                                        (5, 5, 1)]
    ref = torch.zeros(40, layout.page_bytes, dtype=torch.uint8)
    got = torch.zeros_like(ref)
    block_copy.torch_save(layout.segments, ids, ref, rows)
    ops = block_copy_staged.save(layout.segments, ids, got, rows)
    assert torch.equal(got, ref)
    chunks = 1 if stage_limit > 1 else 6
    assert ops == chunks * len(layout.segments) + 4 + (2 if stage_limit == 1 else 0)
    kv_ref, kv_got = make_caches(physical), make_caches(physical)
    lids = torch.tensor([[20, 0, 11, 7, 5]])
    lrows = torch.tensor([31, 32, 33, 9, 38])
    block_copy.torch_load(KVLayout(kv_ref).segments, ref, lrows, lids)
    block_copy_staged.load(KVLayout(kv_got).segments, ref, lrows, lids)
    for name in kv_ref:
        assert torch.equal(kv_ref[name], kv_got[name]), name


def test_staged_load_skips_negative_ids_of_a_group():
    from symram_vllm.kernels import block_copy_staged

    caches = make_caches("LBHNC")
    groups = {name: i % 2 for i, name in enumerate(caches)}
    src = KVLayout(caches, groups)
    pages = torch.zeros(4, src.page_bytes, dtype=torch.uint8)
    block_copy.torch_save(src.segments, torch.tensor([[1, 2], [3, 4]]), pages,
                          torch.tensor([0, 1]))
    ids = torch.tensor([[5, 6], [-1, 7]])  # group 1 skips page 0
    kv_ref, kv_got = make_caches("LBHNC"), make_caches("LBHNC")
    for kv in (kv_ref, kv_got):
        for view in kv.values():
            view.zero_()
    block_copy.torch_load(KVLayout(kv_ref, groups).segments, pages, torch.tensor([0, 1]), ids)
    block_copy_staged.load(KVLayout(kv_got, groups).segments, pages, torch.tensor([0, 1]), ids)
    for name in kv_ref:
        assert torch.equal(kv_ref[name], kv_got[name]), name


class _FakeCuda:
    """Stands in for a CUDA tensor where pick_backend only reads metadata."""

    device = torch.device("cuda")

    def __init__(self, ptr: int = 0, stride: int = 4096) -> None:
        self._ptr, self._stride = ptr, stride

    def data_ptr(self) -> int:
        return self._ptr

    def stride(self, dim: int) -> int:
        return self._stride


class _FakePages(_FakeCuda):
    def __init__(self, device: str = "cpu", pinned: bool = True) -> None:
        super().__init__()
        self.device = torch.device(device)  # type: ignore[misc]
        self._pinned = pinned

    def is_pinned(self) -> bool:
        return self._pinned


def test_backend_choice_follows_vllms_measurements(monkeypatch):
    from symram_vllm.capability import Capability

    monkeypatch.setattr(block_copy, "triton_capability", lambda: Capability(True, "test"))
    monkeypatch.delenv(block_copy.BACKEND_ENV, raising=False)

    def segs(nbytes: int, count: int) -> list[block_copy.Segment]:
        return [block_copy.Segment(_FakeCuda(), i * nbytes, nbytes, raw=True)  # type: ignore[arg-type]
                for i in range(count)]

    pick = block_copy.pick_backend
    small, big = segs(8 << 10, 80), segs(64 << 10, 32)  # llama3-70b-tp8 / llama3-8b LBHNC
    pinned = _FakePages()
    assert pick(small, pinned, blocks=512) == "triton"  # loads of small segments
    assert pick(small, pinned, to_pages=True, blocks=512) == "staged"  # saves: copy engine
    assert pick(big, pinned, blocks=512) == "staged"  # 64 KiB: the copy engine wins
    assert pick(segs(8 << 10, 1), pinned, blocks=8) == "staged"  # too few descriptors
    assert pick(small, _FakePages(pinned=False), blocks=512) == "staged"  # no UVA
    assert pick(small, _FakePages("cuda"), blocks=512) == "torch"  # device to device
    monkeypatch.setattr(block_copy, "triton_capability", lambda: Capability(False, "test"))
    assert pick(small, pinned, blocks=512) == "staged"
    monkeypatch.setattr(block_copy, "triton_capability", lambda: Capability(True, "test"))
    for forced, save, load in [("triton", "triton", "triton"), ("staged", "staged", "staged"),
                               ("torch", "torch", "torch"), ("bogus", "staged", "staged")]:
        monkeypatch.setenv(block_copy.BACKEND_ENV, forced)
        assert pick(big, pinned, to_pages=True, blocks=512) == save, forced
        assert pick(big, pinned, blocks=512) == load, forced
    monkeypatch.setenv(block_copy.BACKEND_ENV, "triton")  # only where the kernel can serve
    assert pick(segs(12, 2), pinned, blocks=512) == "staged"
    # Rows scattered over the arena: the staged path would make one DMA per run (one
    # per block here), so the kernel serves the job, saves too; a few runs stay staged.
    monkeypatch.delenv(block_copy.BACKEND_ENV)
    scattered = torch.arange(512) * 2
    few_runs = torch.cat([torch.arange(100, 164), torch.arange(0, 448)])
    assert block_copy.row_runs(scattered) == 512 and block_copy.row_runs(few_runs) == 2
    assert pick(big, pinned, to_pages=True, blocks=512, rows=scattered) == "triton"
    assert pick(big, pinned, blocks=512, rows=scattered) == "triton"
    assert pick(big, pinned, to_pages=True, blocks=512, rows=few_runs) == "staged"
    assert pick(big, _FakePages(pinned=False), blocks=512, rows=scattered) == "staged"
    assert block_copy.row_runs(torch.tensor([], dtype=torch.int64)) == 0


def test_staging_shrinks_next_to_a_nearly_full_gpu(monkeypatch):
    from symram_vllm.kernels import block_copy_staged as staged

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 << 30, 141 << 30))
    assert staged.stage_limit(cuda) == staged.STAGE_LIMIT_BYTES
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 141 << 30))
    assert staged.stage_limit(cuda) == 256 << 20
    assert staged._chunks(512, 2 << 20, cuda) == [(0, 128), (128, 256), (256, 384), (384, 512)]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 141 << 30))
    assert staged._chunks(3, 2 << 20, cuda) == [(0, 1), (1, 2), (2, 3)]  # a block at a time
    assert staged.stage_limit(torch.device("cpu")) == staged.STAGE_LIMIT_BYTES

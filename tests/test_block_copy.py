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

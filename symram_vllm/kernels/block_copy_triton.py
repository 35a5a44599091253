"""Triton path of the batched block moves: one launch per job over copy descriptors.

Each descriptor is (source address, destination address, bytes): one segment of one
block. The kernel walks descriptors in a grid-stride loop and copies 8-byte words, so
pinned host pages are read and written through UVA without a staging buffer, in the
manner of vLLM's ``swap_blocks_triton`` (whose constants were tuned on H100 PCIe
Gen5). Descriptors are built on the host with vectorised int64 arithmetic and uploaded
in one copy, so a job costs two device operations whatever its block count.

Callers (``block_copy.pick_backend``) guarantee 8-byte alignment of every address and
size; the tests run the kernel under ``TRITON_INTERPRET=1`` on CPU tensors against the
torch path, byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from symram_vllm.kernels.block_copy import Segment

# Programs per launch: enough to saturate PCIe with 8-64 KiB descriptors (vLLM found
# 12 SMs within 5% of peak on H100); more only adds scheduling overhead.
NUM_PROGRAMS = 16
BYTES_PER_CHUNK = 4096


@triton.jit
def _copy_descriptors(
    descriptors,  # int64 [3, n]: src addresses, dst addresses, sizes in bytes
    n_jobs,
    WORDS_PER_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    offsets = tl.arange(0, WORDS_PER_CHUNK)
    job = pid
    while job < n_jobs:
        src = tl.load(descriptors + job).to(tl.pointer_type(tl.int64))
        dst = tl.load(descriptors + n_jobs + job).to(tl.pointer_type(tl.int64))
        words = tl.load(descriptors + 2 * n_jobs + job) // 8
        for start in range(0, words, WORDS_PER_CHUNK):
            idx = start + offsets
            mask = idx < words
            tl.store(dst + idx, tl.load(src + idx, mask=mask, other=0), mask=mask)
        job += num_progs


def descriptors(
    segments: Sequence[Segment],
    ids: torch.Tensor,
    pages: torch.Tensor,
    rows: torch.Tensor,
    *,
    to_pages: bool,
) -> torch.Tensor:
    """int64 [3, runs] on the host: (src, dst, nbytes) of every segment run. `ids` is
    ``[groups, n]``; a negative id (loads only) has no run."""
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    page_base = pages.data_ptr() + rows * pages.stride(0) * pages.element_size()
    blocks, pages_addr, sizes = [], [], []
    for seg in segments:
        src = seg.source
        group_ids = ids[seg.group]
        keep = group_ids >= 0
        group_ids, group_pages = group_ids[keep], page_base[keep]
        blocks.append(src.data_ptr() + group_ids * src.stride(0) * src.element_size())
        pages_addr.append(group_pages + seg.page_offset)
        sizes.append(torch.full_like(group_ids, seg.nbytes))
    block_addr, page_addr = torch.cat(blocks), torch.cat(pages_addr)
    src_addr, dst_addr = (block_addr, page_addr) if to_pages else (page_addr, block_addr)
    return torch.stack([src_addr, dst_addr, torch.cat(sizes)])


def _launch(table: torch.Tensor, device: torch.device) -> int:
    n = table.shape[1]
    if n == 0:
        return 0
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    grid = (min(NUM_PROGRAMS, n),)
    _copy_descriptors[grid](table, n, WORDS_PER_CHUNK=BYTES_PER_CHUNK // 8)
    return 2 if device.type == "cuda" else 1


def save(
    segments: Sequence[Segment], ids: torch.Tensor, pages: torch.Tensor, rows: torch.Tensor
) -> int:
    table = descriptors(segments, ids, pages, rows, to_pages=True)
    return _launch(table, segments[0].source.device)


def load(
    segments: Sequence[Segment], pages: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor
) -> int:
    table = descriptors(segments, ids, pages, rows, to_pages=False)
    return _launch(table, segments[0].source.device)

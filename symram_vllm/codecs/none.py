"""Codec "none": the page is the block's bytes in the engine dtype, layer after layer.

Byte-compatible with ``layout.KVLayout`` pages, so switching a tier to "none" changes
nothing on disk or in DRAM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from symram_vllm.codecs.base import FixedSizeCodec, IndexLike, PageMeta
from symram_vllm.codecs.pages import indices, region


class NoneCodec(FixedSizeCodec):
    name = "none"
    lossless = True

    def _size(self) -> int:
        return self.geometry.page_bytes

    def _layer_view(self, pages: torch.Tensor, layer: int) -> torch.Tensor:
        g = self.geometry
        nbytes = g.layer_elems * g.dtype.itemsize
        return region(pages, layer * nbytes, nbytes, g.dtype, g.block_shape)

    def encode_blocks(
        self,
        kv_caches: Sequence[torch.Tensor],
        block_ids: IndexLike,
        pages: torch.Tensor,
        page_ids: IndexLike,
    ) -> list[PageMeta]:
        self.geometry.check_blocks(kv_caches, "encode_blocks")
        ids = indices(block_ids, kv_caches[0].device)
        rows = indices(page_ids, pages.device)
        for layer, cache in enumerate(kv_caches):
            src = cache.index_select(0, ids).to(pages.device)
            self._layer_view(pages, layer).index_copy_(0, rows, src)
        size = self._size()
        return [PageMeta(self.name, size, size, max_abs_error=0.0, rel_error=0.0)
                for _ in range(rows.numel())]

    def decode_blocks(
        self,
        pages: torch.Tensor,
        page_ids: IndexLike,
        kv_caches: Sequence[torch.Tensor],
        block_ids: IndexLike,
    ) -> None:
        self.geometry.check_blocks(kv_caches, "decode_blocks")
        ids = indices(block_ids, kv_caches[0].device)
        rows = indices(page_ids, pages.device)
        for layer, cache in enumerate(kv_caches):
            src = self._layer_view(pages, layer).index_select(0, rows).to(cache.device)
            cache.index_copy_(0, ids, src)

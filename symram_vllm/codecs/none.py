"""Codec "none": the page is the block's bytes in the engine dtype, layer after layer.

Byte-compatible with ``layout.KVLayout`` pages, so switching a tier to "none" changes
nothing on disk or in DRAM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from symram_vllm.codecs.base import FixedSizeCodec, PageMeta
from symram_vllm.codecs.pages import region


class NoneCodec(FixedSizeCodec):
    name = "none"
    lossless = True

    def _size(self) -> int:
        return self.geometry.page_bytes

    def _layer_view(self, pages: torch.Tensor, layer: int) -> torch.Tensor:
        g = self.geometry
        nbytes = g.layer_elems * g.dtype.itemsize
        return region(pages, layer * nbytes, nbytes, g.dtype, g.block_shape)

    def _encode_rows(
        self, caches: Sequence[torch.Tensor], ids: torch.Tensor, pages: torch.Tensor,
        rows: torch.Tensor,
    ) -> list[PageMeta]:
        for layer, cache in enumerate(caches):
            src = cache.index_select(0, ids).to(pages.device)
            self._layer_view(pages, layer).index_copy_(0, rows, src)
        size = self._size()
        return [PageMeta(self.name, size, size, max_abs_error=0.0, rel_error=0.0)
                for _ in range(rows.numel())]

    def _decode_rows(
        self, pages: torch.Tensor, rows: torch.Tensor, caches: Sequence[torch.Tensor],
        ids: torch.Tensor,
    ) -> None:
        for layer, cache in enumerate(caches):
            src = self._layer_view(pages, layer).index_select(0, rows).to(cache.device)
            cache.index_copy_(0, ids, src)

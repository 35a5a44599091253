"""Shared body of the 8-bit codecs (int8, fp8).

Page layout (every offset a multiple of 16 bytes, padding zeroed so equal blocks give
equal pages):

    codes : layer 0 [H, N, C] | layer 1 | ...        1 byte per element
    scales: layer 0 [*scales_shape] | layer 1 | ...  float32, (K, V) in the last dim

The codes of one layer are the kernel's ``q`` for one block, so the kernels write
straight into the page (``out=`` / ``out_rows=``) without a staging copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from symram_vllm.codecs.base import FixedSizeCodec, PageGeometry, PageMeta
from symram_vllm.codecs.pages import align_up, region
from symram_vllm.kernels import dequantize_scatter, gather_quantize, quant_dtype, scales_shape
from symram_vllm.kernels.block_copy import consecutive_start


class QuantCodec(FixedSizeCodec):
    lossless = False
    fmt: str
    granularity: str

    def __init__(self, geometry: PageGeometry, *, measure_error: bool = True) -> None:
        if geometry.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"{self.fmt} quantizes bfloat16/float16 caches, not {geometry.dtype}")
        super().__init__(geometry, measure_error=measure_error)
        g = geometry
        self._scale_shape = scales_shape(1, g.heads, g.tokens, self.granularity)[1:]
        self._codes_bytes = g.layer_elems
        self._scale_bytes = 4 * int(torch.Size(self._scale_shape).numel())
        self._scales_at = align_up(g.num_layers * self._codes_bytes)
        self._end = self._scales_at + g.num_layers * self._scale_bytes
        self._page_size = align_up(self._end)

    def _size(self) -> int:
        return self._page_size

    def codes_view(self, pages: torch.Tensor, layer: int) -> torch.Tensor:
        g = self.geometry
        return region(pages, layer * self._codes_bytes, self._codes_bytes, quant_dtype(self.fmt),
                      g.block_shape)

    def scales_view(self, pages: torch.Tensor, layer: int) -> torch.Tensor:
        start = self._scales_at + layer * self._scale_bytes
        return region(pages, start, self._scale_bytes, torch.float32, self._scale_shape)

    def all_scales(self, pages: torch.Tensor) -> torch.Tensor:
        """[rows, layers, *scales_shape] view of every scale in `pages`."""
        n = self.geometry.num_layers
        return region(pages, self._scales_at, n * self._scale_bytes, torch.float32,
                      (n, *self._scale_shape))

    def _encode_rows(
        self, caches: Sequence[torch.Tensor], ids: torch.Tensor, pages: torch.Tensor,
        rows: torch.Tensor,
    ) -> list[PageMeta]:
        if pages.device == ids.device:
            self._encode_lazy(caches, ids, pages, rows)
            return self._metas(caches, ids, pages, rows)
        # Measure on the device copy, then point each meta's scales at the host page.
        target = torch.empty((ids.numel(), self._page_size), dtype=torch.uint8,
                             device=ids.device)
        local = torch.arange(ids.numel(), device=ids.device)
        self._quantize(caches, ids, target, local)
        metas = self._metas(caches, ids, target, local)
        self._to_pages(target, pages, rows)
        for meta, row in zip(metas, rows.tolist(), strict=True):
            meta.scales = self.all_scales(pages)[row]
        return metas

    def _encode_lazy(
        self, caches: Sequence[torch.Tensor], ids: torch.Tensor, pages: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        if pages.device == ids.device:
            self._quantize(caches, ids, pages, rows)
            return self._nonfinite(pages, rows)
        # A CUDA cache and host pages: quantize on the device into a staging array of
        # encoded size (half the raw bytes or less), then one copy to the host rows.
        target = torch.empty((ids.numel(), self._page_size), dtype=torch.uint8,
                             device=ids.device)
        local = torch.arange(ids.numel(), device=ids.device)
        self._quantize(caches, ids, target, local)
        self._to_pages(target, pages, rows)
        return self._nonfinite(target, local)

    def _quantize(
        self, caches: Sequence[torch.Tensor], ids: torch.Tensor, pages: torch.Tensor,
        rows: torch.Tensor,
    ) -> None:
        # Host copies, made once: each layer's kernel call then checks them on the host
        # and uploads them without a sync (a CUDA index costs one sync per check).
        ids_host, rows_host = ids.cpu(), rows.cpu()
        for layer, cache in enumerate(caches):
            gather_quantize(
                cache, ids_host, self.fmt, self.granularity,
                out=self.codes_view(pages, layer), out_scales=self.scales_view(pages, layer),
                out_rows=rows_host,
            )
        # Padding bytes would otherwise keep whatever the slot held before.
        pages[:, self._codes_bytes * self.geometry.num_layers : self._scales_at].index_fill_(
            0, rows, 0)
        pages[:, self._end :].index_fill_(0, rows, 0)

    def _nonfinite(self, pages: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Per-row count of NaN scales (groups that held inf/NaN), left on the device."""
        return torch.isnan(self.all_scales(pages).index_select(0, rows)).flatten(1).sum(1)

    @staticmethod
    def _to_pages(staged: torch.Tensor, pages: torch.Tensor, rows: torch.Tensor) -> None:
        start = consecutive_start(rows.cpu())
        if start is not None:
            pages[start : start + staged.shape[0]].copy_(staged, non_blocking=pages.is_pinned())
        else:
            pages.index_copy_(0, rows, staged.to(pages.device))

    def _decode_rows(
        self, pages: torch.Tensor, rows: torch.Tensor, caches: Sequence[torch.Tensor],
        ids: torch.Tensor,
    ) -> None:
        device = ids.device
        if pages.device != device:
            start = consecutive_start(rows.cpu())
            staged = (pages[start : start + ids.numel()] if start is not None
                      else pages.index_select(0, rows))
            pages = staged.to(device, non_blocking=pages.is_pinned())
            rows = torch.arange(ids.numel())
        ids_host, rows_host = ids.cpu(), rows.cpu()  # see _quantize
        for layer, cache in enumerate(caches):
            dequantize_scatter(
                self.codes_view(pages, layer), self.scales_view(pages, layer), cache, ids_host,
                src_rows=rows_host,
            )

    def _metas(
        self,
        kv_caches: Sequence[torch.Tensor],
        ids: torch.Tensor,
        pages: torch.Tensor,
        rows: torch.Tensor,
    ) -> list[PageMeta]:
        n = ids.numel()
        scales = self.all_scales(pages)
        nonfinite = self._nonfinite(pages, rows).tolist()
        metas = [
            PageMeta(self.name, self.geometry.page_bytes, self._page_size,
                     scales=scales[int(r)], nonfinite_groups=int(bad))
            for r, bad in zip(rows.tolist(), nonfinite, strict=True)
        ]
        if not self.measure_error or n == 0:
            return metas
        max_err = torch.zeros(n, dtype=torch.float32, device=ids.device)
        err_sq = torch.zeros(n, dtype=torch.float64, device=ids.device)
        ref_sq = torch.zeros(n, dtype=torch.float64, device=ids.device)
        local = torch.arange(n, device=ids.device)
        for layer, cache in enumerate(kv_caches):
            x = cache.index_select(0, ids).float()
            x_hat = torch.empty((n, *self.geometry.block_shape), dtype=cache.dtype,
                                device=cache.device)
            dequantize_scatter(self.codes_view(pages, layer), self.scales_view(pages, layer),
                               x_hat, local, src_rows=rows)
            x_hat = x_hat.float()
            # Groups poisoned by inf/NaN are counted in nonfinite_groups, not here.
            ok = torch.isfinite(x) & torch.isfinite(x_hat)
            err = torch.where(ok, x - x_hat, 0.0).flatten(1)
            ref = torch.where(ok, x, 0.0).flatten(1)
            max_err = torch.maximum(max_err, err.abs().amax(1))
            err_sq += err.double().square().sum(1)
            ref_sq += ref.double().square().sum(1)
        rel = torch.where(ref_sq > 0, (err_sq / ref_sq.clamp_min(1e-300)).sqrt(), err_sq.sqrt())
        for meta, m, r in zip(metas, max_err.tolist(), rel.tolist(), strict=True):
            meta.max_abs_error = m
            meta.rel_error = r
        return metas

"""The two public verbs every kernel implementation offers, argument handling included.

``QuantKernels.gather_quantize`` / ``dequantize_scatter`` check and normalise their
arguments once (``spec.py``), allocate outputs, and hand a checked ``Batch`` to the
implementation's two cores. The torch reference, the Triton kernels and the
per-device dispatcher are subclasses, so all three share one signature by
construction and differ only in how a checked batch is computed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from symram_vllm.kernels.spec import (
    Granularity,
    QuantFormat,
    as_index,
    check_cache,
    check_dequant_args,
    check_format,
    check_granularity,
    format_of,
    granularity_of,
    resolve_outputs,
)

IndexLike = torch.Tensor | Sequence[int]


@dataclass(frozen=True)
class Batch:
    """Checked arguments of one launch: block ``ids[i]`` of `cache` <-> row ``rows[i]``
    of (`q`, `scales`). `cache` is the source when quantizing, the destination when
    dequantizing. Ids and rows are int64 on the cache's device and in range."""

    cache: torch.Tensor
    ids: torch.Tensor
    q: torch.Tensor
    scales: torch.Tensor
    rows: torch.Tensor

    @property
    def fmt(self) -> QuantFormat:
        return format_of(self.q)

    @property
    def granularity(self) -> Granularity:
        return granularity_of(self.scales)

    def __len__(self) -> int:
        return self.ids.numel()


class QuantKernels(ABC):
    """Gather+quantize and dequantize+scatter of KV blocks; see ``spec.py`` for the
    contract every subclass meets byte for byte."""

    name: str

    def gather_quantize(
        self,
        kv: torch.Tensor,
        block_ids: IndexLike,
        fmt: str = "int8",
        granularity: str = "token",
        *,
        out: torch.Tensor | None = None,
        out_scales: torch.Tensor | None = None,
        out_rows: IndexLike | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize blocks `block_ids` of a [B, H, N, C] cache (any strides) to 8 bits.

        Returns ``(q, scales)``: q is [n, H, N, C] int8 / float8_e4m3fn and scales
        float32 [n, H, N, 2] ("token": per block, head, token and K|V half) or
        [n, H, 2] ("head"). With ``out`` / ``out_scales`` (any strides, e.g. typed
        views of a DRAM-tier arena), block ``block_ids[i]`` is written to row
        ``out_rows[i]`` and those buffers are returned, so no intermediate copy of the
        page is made on the Triton path.
        """
        check_format(fmt)
        check_granularity(granularity)
        blocks, heads, tokens, content = check_cache(kv, "kv")
        ids = as_index(block_ids, kv.device, blocks, "block_ids")
        q, scales, rows = resolve_outputs(
            ids.numel(), (heads, tokens, content), fmt, granularity, kv.device,
            out, out_scales, out_rows,
        )
        if ids.numel():
            self.quantize_batch(Batch(kv, ids, q, scales, rows))
        return q, scales

    def dequantize_scatter(
        self,
        q: torch.Tensor,
        scales: torch.Tensor,
        dst_kv: torch.Tensor,
        block_ids: IndexLike,
        *,
        src_rows: IndexLike | None = None,
    ) -> None:
        """Inverse of gather_quantize: row ``src_rows[i]`` of (q, scales) is decoded
        into block ``block_ids[i]`` of `dst_kv`. Format and granularity follow q's
        dtype and scales' rank. Destination block ids must be distinct."""
        ids, rows = check_dequant_args(q, scales, dst_kv, block_ids, src_rows)
        if ids.numel():
            self.dequantize_batch(Batch(dst_kv, ids, q, scales, rows))

    @abstractmethod
    def quantize_batch(self, batch: Batch) -> None:
        """Write codes and scales of ``batch.cache[ids]`` into ``batch.q/scales[rows]``."""

    @abstractmethod
    def dequantize_batch(self, batch: Batch) -> None:
        """Write the decoded ``batch.q/scales[rows]`` into ``batch.cache[ids]``."""

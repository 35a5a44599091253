"""Torch reference of the quantization kernels: the CPU serving path and the oracle the
Triton kernels are tested against byte for byte. See ``spec.py`` for the contract."""

from __future__ import annotations

import functools

import torch

from symram_vllm.kernels.base import Batch, QuantKernels
from symram_vllm.kernels.spec import QMAX, SCALE_FLOOR

# Blocks per pass are chosen so the float32 temporaries stay around 2 MB: cache-sized,
# and small enough that the allocator reuses them instead of faulting in fresh pages
# (measured ~30% faster than one pass over a 24-block batch). Groups never straddle
# blocks, so chunking cannot change a byte.
CHUNK_ELEMS = 1 << 19


def _chunks(n: int, block_elems: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMS // max(1, block_elems))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _groups(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """[n, H, N, 2*D] -> [n, H, G, 2, E]: one row of E elements per (K|V) scale group."""
    n, heads, tokens, content = x.shape
    halves = x.view(n, heads, tokens, 2, content // 2)
    if granularity == "token":
        return halves
    # Per (block, head): all tokens of the K half share a scale, likewise V.
    return halves.transpose(2, 3).reshape(n, heads, 1, 2, tokens * content // 2)


def _ungroup(g: torch.Tensor, shape: torch.Size, granularity: str) -> torch.Tensor:
    n, heads, tokens, content = shape
    if granularity == "token":
        return g.reshape(shape)
    return g.view(n, heads, 2, tokens, content // 2).transpose(2, 3).reshape(shape)


def quantize_groups(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize fp32 groups along the last dim: returns (codes, scales[..., 1]).

    Consumes `x` (it is overwritten): callers pass a temporary.
    """
    qmax = QMAX[fmt]
    # inf and NaN propagate into amax, which flags their groups without a full
    # isfinite() pass over x (that pass alone would halve encode speed on CPU).
    amax = x.abs().amax(dim=-1, keepdim=True)
    bad = ~torch.isfinite(amax)
    any_bad = bool(bad.any())
    if any_bad:
        x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        amax = x.abs().amax(dim=-1, keepdim=True)
    amax.clamp_min_(SCALE_FLOOR)
    # Tensor/tensor division on purpose: torch computes `scalar / tensor` as
    # `reciprocal(tensor) * scalar`, which rounds twice and breaks byte equality.
    qm = torch.full_like(amax, qmax)
    scale = torch.div(amax, qm)
    y = x.mul_(torch.div(qm, amax)).clamp_(-qmax, qmax)
    if fmt == "int8":
        y.round_()  # round half to even, like the Triton kernel's magic-number round
    if any_bad:
        y.masked_fill_(bad, 0.0)
        scale.masked_fill_(bad, torch.nan)
    return y.to(torch.int8 if fmt == "int8" else torch.float8_e4m3fn), scale


@functools.lru_cache(maxsize=8)
def _fp8_table(device: torch.device) -> torch.Tensor:
    codes = torch.arange(256, dtype=torch.int32, device=device).to(torch.uint8)
    return codes.view(torch.float8_e4m3fn).float()


def codes_to_float(q: torch.Tensor) -> torch.Tensor:
    """int8 / fp8 codes as float32. fp8 goes through a 256-entry table built by torch's
    own conversion (same values), which is ~4x faster than .float() on CPU."""
    if q.dtype == torch.int8:
        return q.float()
    flat = q.contiguous().view(torch.uint8).reshape(-1).int()
    return _fp8_table(q.device).index_select(0, flat).view(q.shape)


class TorchKernels(QuantKernels):
    name = "torch"

    def quantize_batch(self, batch: Batch) -> None:
        fmt, granularity = batch.fmt, batch.granularity
        for start, stop in _chunks(len(batch), batch.cache[0].numel()):
            rows = batch.rows[start:stop]
            x = batch.cache.index_select(0, batch.ids[start:stop]).float()
            codes, scales = quantize_groups(_groups(x, granularity), fmt)
            codes = _ungroup(codes, x.shape, granularity)
            scales = scales.squeeze(-1)
            if granularity == "head":
                scales = scales.squeeze(2)
            # index_copy_ has no float8 kernel on CPU; the bytes are what we copy anyway.
            batch.q.view(torch.uint8).index_copy_(0, rows, codes.view(torch.uint8))
            batch.scales.index_copy_(0, rows, scales)

    def dequantize_batch(self, batch: Batch) -> None:
        q, granularity = batch.q, batch.granularity
        for start, stop in _chunks(len(batch), q[0].numel()):
            rows = batch.rows[start:stop]
            # index_select on the uint8 view: torch has no fast float8 gather on CPU.
            codes = codes_to_float(q.view(torch.uint8).index_select(0, rows).view(q.dtype))
            s = batch.scales.index_select(0, rows)
            if granularity == "head":
                s = s.unsqueeze(2)
            g = _groups(codes, granularity).mul_(s.unsqueeze(-1))
            batch.cache.index_copy_(
                0, batch.ids[start:stop],
                _ungroup(g, codes.shape, granularity).to(batch.cache.dtype),
            )


KERNELS = TorchKernels()
gather_quantize = KERNELS.gather_quantize
dequantize_scatter = KERNELS.dequantize_scatter

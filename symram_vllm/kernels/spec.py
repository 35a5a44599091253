"""The contract both kernel implementations (Triton and torch reference) follow.

Everything that decides output bytes lives here, so the two implementations cannot
drift apart: format constants, the scale floor, shapes, and argument checking.

Quantization of one *group* (a K or V half of one token row, or of a whole
(block, head)) with ``Q = 127`` (int8) or ``Q = 448`` (fp8 e4m3fn):

    amax   = max |x| over the finite elements of the group
    a      = max(amax, SCALE_FLOOR)                 # never divide by zero
    scale  = a / Q          inv = Q / a             # IEEE-rounded fp32 divisions
    y      = clamp(x * inv, -Q, Q)                  # fp32
    q      = round_half_even(y) (int8)  |  e4m3fn(y) rounded to nearest even (fp8)
    x_hat  = q * scale  -> rounded to nearest even in the cache dtype

A group that holds any inf or NaN is stored with ``q = 0`` and ``scale = NaN``, so
it decodes to all-NaN: corruption stays visible instead of becoming finite numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

QuantFormat = Literal["int8", "fp8"]
Granularity = Literal["token", "head"]

QUANT_FORMATS: tuple[str, ...] = get_args(QuantFormat)
GRANULARITIES: tuple[str, ...] = get_args(Granularity)

QMAX: dict[str, float] = {"int8": 127.0, "fp8": 448.0}
QDTYPE: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}

# Groups whose amax is below this are scaled as if their amax were this. It keeps
# `inv = Q / a` finite and `scale` a normal float32 (so flush-to-zero on a GPU can
# not change a result), at the price of decoding such groups (|x| < 5.4e-20, only
# reachable from bf16) as zeros. All-zero groups therefore round-trip exactly.
SCALE_FLOOR = 2.0**-64

SOURCE_DTYPES = (torch.bfloat16, torch.float16)


def quant_dtype(fmt: str) -> torch.dtype:
    check_format(fmt)
    return QDTYPE[fmt]


def format_of(q: torch.Tensor) -> QuantFormat:
    if q.dtype == torch.int8:
        return "int8"
    if q.dtype == torch.float8_e4m3fn:
        return "fp8"
    raise ValueError(f"quantized tensor must be int8 or float8_e4m3fn, got {q.dtype}")


def check_format(fmt: str) -> None:
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; valid: {', '.join(QUANT_FORMATS)}")


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"unknown scale granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}"
        )


def scales_shape(n: int, heads: int, tokens: int, granularity: str) -> tuple[int, ...]:
    """Shape of the float32 scales: the last dim is (K, V)."""
    check_granularity(granularity)
    return (n, heads, tokens, 2) if granularity == "token" else (n, heads, 2)


def granularity_of(scales: torch.Tensor) -> Granularity:
    if scales.dim() == 4:
        return "token"
    if scales.dim() == 3:
        return "head"
    raise ValueError(f"scales must be 3-D (per head) or 4-D (per token), got {scales.dim()}-D")


def as_index(
    ids: torch.Tensor | Sequence[int],
    device: torch.device,
    limit: int | None = None,
    what: str = "ids",
) -> torch.Tensor:
    """Ids as an int64 tensor on `device`, checked to lie in [0, limit).

    An out-of-range id in a Triton kernel would be a wild write, so ids are always
    checked: in Python for a list, on the host for a CPU tensor, with one host sync for
    a CUDA tensor. Host ids go up without a sync (a pageable upload is staged by the
    driver before it returns), so callers that move many layers with the same ids
    pass them as CPU tensors: checked and uploaded per call, never waited for.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 1:
            raise ValueError(
                f"{what} must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}"
            )
        if limit is not None and ids.numel():
            low, high = (int(v) for v in torch.aminmax(ids))
            if low < 0 or high >= limit:
                raise IndexError(f"{what} out of range [0, {limit}): {ids.tolist()}")
        return ids.to(device=device, dtype=torch.int64, non_blocking=True)
    values = [int(i) for i in ids]
    if limit is not None and any(i < 0 or i >= limit for i in values):
        raise IndexError(f"{what} out of range [0, {limit}): {values}")
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


def check_cache(kv: torch.Tensor, name: str) -> tuple[int, int, int, int]:
    if kv.dim() != 4:
        raise ValueError(f"{name} must be [blocks, heads, tokens, K|V content], got {kv.dim()}-D")
    if kv.dtype not in SOURCE_DTYPES:
        raise ValueError(f"{name} must be bfloat16 or float16, got {kv.dtype}")
    blocks, heads, tokens, content = kv.shape
    if content % 2:
        raise ValueError(f"{name} content dim {content} is not K|V (must be even)")
    return blocks, heads, tokens, content


def resolve_outputs(
    n: int,
    block_shape: tuple[int, int, int],
    fmt: str,
    granularity: str,
    device: torch.device,
    out: torch.Tensor | None,
    out_scales: torch.Tensor | None,
    out_rows: torch.Tensor | Sequence[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Allocate or validate the destination buffers and the rows written in them."""
    heads, tokens, content = block_shape
    if (out is None) != (out_scales is None):
        raise ValueError("pass both out and out_scales, or neither")
    if out is None or out_scales is None:
        if out_rows is not None:
            raise ValueError("out_rows needs caller-provided out / out_scales")
        q = torch.empty((n, *block_shape), dtype=quant_dtype(fmt), device=device)
        scales = torch.empty(scales_shape(n, heads, tokens, granularity), device=device)
        return q, scales, torch.arange(n, dtype=torch.int64, device=device)
    if out.dtype != quant_dtype(fmt):
        raise ValueError(f"out must be {quant_dtype(fmt)} for {fmt}, got {out.dtype}")
    if out.dim() != 4 or tuple(out.shape[1:]) != block_shape:
        raise ValueError(f"out must be [M, {heads}, {tokens}, {content}], got {tuple(out.shape)}")
    want = scales_shape(out.shape[0], heads, tokens, granularity)
    if out_scales.dtype != torch.float32 or tuple(out_scales.shape) != want:
        raise ValueError(f"out_scales must be float32 {want}, got {out_scales.dtype} "
                         f"{tuple(out_scales.shape)}")
    if out.device != device or out_scales.device != device:
        raise ValueError(f"outputs must be on {device}, got {out.device} / {out_scales.device}")
    if out_rows is None:
        if out.shape[0] != n:
            raise ValueError(f"out has {out.shape[0]} rows for {n} blocks; pass out_rows")
        rows = torch.arange(n, dtype=torch.int64, device=device)
    else:
        rows = as_index(out_rows, device, out.shape[0], "out_rows")
        if rows.numel() != n:
            raise ValueError(f"out_rows has {rows.numel()} entries for {n} blocks")
    return out, out_scales, rows


def check_dequant_args(
    q: torch.Tensor,
    scales: torch.Tensor,
    dst_kv: torch.Tensor,
    block_ids: torch.Tensor | Sequence[int],
    src_rows: torch.Tensor | Sequence[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate dequantize_scatter arguments; returns (block_ids, src_rows) as int64."""
    format_of(q)
    blocks, heads, tokens, content = check_cache(dst_kv, "dst_kv")
    if q.dim() != 4 or tuple(q.shape[1:]) != (heads, tokens, content):
        raise ValueError(f"q must be [M, {heads}, {tokens}, {content}], got {tuple(q.shape)}")
    gran = granularity_of(scales)
    want = scales_shape(q.shape[0], heads, tokens, gran)
    if scales.dtype != torch.float32 or tuple(scales.shape) != want:
        raise ValueError(f"scales must be float32 {want}, got {scales.dtype} {tuple(scales.shape)}")
    device = dst_kv.device
    if q.device != device or scales.device != device:
        raise ValueError(f"q and scales must be on {device}, got {q.device} / {scales.device}")
    ids = as_index(block_ids, device, blocks, "block_ids")
    if src_rows is None:
        if q.shape[0] != ids.numel():
            raise ValueError(f"q has {q.shape[0]} rows for {ids.numel()} blocks; pass src_rows")
        rows = torch.arange(ids.numel(), dtype=torch.int64, device=device)
    else:
        rows = as_index(src_rows, device, q.shape[0], "src_rows")
        if rows.numel() != ids.numel():
            raise ValueError(f"src_rows has {rows.numel()} entries for {ids.numel()} blocks")
    return ids, rows

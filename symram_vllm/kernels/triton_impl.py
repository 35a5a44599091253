"""Triton kernels for gather+quantize and dequantize+scatter (the CUDA path).

Output bytes must equal the torch reference's (``reference.py``) on every backend,
including the Triton interpreter the tests run on CPU. Three things make that hold:

* every conversion that rounds is written with integer bit operations (bf16 <-> fp32,
  fp32 <-> fp8 e4m3fn). The interpreter's own float casts truncate or round ties away
  from zero, and the hardware fp8 convert does not exist before sm89;
* divisions use ``tl.math.div_rn`` (IEEE), not ``/``, which is approximate on NVIDIA;
* kernels launch with ``enable_fp_fusion=False`` so ``x * inv`` is rounded before the
  round-half-even add, exactly as torch does it.

Importing this module imports triton; ``dispatch.py`` only does so for CUDA tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from symram_vllm.kernels.spec import (
    QMAX,
    SCALE_FLOOR,
    as_index,
    check_cache,
    check_dequant_args,
    check_format,
    check_granularity,
    format_of,
    granularity_of,
    resolve_outputs,
)

# Elements per tile: small enough to stay in registers on a GPU (4 warps); the scale
# group math is order-independent, so the tile size never changes output bytes.
TILE_ELEMS = 4096


@triton.jit
def _round_half_even(y):
    # Adding 1.5 * 2^23 leaves no fraction bits, so the fp32 add itself rounds to
    # nearest-even. Exact for |y| < 2^22; callers pass |y| <= 448.
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _bf16_bits_to_f32(bits):
    return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16_bits(v):
    # Round to nearest even on the bit pattern, as c10::BFloat16 does; NaN -> 0x7FC0.
    b = v.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where(v != v, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _f32_to_e4m3_bits(y):
    """fp32 (finite, |y| <= 448) -> float8_e4m3fn code, round to nearest even."""
    b = y.to(tl.int32, bitcast=True)
    sign = (b >> 31) & 1
    a_bits = b & 0x7FFFFFFF
    a = a_bits.to(tl.float32, bitcast=True)
    # Below 2^-6 the code is the subnormal count of 2^-9 steps (8 becomes 2^-6, the
    # smallest normal, which is also code 8).
    sub = _round_half_even(a * 512.0).to(tl.int32)
    # Normal: keep 3 mantissa bits with a round-to-nearest-even bias, rebias 127 -> 7.
    norm = ((a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) >> 20) - 960
    code = tl.where(a_bits < 0x3C800000, sub, norm)
    return code | (sign << 7)


@triton.jit
def _e4m3_bits_to_f32(c):
    e = (c >> 3) & 15
    m = c & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    mag = tl.where((c & 0x7F) == 0x7F, float("nan"), mag)
    return tl.where((c & 0x80) != 0, -mag, mag)


@triton.jit
def _load_tile(src, offs_n, offs_d, s_n, s_c, TOKENS: tl.constexpr, HALF: tl.constexpr,
               SRC_BF16: tl.constexpr):
    mask = (offs_n[:, None] < TOKENS) & (offs_d[None, :] < HALF)
    ptrs = src + offs_n[:, None] * s_n + offs_d[None, :] * s_c
    if SRC_BF16:
        x = _bf16_bits_to_f32(tl.load(ptrs, mask=mask, other=0))
    else:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    finite = tl.abs(x) < float("inf")
    return tl.where(finite, x, 0.0), finite, mask


@triton.jit
def _encode(x, inv, bad, QMAXV: tl.constexpr, IS_FP8: tl.constexpr):
    y = tl.minimum(tl.maximum(x * inv, -QMAXV), QMAXV)
    if IS_FP8:
        codes = tl.where(bad, 0, _f32_to_e4m3_bits(y)).to(tl.uint8)
    else:
        codes = tl.where(bad, 0.0, _round_half_even(y)).to(tl.int8)
    return codes


@triton.jit
def _gather_quantize_kernel(
    kv_ptr, ids_ptr, q_ptr, s_ptr, rows_ptr,
    kv_sb, kv_sh, kv_sn, kv_sc,
    q_sb, q_sh, q_sn, q_sc,
    s_sb, s_sh, s_sn, s_sk,
    heads,
    TOKENS: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    QMAXV: tl.constexpr, FLOOR: tl.constexpr,
    SRC_BF16: tl.constexpr, IS_FP8: tl.constexpr, PER_TOKEN: tl.constexpr,
):
    # One program per (block, head, K|V half).
    pid = tl.program_id(0)
    kv_half = pid % 2
    head = (pid // 2) % heads
    i = pid // 2 // heads
    block = tl.load(ids_ptr + i)
    row = tl.load(rows_ptr + i)
    src = kv_ptr + block * kv_sb + head * kv_sh + kv_half * HALF * kv_sc
    dst = q_ptr + row * q_sb + head * q_sh + kv_half * HALF * q_sc
    sdst = s_ptr + row * s_sb + head * s_sh + kv_half * s_sk
    offs_d = tl.arange(0, BLOCK_D)
    if PER_TOKEN:
        for n0 in range(0, TOKENS, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            x, finite, mask = _load_tile(src, offs_n, offs_d, kv_sn, kv_sc, TOKENS, HALF,
                                         SRC_BF16)
            bad = tl.max((~finite).to(tl.int32), axis=1) > 0
            a = tl.maximum(tl.max(tl.abs(x), axis=1), FLOOR)
            qm = tl.full(a.shape, QMAXV, tl.float32)
            scale = tl.math.div_rn(a, qm)
            inv = tl.math.div_rn(qm, a)
            codes = _encode(x, inv[:, None], bad[:, None], QMAXV, IS_FP8)
            tl.store(dst + offs_n[:, None] * q_sn + offs_d[None, :] * q_sc, codes, mask=mask)
            tl.store(sdst + offs_n * s_sn, tl.where(bad, float("nan"), scale),
                     mask=offs_n < TOKENS)
    else:
        # Two passes over the (block, head) half: amax, then encode.
        amax_rows = tl.zeros((BLOCK_N,), tl.float32)
        bad_rows = tl.zeros((BLOCK_N,), tl.int32)
        for n0 in range(0, TOKENS, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            x, finite, mask = _load_tile(src, offs_n, offs_d, kv_sn, kv_sc, TOKENS, HALF,
                                         SRC_BF16)
            amax_rows = tl.maximum(amax_rows, tl.max(tl.abs(x), axis=1))
            bad_rows = tl.maximum(bad_rows, tl.max((~finite).to(tl.int32), axis=1))
        bad = tl.max(bad_rows, axis=0) > 0
        a = tl.maximum(tl.max(amax_rows, axis=0), FLOOR)
        qm = tl.full(a.shape, QMAXV, tl.float32)
        scale = tl.math.div_rn(a, qm)
        inv = tl.math.div_rn(qm, a)
        for n0 in range(0, TOKENS, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            x, finite, mask = _load_tile(src, offs_n, offs_d, kv_sn, kv_sc, TOKENS, HALF,
                                         SRC_BF16)
            codes = _encode(x, inv, bad, QMAXV, IS_FP8)
            tl.store(dst + offs_n[:, None] * q_sn + offs_d[None, :] * q_sc, codes, mask=mask)
        tl.store(sdst, tl.where(bad, float("nan"), scale))


@triton.jit
def _dequantize_scatter_kernel(
    q_ptr, s_ptr, rows_ptr, dst_ptr, ids_ptr,
    q_sb, q_sh, q_sn, q_sc,
    s_sb, s_sh, s_sn, s_sk,
    d_sb, d_sh, d_sn, d_sc,
    heads,
    TOKENS: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DST_BF16: tl.constexpr, IS_FP8: tl.constexpr, PER_TOKEN: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_half = pid % 2
    head = (pid // 2) % heads
    i = pid // 2 // heads
    row = tl.load(rows_ptr + i)
    block = tl.load(ids_ptr + i)
    src = q_ptr + row * q_sb + head * q_sh + kv_half * HALF * q_sc
    dst = dst_ptr + block * d_sb + head * d_sh + kv_half * HALF * d_sc
    sptr = s_ptr + row * s_sb + head * s_sh + kv_half * s_sk
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(0, TOKENS, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n[:, None] < TOKENS) & (offs_d[None, :] < HALF)
        codes = tl.load(src + offs_n[:, None] * q_sn + offs_d[None, :] * q_sc, mask=mask, other=0)
        # constexpr if-blocks, not ternaries: Triton traces only the taken branch.
        if IS_FP8:  # noqa: SIM108
            v = _e4m3_bits_to_f32(codes.to(tl.int32))
        else:
            v = codes.to(tl.float32)
        if PER_TOKEN:
            s = tl.load(sptr + offs_n * s_sn, mask=offs_n < TOKENS, other=0.0)
            v = v * s[:, None]
        else:
            v = v * tl.load(sptr)
        if DST_BF16:  # noqa: SIM108
            out = _f32_to_bf16_bits(v)
        else:
            out = v.to(tl.float16)
        tl.store(dst + offs_n[:, None] * d_sn + offs_d[None, :] * d_sc, out, mask=mask)


def _tile(tokens: int, half: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(half)
    block_n = min(triton.next_power_of_2(tokens), max(1, TILE_ELEMS // block_d))
    return block_n, block_d


def _scale_strides(scales: torch.Tensor) -> tuple[int, int, int, int]:
    if scales.dim() == 4:
        return scales.stride(0), scales.stride(1), scales.stride(2), scales.stride(3)
    return scales.stride(0), scales.stride(1), 0, scales.stride(2)


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """Same memory, integer dtype: the kernels do their own float conversions."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    return t


def gather_quantize(
    kv: torch.Tensor,
    block_ids: torch.Tensor | Sequence[int],
    fmt: str = "int8",
    granularity: str = "token",
    *,
    out: torch.Tensor | None = None,
    out_scales: torch.Tensor | None = None,
    out_rows: torch.Tensor | Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_format(fmt)
    check_granularity(granularity)
    blocks, heads, tokens, content = check_cache(kv, "kv")
    ids = as_index(block_ids, kv.device, blocks, "block_ids")
    q, scales, rows = resolve_outputs(
        ids.numel(), (heads, tokens, content), fmt, granularity, kv.device,
        out, out_scales, out_rows,
    )
    if ids.numel() == 0:
        return q, scales
    half = content // 2
    block_n, block_d = _tile(tokens, half)
    _gather_quantize_kernel[(ids.numel() * heads * 2,)](
        _bits_view(kv), ids, _bits_view(q), scales, rows,
        *kv.stride(), *q.stride(), *_scale_strides(scales),
        heads,
        TOKENS=tokens, HALF=half, BLOCK_N=block_n, BLOCK_D=block_d,
        QMAXV=QMAX[fmt], FLOOR=SCALE_FLOOR,
        SRC_BF16=kv.dtype == torch.bfloat16, IS_FP8=fmt == "fp8",
        PER_TOKEN=granularity == "token",
        enable_fp_fusion=False,
    )
    return q, scales


def dequantize_scatter(
    q: torch.Tensor,
    scales: torch.Tensor,
    dst_kv: torch.Tensor,
    block_ids: torch.Tensor | Sequence[int],
    *,
    src_rows: torch.Tensor | Sequence[int] | None = None,
) -> None:
    ids, rows = check_dequant_args(q, scales, dst_kv, block_ids, src_rows)
    if ids.numel() == 0:
        return
    _, heads, tokens, content = dst_kv.shape
    half = content // 2
    block_n, block_d = _tile(tokens, half)
    _dequantize_scatter_kernel[(ids.numel() * heads * 2,)](
        _bits_view(q), scales, rows, _bits_view(dst_kv), ids,
        *q.stride(), *_scale_strides(scales), *dst_kv.stride(),
        heads,
        TOKENS=tokens, HALF=half, BLOCK_N=block_n, BLOCK_D=block_d,
        DST_BF16=dst_kv.dtype == torch.bfloat16, IS_FP8=format_of(q) == "fp8",
        PER_TOKEN=granularity_of(scales) == "token",
        enable_fp_fusion=False,
    )

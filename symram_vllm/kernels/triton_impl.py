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

import torch
import triton
import triton.language as tl

from symram_vllm.kernels.base import Batch, QuantKernels
from symram_vllm.kernels.spec import QMAX, SCALE_FLOOR

# Elements per tile: small enough to stay in registers on a GPU (4 warps).
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
def _group_bases(cache_ptr, c_sb, c_sh, c_sc, ids_ptr, q_ptr, q_sb, q_sh, q_sc,
                 s_ptr, s_sb, s_sh, s_sk, rows_ptr, heads, HALF: tl.constexpr):
    """One program per (batch entry i, head, K|V half): the start of that group in the
    cache (block ids[i]), in the codes and in the scales (row rows[i])."""
    pid = tl.program_id(0)
    i = pid // 2 // heads
    head = (pid // 2) % heads
    kv_half = pid % 2
    block = tl.load(ids_ptr + i)
    row = tl.load(rows_ptr + i)
    return (cache_ptr + block * c_sb + head * c_sh + kv_half * HALF * c_sc,
            q_ptr + row * q_sb + head * q_sh + kv_half * HALF * q_sc,
            s_ptr + row * s_sb + head * s_sh + kv_half * s_sk)


@triton.jit
def _tile(base, offs_n, offs_d, s_n, s_c, TOKENS: tl.constexpr, HALF: tl.constexpr):
    """Pointers and in-bounds mask of a [BLOCK_N, BLOCK_D] tile of one half-row group."""
    mask = (offs_n[:, None] < TOKENS) & (offs_d[None, :] < HALF)
    return base + offs_n[:, None] * s_n + offs_d[None, :] * s_c, mask


@triton.jit
def _load_tile(src, offs_n, offs_d, s_n, s_c, TOKENS: tl.constexpr, HALF: tl.constexpr,
               SRC_BF16: tl.constexpr):
    ptrs, mask = _tile(src, offs_n, offs_d, s_n, s_c, TOKENS, HALF)
    if SRC_BF16:
        x = _bf16_bits_to_f32(tl.load(ptrs, mask=mask, other=0))
    else:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    finite = tl.abs(x) < float("inf")
    return tl.where(finite, x, 0.0), finite


@triton.jit
def _scale_and_inverse(amax, QMAXV: tl.constexpr, FLOOR: tl.constexpr):
    a = tl.maximum(amax, FLOOR)
    qm = tl.full(a.shape, QMAXV, tl.float32)
    return tl.math.div_rn(a, qm), tl.math.div_rn(qm, a)


@triton.jit
def _store_codes(dst, offs_n, offs_d, s_n, s_c, x, inv, bad, TOKENS: tl.constexpr,
                 HALF: tl.constexpr, QMAXV: tl.constexpr, IS_FP8: tl.constexpr):
    y = tl.minimum(tl.maximum(x * inv, -QMAXV), QMAXV)
    if IS_FP8:
        codes = tl.where(bad, 0, _f32_to_e4m3_bits(y)).to(tl.uint8)
    else:
        codes = tl.where(bad, 0.0, _round_half_even(y)).to(tl.int8)
    ptrs, mask = _tile(dst, offs_n, offs_d, s_n, s_c, TOKENS, HALF)
    tl.store(ptrs, codes, mask=mask)


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
    src, dst, sdst = _group_bases(kv_ptr, kv_sb, kv_sh, kv_sc, ids_ptr, q_ptr, q_sb, q_sh, q_sc,
                                  s_ptr, s_sb, s_sh, s_sk, rows_ptr, heads, HALF)
    offs_d = tl.arange(0, BLOCK_D)
    if PER_TOKEN:
        for n0 in range(0, TOKENS, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            x, finite = _load_tile(src, offs_n, offs_d, kv_sn, kv_sc, TOKENS, HALF, SRC_BF16)
            bad = tl.max((~finite).to(tl.int32), axis=1) > 0
            scale, inv = _scale_and_inverse(tl.max(tl.abs(x), axis=1), QMAXV, FLOOR)
            _store_codes(dst, offs_n, offs_d, q_sn, q_sc, x, inv[:, None], bad[:, None],
                         TOKENS, HALF, QMAXV, IS_FP8)
            tl.store(sdst + offs_n * s_sn, tl.where(bad, float("nan"), scale),
                     mask=offs_n < TOKENS)
    else:
        # Two passes over the (block, head) half: amax, then encode.
        amax_rows = tl.zeros((BLOCK_N,), tl.float32)
        bad_rows = tl.zeros((BLOCK_N,), tl.int32)
        for n0 in range(0, TOKENS, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            x, finite = _load_tile(src, offs_n, offs_d, kv_sn, kv_sc, TOKENS, HALF, SRC_BF16)
            amax_rows = tl.maximum(amax_rows, tl.max(tl.abs(x), axis=1))
            bad_rows = tl.maximum(bad_rows, tl.max((~finite).to(tl.int32), axis=1))
        bad = tl.max(bad_rows, axis=0) > 0
        scale, inv = _scale_and_inverse(tl.max(amax_rows, axis=0), QMAXV, FLOOR)
        for n0 in range(0, TOKENS, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            x, _ = _load_tile(src, offs_n, offs_d, kv_sn, kv_sc, TOKENS, HALF, SRC_BF16)
            _store_codes(dst, offs_n, offs_d, q_sn, q_sc, x, inv, bad, TOKENS, HALF, QMAXV,
                         IS_FP8)
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
    dst, src, sptr = _group_bases(dst_ptr, d_sb, d_sh, d_sc, ids_ptr, q_ptr, q_sb, q_sh, q_sc,
                                  s_ptr, s_sb, s_sh, s_sk, rows_ptr, heads, HALF)
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(0, TOKENS, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        src_ptrs, mask = _tile(src, offs_n, offs_d, q_sn, q_sc, TOKENS, HALF)
        codes = tl.load(src_ptrs, mask=mask, other=0)
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
        dst_ptrs, _ = _tile(dst, offs_n, offs_d, d_sn, d_sc, TOKENS, HALF)
        tl.store(dst_ptrs, out, mask=mask)


def _launch_shape(batch: Batch) -> tuple[tuple[int], dict[str, int]]:
    """Grid and tile constexprs. The scale math is order-independent, so the tile size
    never changes output bytes."""
    _, heads, tokens, content = batch.cache.shape
    half = content // 2
    block_d = triton.next_power_of_2(half)
    block_n = min(triton.next_power_of_2(tokens), max(1, TILE_ELEMS // block_d))
    grid = (len(batch) * heads * 2,)
    return grid, {"TOKENS": tokens, "HALF": half, "BLOCK_N": block_n, "BLOCK_D": block_d}


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


class TritonKernels(QuantKernels):
    name = "triton"

    def quantize_batch(self, batch: Batch) -> None:
        grid, tile = _launch_shape(batch)
        kv, q, scales = batch.cache, batch.q, batch.scales
        _gather_quantize_kernel[grid](
            _bits_view(kv), batch.ids, _bits_view(q), scales, batch.rows,
            *kv.stride(), *q.stride(), *_scale_strides(scales),
            kv.shape[1], **tile,
            QMAXV=QMAX[batch.fmt], FLOOR=SCALE_FLOOR,
            SRC_BF16=kv.dtype == torch.bfloat16, IS_FP8=batch.fmt == "fp8",
            PER_TOKEN=batch.granularity == "token",
            enable_fp_fusion=False,
        )

    def dequantize_batch(self, batch: Batch) -> None:
        grid, tile = _launch_shape(batch)
        dst, q, scales = batch.cache, batch.q, batch.scales
        _dequantize_scatter_kernel[grid](
            _bits_view(q), scales, batch.rows, _bits_view(dst), batch.ids,
            *q.stride(), *_scale_strides(scales), *dst.stride(),
            dst.shape[1], **tile,
            DST_BF16=dst.dtype == torch.bfloat16, IS_FP8=batch.fmt == "fp8",
            PER_TOKEN=batch.granularity == "token",
            enable_fp_fusion=False,
        )


KERNELS = TritonKernels()
gather_quantize = KERNELS.gather_quantize
dequantize_scatter = KERNELS.dequantize_scatter

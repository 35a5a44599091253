"""Codec "fp8": float8_e4m3fn (max 448), one float32 scale per token row of K and of V.
Same size as int8; relative precision instead of absolute (3 mantissa bits)."""

from __future__ import annotations

from symram_vllm.codecs.quant import QuantCodec


class Fp8Codec(QuantCodec):
    name = "fp8"
    fmt = "fp8"
    granularity = "token"

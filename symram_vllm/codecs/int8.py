"""Codec "int8": symmetric int8 (|q| <= 127), one float32 scale per token row of K and
of V. Half the bytes of a bf16/fp16 page plus 4 / head_dim for the scales."""

from __future__ import annotations

from symram_vllm.codecs.quant import QuantCodec


class Int8Codec(QuantCodec):
    name = "int8"
    fmt = "int8"
    # Per token: int8's uniform grid cannot absorb the 10x spread of token norms that
    # a shared (block, head) scale would have to cover (docs/codecs.md has numbers).
    granularity = "token"

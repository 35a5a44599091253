"""Page codecs: none, int8, fp8 (fixed size) and zstd (lossless, variable size),
composable as "int8+zstd" / "fp8+zstd:9". Build one with ``get_codec(name, geometry)``."""

from symram_vllm.codecs.base import (
    ByteTransform,
    Codec,
    CorruptPageError,
    EncodedPage,
    FixedSizeCodec,
    PageGeometry,
    PageMeta,
)
from symram_vllm.codecs.chain import ChainCodec
from symram_vllm.codecs.fp8 import Fp8Codec
from symram_vllm.codecs.int8 import Int8Codec
from symram_vllm.codecs.none import NoneCodec
from symram_vllm.codecs.policy import CodecPolicy
from symram_vllm.codecs.quant import QuantCodec
from symram_vllm.codecs.registry import (
    CodecSpec,
    available_codecs,
    get_codec,
    parse_codec,
    register_byte_stage,
    register_page_format,
)
from symram_vllm.codecs.zstd import ZstdCodec

__all__ = [
    "ByteTransform",
    "ChainCodec",
    "Codec",
    "CodecPolicy",
    "CodecSpec",
    "CorruptPageError",
    "EncodedPage",
    "FixedSizeCodec",
    "Fp8Codec",
    "Int8Codec",
    "NoneCodec",
    "PageGeometry",
    "PageMeta",
    "QuantCodec",
    "ZstdCodec",
    "available_codecs",
    "get_codec",
    "parse_codec",
    "register_byte_stage",
    "register_page_format",
]

"""Quantization kernels: gather+quantize and dequantize+scatter of KV blocks.

``dispatch`` picks the implementation per device; ``reference`` (torch) and
``triton_impl`` (Triton) share one signature and produce the same bytes.
"""

from symram_vllm.kernels.dispatch import (
    dequantize_scatter,
    gather_quantize,
    kernel_backend,
    triton_capability,
)
from symram_vllm.kernels.spec import (
    GRANULARITIES,
    QMAX,
    QUANT_FORMATS,
    SCALE_FLOOR,
    Granularity,
    QuantFormat,
    quant_dtype,
    scales_shape,
)

__all__ = [
    "GRANULARITIES",
    "QMAX",
    "QUANT_FORMATS",
    "SCALE_FLOOR",
    "Granularity",
    "QuantFormat",
    "dequantize_scatter",
    "gather_quantize",
    "kernel_backend",
    "quant_dtype",
    "scales_shape",
    "triton_capability",
]

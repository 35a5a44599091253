"""Picks the kernel implementation for a device: the one place that decides.

CUDA tensors with an importable triton run the Triton kernels; everything else (CPU
serving, CUDA without triton) runs the torch reference. Both produce the same bytes,
so the choice changes speed, never the pages.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Sequence
from types import ModuleType

import torch

from symram_vllm.capability import Capability, cuda_capability
from symram_vllm.kernels import reference

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def triton_capability() -> Capability:
    cuda = cuda_capability()
    if not cuda.available:
        return Capability(False, f"no CUDA: {cuda.reason}")
    if importlib.util.find_spec("triton") is None:
        return Capability(False, "triton is not installed")
    try:
        from symram_vllm.kernels import triton_impl  # noqa: F401
    except Exception as exc:  # broken triton install, unsupported driver...
        return Capability(False, f"triton kernels failed to import: {exc}")
    return Capability(True, "triton importable with CUDA present")


def kernel_backend(device: torch.device) -> str:
    """"triton" or "torch": which implementation serves tensors on `device`."""
    if device.type == "cuda" and triton_capability().available:
        return "triton"
    return "torch"


def _impl(device: torch.device) -> ModuleType:
    if kernel_backend(device) == "triton":
        from symram_vllm.kernels import triton_impl

        return triton_impl
    return reference


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
    """Quantize blocks `block_ids` of a [B, H, N, C] cache (any strides) to 8 bits.

    Returns ``(q, scales)``: q is [n, H, N, C] int8 / float8_e4m3fn and scales float32
    [n, H, N, 2] ("token": per block, head, token and K|V half) or [n, H, 2] ("head").
    With ``out`` / ``out_scales`` (any strides, e.g. typed views of a DRAM-tier arena),
    block ``block_ids[i]`` is written to row ``out_rows[i]`` and those buffers are
    returned, so no intermediate copy of the page is made on the Triton path.
    """
    return _impl(kv.device).gather_quantize(
        kv, block_ids, fmt, granularity, out=out, out_scales=out_scales, out_rows=out_rows
    )


def dequantize_scatter(
    q: torch.Tensor,
    scales: torch.Tensor,
    dst_kv: torch.Tensor,
    block_ids: torch.Tensor | Sequence[int],
    *,
    src_rows: torch.Tensor | Sequence[int] | None = None,
) -> None:
    """Inverse of gather_quantize: row ``src_rows[i]`` of (q, scales) is decoded into
    block ``block_ids[i]`` of `dst_kv`. Format and granularity follow q's dtype and
    scales' rank. Destination block ids must be distinct."""
    _impl(dst_kv.device).dequantize_scatter(q, scales, dst_kv, block_ids, src_rows=src_rows)

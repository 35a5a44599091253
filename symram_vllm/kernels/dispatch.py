"""Picks the kernel implementation for a device: the one place that decides.

CUDA tensors with an importable triton run the Triton kernels; everything else (CPU
serving, CUDA without triton) runs the torch reference. Both produce the same bytes,
so the choice changes speed, never the pages.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

from symram_vllm.capability import Capability, cuda_capability
from symram_vllm.kernels import reference
from symram_vllm.kernels.base import Batch, QuantKernels

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


def _impl(device: torch.device) -> QuantKernels:
    if kernel_backend(device) == "triton":
        from symram_vllm.kernels import triton_impl

        return triton_impl.KERNELS
    return reference.KERNELS


class DispatchKernels(QuantKernels):
    """Checks arguments once, then runs the implementation that serves the device."""

    name = "dispatch"

    def quantize_batch(self, batch: Batch) -> None:
        _impl(batch.cache.device).quantize_batch(batch)

    def dequantize_batch(self, batch: Batch) -> None:
        _impl(batch.cache.device).dequantize_batch(batch)


KERNELS = DispatchKernels()
gather_quantize = KERNELS.gather_quantize
dequantize_scatter = KERNELS.dequantize_scatter

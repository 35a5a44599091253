"""Capability probes for the few CUDA-only paths (pinned memory, streams, kvikio).

Each probe returns a decision plus the reason, so the fallback taken on a CPU host
is visible in logs and testable.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capability:
    available: bool
    reason: str


@functools.lru_cache(maxsize=1)
def cuda_capability() -> Capability:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return Capability(False, "torch is not installed")
    if not torch.cuda.is_available():
        return Capability(False, "torch.cuda.is_available() is False (CPU build or no GPU)")
    return Capability(True, f"CUDA device {torch.cuda.get_device_name(0)}")


def pinned_memory_supported() -> bool:
    """Page-locked host memory only helps (and only works) with a CUDA device."""
    return cuda_capability().available


@functools.lru_cache(maxsize=1)
def kvikio_capability() -> Capability:
    """GPUDirect Storage through kvikio needs CUDA, the kvikio package and libcuda."""
    cuda = cuda_capability()
    if not cuda.available:
        return Capability(False, f"no CUDA: {cuda.reason}")
    if importlib.util.find_spec("kvikio") is None:
        return Capability(False, "kvikio is not installed (pip install 'symram-vllm[gpu]')")
    try:
        import kvikio  # noqa: F401
    except Exception as exc:  # libcuda missing, driver mismatch...
        return Capability(False, f"kvikio failed to import: {exc}")
    return Capability(True, "kvikio importable with CUDA present")


def describe() -> dict[str, str]:
    return {
        "cuda": cuda_capability().reason,
        "pinned_memory": str(pinned_memory_supported()),
        "kvikio": kvikio_capability().reason,
    }

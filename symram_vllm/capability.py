"""Capability probes for the few CUDA-only paths (pinned memory, streams, kvikio).

Each probe returns a decision plus the reason, so the fallback taken on a CPU host
is visible in logs and testable.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class GpuInfo:
    """What NVML says about one GPU: where its pinned host memory should live."""

    index: int
    name: str
    pci_bus_id: str
    pcie_generation: int | None
    pcie_width: int | None
    numa_node: int | None
    uuid: str = ""  # NVML's "GPU-xxxxxxxx-...", what ties it to a torch device


def _sysfs_numa_node(pci_bus_id: str, sysfs: Path = Path("/sys/bus/pci/devices")) -> int | None:
    """The NUMA node Linux reports for a PCI device; None when unknown (-1) or absent."""
    # NVML gives "00000000:17:00.0"; sysfs names devices "0000:17:00.0".
    domain, _, rest = pci_bus_id.lower().partition(":")
    name = f"{domain[-4:]}:{rest}" if rest else pci_bus_id.lower()
    try:
        node = int((sysfs / name / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


@functools.lru_cache(maxsize=1)
def gpu_inventory() -> tuple[tuple[GpuInfo, ...], str]:
    """Every GPU NVML sees, and the reason when it sees none (no nvidia-ml-py, no
    driver). NVML answers without creating a CUDA context."""
    try:
        import pynvml
    except ImportError:
        return (), "nvidia-ml-py is not installed (pip install 'symram-vllm[gpu]')"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no device
        return (), f"NVML unavailable: {exc}"
    gpus = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            bus = pynvml.nvmlDeviceGetPciInfo(handle).busId
            bus = bus.decode() if isinstance(bus, bytes) else str(bus)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(GpuInfo(
                index=index,
                name=name.decode() if isinstance(name, bytes) else str(name),
                pci_bus_id=bus,
                pcie_generation=_nvml_or_none(pynvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
                pcie_width=_nvml_or_none(pynvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
                numa_node=_sysfs_numa_node(bus),
                uuid=_nvml_text(pynvml.nvmlDeviceGetUUID, handle),
            ))
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return tuple(gpus), f"{len(gpus)} GPU(s) found by NVML"


def _nvml_text(query: Callable[[Any], Any], handle: Any) -> str:
    try:
        value = query(handle)
    except Exception:  # not supported on this device or driver
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _torch_uuid(device_index: int) -> str:
    """The UUID of torch's CUDA device `device_index`, "" when unknown."""
    try:
        import torch

        return str(torch.cuda.get_device_properties(device_index).uuid)
    except Exception:  # no CUDA, or a torch without the field
        return ""


def _uuid_hex(uuid: str) -> str:
    """The 32 hex digits of a UUID, however it is spelled ("GPU-" prefix, dashes)."""
    return "".join(c for c in uuid.lower().removeprefix("gpu-") if c in "0123456789abcdef")


def gpu_of(device_index: int, gpus: Sequence[GpuInfo]) -> GpuInfo | None:
    """NVML's record of torch's CUDA device `device_index`. NVML numbers every GPU of
    the host in PCI order, torch only the visible ones (CUDA_VISIBLE_DEVICES) in
    CUDA's order, so the two are matched by UUID; by index only when nothing is
    hidden and no UUID is known."""
    uuid = _uuid_hex(_torch_uuid(device_index))
    if uuid:
        return next((g for g in gpus if _uuid_hex(g.uuid) == uuid), None)
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return None
    return next((g for g in gpus if g.index == device_index), None)


def _nvml_or_none(query: Callable[[Any], int], handle: Any) -> int | None:
    try:
        return int(query(handle))
    except Exception:  # not supported on this device or driver
        return None


def node_cpus(node: int, sysfs: Path = Path("/sys/devices/system/node")) -> set[int]:
    """CPUs of NUMA node `node` from its cpulist ("0-15,32-47"); empty if unknown."""
    try:
        text = (sysfs / f"node{node}" / "cpulist").read_text().strip()
    except OSError:
        return set()
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def pinning_plan(numa_node: int | None, cpus: set[int], allowed: set[int]) -> tuple[set[int], str]:
    """Where to run the thread that allocates (and so first-touches) the pinned arena:
    the GPU's NUMA node's CPUs we may run on, or nowhere special (empty set), with why."""
    if numa_node is None:
        return set(), "GPU NUMA node unknown (no GPU, no NVML, or a single-node host)"
    usable = cpus & allowed
    if not usable:
        return set(), f"no allowed CPU on NUMA node {numa_node}; allocating where we run"
    return usable, f"arena allocated on NUMA node {numa_node} (CPUs {sorted(usable)[:4]}...)"


@contextlib.contextmanager
def on_numa_node_of(device_index: int | None) -> Iterator[str]:
    """Run the body on the CPUs of the NUMA node closest to GPU `device_index`, so
    pinned host memory allocated in it is local to that GPU's PCIe root (Linux places
    a page on the node of the CPU that first touches it). Yields the decision."""
    if device_index is None:
        yield "no NUMA placement: CPU device"
        return
    gpus, reason = gpu_inventory()
    info = gpu_of(device_index, gpus)
    if info is None:
        yield (f"no NUMA placement: CUDA device {device_index} not matched in NVML's "
               f"inventory ({reason})")
        return
    allowed = os.sched_getaffinity(0)
    target, why = pinning_plan(info.numa_node, node_cpus(info.numa_node or 0), allowed)
    if not target:
        yield why
        return
    os.sched_setaffinity(0, target)
    try:
        yield why
    finally:
        os.sched_setaffinity(0, allowed)


def describe() -> dict[str, object]:
    gpus, gpu_reason = gpu_inventory()
    return {
        "cuda": cuda_capability().reason,
        "pinned_memory": pinned_memory_supported(),
        "kvikio": kvikio_capability().reason,
        "gpus": [g.__dict__ for g in gpus] or gpu_reason,
    }

"""NUMA-aware pinning: the decisions, tested on a CPU host with a fake sysfs."""

from __future__ import annotations

import os

from symram_vllm import capability
from symram_vllm.tiers.dram import DramTier


def test_sysfs_numa_node_maps_nvml_bus_ids(tmp_path):
    dev = tmp_path / "0000:17:00.0"
    dev.mkdir()
    (dev / "numa_node").write_text("1\n")
    assert capability._sysfs_numa_node("00000000:17:00.0", tmp_path) == 1
    (dev / "numa_node").write_text("-1\n")  # firmware did not say
    assert capability._sysfs_numa_node("00000000:17:00.0", tmp_path) is None
    assert capability._sysfs_numa_node("00000000:99:00.0", tmp_path) is None


def test_node_cpus_parses_cpulists(tmp_path):
    node = tmp_path / "node1"
    node.mkdir()
    (node / "cpulist").write_text("16-19,48,50-51\n")
    assert capability.node_cpus(1, tmp_path) == {16, 17, 18, 19, 48, 50, 51}
    assert capability.node_cpus(7, tmp_path) == set()


def test_pinning_plan_decisions():
    cpus, why = capability.pinning_plan(None, set(), {0, 1})
    assert cpus == set() and "unknown" in why
    cpus, why = capability.pinning_plan(1, {16, 17}, {0, 1})
    assert cpus == set() and "no allowed CPU" in why
    cpus, why = capability.pinning_plan(1, {1, 16, 17}, {0, 1, 16})
    assert cpus == {1, 16} and "NUMA node 1" in why


def test_cpu_host_falls_back_without_touching_affinity():
    before = os.sched_getaffinity(0)
    with capability.on_numa_node_of(0) as why:
        assert os.sched_getaffinity(0) == before
    assert "no NUMA placement" in why
    tier = DramTier(4096, 4 * 4096)
    assert not tier.pinned and "not pinned" in tier.placement


def test_describe_reports_real_booleans_and_the_gpu_reason():
    report = capability.describe()
    assert isinstance(report["pinned_memory"], bool)
    assert report["gpus"]  # a list of GPUs, or the reason there is none


def test_torch_devices_are_matched_to_nvml_by_uuid(monkeypatch):
    # NVML numbers every GPU of the host; torch only the visible ones. With
    # CUDA_VISIBLE_DEVICES=4,5 torch's cuda:0 is NVML's GPU 4: matching by index would
    # place its pinned arena next to another GPU (maybe on another socket).
    gpus = tuple(capability.GpuInfo(i, "H200", f"00000000:{0x17 + i:02x}:00.0", 5, 16,
                                    i // 4, uuid=f"GPU-{i:08x}-aaaa") for i in range(8))
    monkeypatch.setattr(capability, "_torch_uuid", lambda index: f"{4 + index:08X}-AAAA")
    assert capability.gpu_of(0, gpus).index == 4  # type: ignore[union-attr]
    assert capability.gpu_of(1, gpus).numa_node == 1  # type: ignore[union-attr]
    monkeypatch.setattr(capability, "_torch_uuid", lambda index: "")  # no UUID known
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert capability.gpu_of(0, gpus) is None  # an index would be a guess
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert capability.gpu_of(0, gpus).index == 0  # type: ignore[union-attr]
    monkeypatch.setattr(capability, "gpu_inventory", lambda: (gpus, "8 GPU(s)"))
    monkeypatch.setattr(capability, "_torch_uuid", lambda index: "ffffffff-0000")
    with capability.on_numa_node_of(0) as why:
        assert "not matched" in why

"""The GPU proof kit's checks (``pytest -m gpu``, run by scripts/gpu_check.sh).

No vLLM: synthetic paged caches in vLLM's per-layer ``[B, H, N, C]`` views (LBHNC and
BLHNC over one allocation) drive symram's own mover, DRAM tier and kernels. On a CUDA
host every check runs on the GPU (pinned arena, side-stream copies, the Triton
descriptor kernel, the Triton int8/fp8 kernels, kvikio/GDS). On a CPU host
(``gpu_check.sh --dry-run``, CI) the same checks run on CPU, and the CUDA-only ones
assert the fallback decision instead, so the kit itself is tested here.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from symram_vllm import capability
from symram_vllm.connectors.page_mover import PageMover
from symram_vllm.kernels import block_copy
from symram_vllm.keys import BlockKey
from symram_vllm.layout import KVLayout
from symram_vllm.store import TieredStore

pytestmark = pytest.mark.gpu
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
L, H, N, C = 6, 2, 16, 128


def caches(layout: str, blocks: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if layout == "LBHNC":
        raw = torch.randn(L, blocks, H, N, C, generator=gen).to(torch.bfloat16).to(DEVICE)
        views = [raw[i] for i in range(L)]
    else:
        raw = torch.randn(blocks, L, H, N, C, generator=gen).to(torch.bfloat16).to(DEVICE)
        views = [raw[:, i] for i in range(L)]
    return {f"layer{i}": v for i, v in enumerate(views)}


def keys(n: int, tag: str = "") -> list[BlockKey]:
    return [BlockKey(hashlib.blake2b(f"{tag}{i}".encode(), digest_size=32).digest())
            for i in range(n)]


def test_pinned_arena_decision():
    store = TieredStore(4096, 8 * 4096)
    assert store.dram.pinned == CUDA
    assert store.dram.arena.is_pinned() == CUDA
    if not CUDA:
        assert "not pinned" in store.dram.placement
    store.close()


def test_pinned_arena_is_placed_next_to_its_gpu():
    # The worker passes its device index: the arena is first-touched on the GPU's NUMA
    # node, found by matching torch's device to NVML's by UUID.
    store = TieredStore(4096, 8 * 4096, device_index=0 if CUDA else None)
    placement = store.dram.placement
    print(f"pinned arena placement: {placement}")
    gpus, _ = capability.gpu_inventory()
    if CUDA and gpus:
        assert capability.gpu_of(0, gpus) is not None, "cuda:0 not found in NVML by UUID"
        assert "not matched" not in placement
    store.close()


@pytest.mark.parametrize("forced", ["auto", "triton", "staged"])
@pytest.mark.parametrize("layout", ["LBHNC", "BLHNC"])
def test_batched_kernel_matches_torch_reference(layout, forced, monkeypatch):
    # Every backend that serves a CUDA cache, forced in turn (the Triton UVA kernel
    # both ways, the staged DMA both ways), against the torch path on the host.
    monkeypatch.setenv(block_copy.BACKEND_ENV, forced)
    kv = KVLayout(caches(layout))
    pinned = CUDA
    pages = torch.zeros(64, kv.page_bytes, dtype=torch.uint8, pin_memory=pinned)
    ref = torch.zeros_like(pages)
    ids, rows = [17, 3, 9, 0, 23, 3], [31, 2, 17, 9, 38, 5]  # unsorted, repeated, scattered
    backend = block_copy.pick_backend(kv.segments, pages, to_pages=True, blocks=len(ids))
    triton_ok = block_copy.triton_capability().available
    if not CUDA:
        assert backend == "torch"
    elif forced == "auto":  # saves go to the copy engine
        assert backend == "staged"
    else:
        assert backend == (forced if forced == "staged" or triton_ok else "staged")
    print(f"{layout} {forced}: save via {backend}, load via "
          f"{block_copy.pick_backend(kv.segments, pages, blocks=4)}")
    kv.save_blocks(ids, pages, rows)
    if CUDA:
        torch.cuda.synchronize()
    host = KVLayout({k: v.cpu() for k, v in caches(layout).items()})
    block_copy.torch_save(host.segments, torch.tensor(ids), ref, torch.tensor(rows))
    assert torch.equal(pages, ref)
    target = caches(layout, seed=1)
    dst = KVLayout(target)
    dst.load_blocks(pages, [31, 2, 17, 9], [5, 6, 7, 8])
    if CUDA:
        torch.cuda.synchronize()
    for s, d in zip([17, 3, 9, 0], [5, 6, 7, 8], strict=True):
        for a, b in zip(dst.block_views(d), host.block_views(s), strict=True):
            assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("codec", ["none", "int8", "fp8"])
def test_side_stream_job_round_trip_through_the_dram_tier(codec):
    from symram_vllm.connectors.transfer import TransferRunner

    kv = KVLayout(caches("LBHNC"))
    mover = PageMover(kv, codec)
    store = TieredStore(mover.page_bytes, 64 * mover.page_bytes)
    runner = TransferRunner(kv.device)
    assert runner.use_cuda_stream == CUDA
    ks = keys(12, codec)
    ids = list(range(12))

    def save() -> int:
        rows = store.reserve_many(ks, list(range(12)), [None] * 12)
        assert all(r is not None for r in rows)
        if CUDA:  # copies are issued on the side stream, not the compute stream
            assert torch.cuda.current_stream() != torch.cuda.default_stream()
        nonfinite, ops = mover.save(ids, store.dram.arena, rows)
        assert nonfinite == [0] * 12
        for k in ks:
            store.commit(k)
        return ops

    ops = runner.submit(save).result(timeout=120)
    assert ops <= L + 4
    target = caches("LBHNC", seed=5)
    dst_mover = PageMover(KVLayout(target), codec)

    def load() -> int:
        rows = store.acquire_prefix(ks)
        try:
            return dst_mover.load(store.dram.arena, rows, list(range(20, 32)))
        finally:
            store.release_many(ks)

    runner.submit(load).result(timeout=120)
    src = caches("LBHNC")
    for name in src:
        got, want = target[name][20:32].float().cpu(), src[name][:12].float().cpu()
        if codec == "none":
            assert torch.equal(got, want)
        else:  # 8-bit codecs: within the quantization bound (fp8 keeps 3 mantissa bits)
            bound = want.abs().amax() / (16 if codec == "fp8" else 100)
            assert (got - want).abs().max() <= bound
    runner.shutdown()
    store.close()


def test_kvikio_probe_and_gds_round_trip(tmp_path):
    probe = capability.kvikio_capability()
    if not probe.available:
        assert "no CUDA" in probe.reason or "kvikio" in probe.reason
        pytest.skip(f"kvikio unavailable: {probe.reason}")
    from symram_vllm.tiers.aligned_io import KvikioFileIO, open_file_io, probe_kvikio_io

    # Imports, yet may still fail on this file system (GDS needs O_DIRECT and cuFile):
    # the disk tier then falls back to POSIX I/O, which this records as the skip reason.
    usable = probe_kvikio_io(tmp_path)
    if not usable.available:
        io, reason = open_file_io(tmp_path, "auto", "off")
        assert io.name == "posix" and "kvikio unusable here" in reason
        pytest.skip(f"kvikio imports but cannot do I/O in {tmp_path}: {usable.reason}")
    io = KvikioFileIO()
    data = bytes(range(256)) * 4096
    path = tmp_path / "page.bin"
    io.write_new(path, memoryview(data), fsync=True)
    out = bytearray(len(data))
    assert io.read_into(path, [memoryview(out)]) == len(data)
    assert bytes(out) == data


def test_gpu_inventory_reports_numa_and_pcie():
    gpus, reason = capability.gpu_inventory()
    if not CUDA:
        assert not gpus or reason
        return
    if not gpus:
        pytest.skip(reason)
    first = gpus[0]
    assert first.name and first.pci_bus_id
    print(f"GPU0 {first.name} PCIe gen {first.pcie_generation} x{first.pcie_width} "
          f"NUMA node {first.numa_node}")

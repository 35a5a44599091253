"""Tier benchmark (not a timed test): each tier against the raw operation beneath it.

* DRAM tier put / get GB/s against plain ``torch.Tensor.copy_`` of the same bytes;
  also the TierStack DRAM-hit path (policy bookkeeping included);
* disk tier write / read GB/s against raw O_DIRECT I/O of the same sizes (new file
  per page + fdatasync for writes, open + preadv for reads: the same durability);
* the layout study behind docs/tiers.md: slab file vs one file per page;
* checksum speed (CRC32 vs BLAKE2b), the reason page headers use CRC32.

Every ratio is taken against its baseline in the same run: A and B alternate inside
each repeat and medians are reported. Pages are the `mid` demo model's block size
(1.5 MiB) unless --page-kib says otherwise. Data goes under --dir (default: a
temporary directory on /tmp) and is removed afterwards.

Writes loadtest/results/tiers.json (keys this script does not produce, such as
``recompute_over_disk_hit_8k`` from an engine run, are kept).

    python -m loadtest.bench_tiers [--repeats 5] [--pages 32] [--page-kib 1536]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from loadtest.machine import describe_machine
from symram_vllm.keys import BlockKey
from symram_vllm.tiers.aligned_io import O_DIRECT, AlignedBuffer, align_up, probe_direct_io
from symram_vllm.tiers.disk import DiskTier, DiskTierConfig
from symram_vllm.tiers.dram import DramTier
from symram_vllm.tiers.page_format import HEADER_BYTES
from symram_vllm.tiers.stack import TierStack

RESULTS = Path(__file__).parent / "results"
GB = 1e9


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(32, "big"))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_gbps(nbytes: int, seconds: list[float]) -> float:
    return round(nbytes / statistics.median(seconds) / GB, 3)


def alternate(repeats: int, arms: dict[str, Callable[[int], None]]) -> dict[str, list[float]]:
    """Run every arm once per repeat, rotating which goes first; seconds per arm."""
    names = list(arms)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(timed(lambda name=name, r=r: arms[name](r)))
    return times


# -- DRAM --------------------------------------------------------------------------------
def bench_dram(page_bytes: int, pages: int, repeats: int) -> dict[str, object]:
    src = torch.randint(0, 256, (pages, page_bytes), dtype=torch.uint8)
    dst = torch.empty_like(src)
    arena = torch.empty_like(src)
    tier = DramTier(page_bytes, pages * page_bytes, pin_memory=False)
    stack = TierStack(page_bytes, pages * page_bytes, pin_memory=False)
    for t in (tier.arena, stack.dram.arena, arena, dst):  # fault pages in before timing
        t.fill_(0)

    def memcpy_in(_r: int) -> None:
        for i in range(pages):
            arena[i].copy_(src[i])

    def memcpy_out(_r: int) -> None:
        for i in range(pages):
            dst[i].copy_(arena[i])

    # New keys every round: a full tier evicts as it stores, as in steady state.
    def tier_put(r: int) -> None:
        for i in range(pages):
            tier.set(key(r * pages + i), src[i])

    def tier_get(r: int) -> None:
        for k_i, k in enumerate(list(tier.keys())):
            tier.get(k, out=dst[k_i])

    def stack_put(r: int) -> None:
        for i in range(pages):
            stack.put(key(r * pages + i), src[i], position=i)

    def stack_get(_r: int) -> None:
        for k_i, k in enumerate(list(stack.dram.keys())):
            stack.get(k, out=dst[k_i])

    # Puts fill the tier that the gets then read, so run puts before gets.
    put = alternate(repeats, {"memcpy": memcpy_in, "dram_put": tier_put, "stack_put": stack_put})
    get = alternate(repeats, {"memcpy": memcpy_out, "dram_get": tier_get, "stack_get": stack_get})
    held = next(iter(stack.dram.keys()))
    assert torch.equal(stack.get(held, out=dst[0]), src[int.from_bytes(held.chain, "big") % pages])
    stack.close()
    total = pages * page_bytes
    out = {
        "memcpy_in_gbps": median_gbps(total, put["memcpy"]),
        "memcpy_out_gbps": median_gbps(total, get["memcpy"]),
        "dram_put_gbps": median_gbps(total, put["dram_put"]),
        "dram_get_gbps": median_gbps(total, get["dram_get"]),
        "stack_put_gbps": median_gbps(total, put["stack_put"]),
        "stack_get_gbps": median_gbps(total, get["stack_get"]),
    }
    out["dram_put_over_memcpy"] = round(out["dram_put_gbps"] / out["memcpy_in_gbps"], 3)
    out["dram_get_over_memcpy"] = round(out["dram_get_gbps"] / out["memcpy_out_gbps"], 3)
    out["stack_put_over_memcpy"] = round(out["stack_put_gbps"] / out["memcpy_in_gbps"], 3)
    out["stack_get_over_memcpy"] = round(out["stack_get_gbps"] / out["memcpy_out_gbps"], 3)
    return out


# -- disk: tier vs raw O_DIRECT ----------------------------------------------------------
class RawDirect:
    """The floor under the disk tier: one new file per page, O_DIRECT, fdatasync."""

    def __init__(self, directory: Path, nbytes: int, direct: bool) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.size = align_up(nbytes)
        self.buf = AlignedBuffer(self.size)
        self.flag = O_DIRECT if direct else 0

    def write(self, name: str, data: torch.Tensor) -> None:
        self.buf.tensor[: data.numel()].copy_(data)
        fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | self.flag, 0o644)
        try:
            os.pwritev(fd, [self.buf.view(self.size)], 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def read(self, name: str, out: torch.Tensor) -> None:
        fd = os.open(self.dir / name, os.O_RDONLY | self.flag)
        try:
            os.preadv(fd, [self.buf.view(self.size)], 0)
        finally:
            os.close(fd)
        out.copy_(self.buf.tensor[: out.numel()])  # the tier also hands back a tensor

    def clear(self) -> None:
        for p in self.dir.iterdir():
            p.unlink()


def bench_disk(root: Path, page_bytes: int, pages: int, repeats: int) -> dict[str, object]:
    direct = probe_direct_io(root).available
    src = torch.randint(0, 256, (pages, page_bytes), dtype=torch.uint8)
    dst = torch.empty(page_bytes, dtype=torch.uint8)
    raw = RawDirect(root / "raw", page_bytes, direct)
    budget = (pages + 8) * (HEADER_BYTES + align_up(page_bytes)) * 2
    tier = DiskTier(root / "tier", budget, config=DiskTierConfig(manifest=False))
    written: dict[str, list[BlockKey]] = {"tier": [], "async": []}

    def raw_write(r: int) -> None:
        raw.clear()
        for i in range(pages):
            raw.write(f"{i}.page", src[i])

    def tier_write(r: int) -> None:
        for k in written["tier"]:
            tier.delete(k)
        written["tier"] = [key(10_000 + r * pages + i) for i in range(pages)]
        for i, k in enumerate(written["tier"]):
            tier.set(k, src[i])

    def tier_write_async(r: int) -> None:
        for k in written["async"]:
            tier.delete(k)
        written["async"] = [key(20_000 + r * pages + i) for i in range(pages)]
        for i, k in enumerate(written["async"]):
            tier.set_async(k, src[i])
        tier.flush()

    def raw_read(_r: int) -> None:
        for i in range(pages):
            raw.read(f"{i}.page", dst)

    def tier_read(_r: int) -> None:
        for k in written["tier"]:
            if tier.get(k, out=dst) is None:
                raise RuntimeError(f"disk tier lost {k}")

    # Two reads in flight (a prefix load reads many pages): one page's checksum
    # overlaps the next page's I/O. The raw baseline gets the same two threads.
    outs = torch.empty(pages, page_bytes, dtype=torch.uint8)
    raw_pair = [RawDirect(root / "raw", page_bytes, direct) for _ in range(2)]
    pool = ThreadPoolExecutor(2)

    def raw_read_qd2(_r: int) -> None:
        list(pool.map(lambda i: raw_pair[i % 2].read(f"{i}.page", outs[i]), range(pages)))

    def tier_read_qd2(_r: int) -> None:
        futures = [tier.get_async(k, out=outs[i]) for i, k in enumerate(written["tier"])]
        if any(f.result() is None for f in futures):
            raise RuntimeError("disk tier lost a page")

    writes = alternate(
        repeats, {"raw": raw_write, "tier": tier_write, "tier_async": tier_write_async}
    )
    reads = alternate(repeats, {"raw": raw_read, "tier": tier_read})
    reads_qd2 = alternate(repeats, {"raw": raw_read_qd2, "tier": tier_read_qd2})
    pool.shutdown()
    stats = tier.stats()
    tier.close()
    total = pages * page_bytes
    out: dict[str, object] = {
        "direct_io": direct,
        "io": tier.io_reason,
        "raw_write_gbps": median_gbps(total, writes["raw"]),
        "tier_write_gbps": median_gbps(total, writes["tier"]),
        "tier_write_async_gbps": median_gbps(total, writes["tier_async"]),
        "raw_read_gbps": median_gbps(total, reads["raw"]),
        "tier_read_gbps": median_gbps(total, reads["tier"]),
        "raw_read_qd2_gbps": median_gbps(total, reads_qd2["raw"]),
        "tier_read_qd2_gbps": median_gbps(total, reads_qd2["tier"]),
        "integrity_failures": stats.integrity_failures,
    }
    out["disk_write_over_raw"] = round(out["tier_write_gbps"] / out["raw_write_gbps"], 3)
    out["disk_write_async_over_raw"] = round(
        out["tier_write_async_gbps"] / out["raw_write_gbps"], 3
    )
    out["disk_read_over_raw"] = round(out["tier_read_gbps"] / out["raw_read_gbps"], 3)
    out["disk_read_qd2_over_raw"] = round(
        out["tier_read_qd2_gbps"] / out["raw_read_qd2_gbps"], 3
    )
    return out


# -- layout study: slab vs file per page -------------------------------------------------
def bench_layout(root: Path, sizes_kib: list[int], budget_mib: int, repeats: int) -> list[dict]:
    direct = probe_direct_io(root).available
    flag = O_DIRECT if direct else 0
    rows = []
    for kib in sizes_kib:
        size = kib * 1024
        n = max(8, budget_mib * 1024 // kib)
        buf = AlignedBuffer(size)
        buf.tensor[:size].copy_(torch.randint(0, 256, (size,), dtype=torch.uint8))
        view = buf.view(size)
        files, slab = root / f"files-{kib}", root / f"slab-{kib}"
        files.mkdir()
        slab_fd = os.open(slab, os.O_RDWR | os.O_CREAT | flag, 0o644)
        os.posix_fallocate(slab_fd, 0, size * n)

        def files_write(r: int, files: Path = files, n: int = n, view: memoryview = view,
                        sync: bool = True) -> None:
            for i in range(n):
                tmp, final = files / f".{i}.tmp", files / f"{i}.page"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
                os.pwritev(fd, [view], 0)
                if sync:
                    os.fdatasync(fd)
                os.close(fd)
                os.replace(tmp, final)

        def slab_write(r: int, fd: int = slab_fd, n: int = n, size: int = size,
                       view: memoryview = view, sync: bool = True) -> None:
            for i in range(n):
                os.pwritev(fd, [view], i * size)
                if sync:
                    os.fdatasync(fd)

        def files_read(r: int, files: Path = files, n: int = n, view: memoryview = view) -> None:
            for i in range(n):
                fd = os.open(files / f"{i}.page", os.O_RDONLY | flag)
                os.preadv(fd, [view], 0)
                os.close(fd)

        def slab_read(r: int, fd: int = slab_fd, n: int = n, size: int = size,
                      view: memoryview = view) -> None:
            for i in range(n):
                os.preadv(fd, [view], i * size)

        w = alternate(repeats, {
            "files": files_write,
            "slab": slab_write,
            "files_nosync": lambda r, f=files_write: f(r, sync=False),
            "slab_nosync": lambda r, f=slab_write: f(r, sync=False),
        })
        rd = alternate(repeats, {"files": files_read, "slab": slab_read})
        os.close(slab_fd)
        total = n * size
        row = {
            "page_kib": kib,
            "pages": n,
            "file_per_page_write_gbps": median_gbps(total, w["files"]),
            "slab_write_gbps": median_gbps(total, w["slab"]),
            "file_per_page_nosync_write_gbps": median_gbps(total, w["files_nosync"]),
            "slab_nosync_write_gbps": median_gbps(total, w["slab_nosync"]),
            "file_per_page_read_gbps": median_gbps(total, rd["files"]),
            "slab_read_gbps": median_gbps(total, rd["slab"]),
        }
        row["files_over_slab_write"] = round(
            row["file_per_page_write_gbps"] / row["slab_write_gbps"], 3
        )
        row["files_over_slab_read"] = round(
            row["file_per_page_read_gbps"] / row["slab_read_gbps"], 3
        )
        rows.append(row)
        shutil.rmtree(files)
        slab.unlink()
    return rows


def bench_checksums(nbytes: int, repeats: int) -> dict[str, float]:
    data = os.urandom(nbytes)
    t = alternate(
        repeats * 3,
        {"crc32": lambda _r: zlib.crc32(data), "blake2b": lambda _r: hashlib.blake2b(data)},
    )
    return {f"{name}_gbps": median_gbps(nbytes, s) for name, s in t.items()}


def describe_filesystem(path: Path) -> str:
    """Type and mount options of the filesystem holding `path` (they explain the
    layout figures: e.g. ``discard`` makes every freed block a TRIM)."""
    best, found = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _dev, mnt, fstype, opts, *_ = line.split()
                if str(path.resolve()).startswith(mnt) and len(mnt) >= len(best):
                    best, found = mnt, f"{fstype} on {mnt} ({opts})"
    except OSError:
        pass
    return found


def write_merged(path: Path, result: dict[str, object]) -> None:
    """Update our keys, keep the rest (e.g. recompute_over_disk_hit_8k from an engine run)."""
    merged: dict[str, object] = {}
    if path.exists():
        try:
            merged = json.loads(path.read_text())
        except json.JSONDecodeError:
            merged = {}
    merged.update(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pages", type=int, default=32, help="pages per timed round")
    parser.add_argument("--page-kib", type=int, default=1536, help="page size (mid model)")
    parser.add_argument("--layout-kib", default="64,256,1536", help="layout study sizes")
    parser.add_argument("--layout-mib", type=int, default=16, help="bytes per layout round")
    parser.add_argument("--dir", type=Path, default=None, help="scratch dir (default /tmp)")
    parser.add_argument("--out", type=Path, default=RESULTS / "tiers.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    started = time.perf_counter()
    page_bytes = args.page_kib * 1024
    scratch = Path(tempfile.mkdtemp(prefix="symram-bench-tiers-", dir=args.dir))
    try:
        dram = bench_dram(page_bytes, args.pages, args.repeats)
        print(json.dumps({"dram": dram}, indent=2), flush=True)
        disk = bench_disk(scratch, page_bytes, args.pages, args.repeats)
        print(json.dumps({"disk": disk}, indent=2), flush=True)
        sizes = [int(s) for s in args.layout_kib.split(",")]
        layout = bench_layout(scratch, sizes, args.layout_mib, max(3, args.repeats - 2))
        print(json.dumps({"layout": layout}, indent=2), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    checksums = bench_checksums(page_bytes, args.repeats)
    fs = os.statvfs(args.dir or tempfile.gettempdir())
    result: dict[str, object] = {
        "benchmark": "tiers",
        "command": "python -m loadtest.bench_tiers",
        "machine": {
            **describe_machine(),
            "torch_threads": torch.get_num_threads(),
            "scratch_fs": describe_filesystem(Path(args.dir or tempfile.gettempdir())),
            "scratch_fs_free_gib": round(fs.f_bavail * fs.f_frsize / 1024**3, 1),
        },
        "page_bytes": page_bytes,
        "pages_per_round": args.pages,
        "repeats": args.repeats,
        # Headline ratios (same run, medians). DRAM: the slower of put and get.
        "dram_over_memcpy": min(dram["dram_put_over_memcpy"], dram["dram_get_over_memcpy"]),
        "disk_read_over_raw": disk["disk_read_over_raw"],
        "disk_write_over_raw": disk["disk_write_over_raw"],
        "dram": dram,
        "disk": disk,
        "layout": layout,
        "checksum": checksums,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_merged(args.out, result)
    print(json.dumps({k: result[k] for k in (
        "dram_over_memcpy", "disk_read_over_raw", "disk_write_over_raw", "checksum", "seconds"
    )}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

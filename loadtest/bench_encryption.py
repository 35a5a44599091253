"""Encryption-at-rest benchmark (not a timed test): what sealing pages with AES-256-GCM
costs, against what the disk tier moves and what a disk hit takes end to end.

Three measurements, each with its baseline in the same run (arms alternated, medians):
  1. AES-256-GCM seal and open GB/s on one core (``cryptography``, 8 MiB buffers), next
     to CRC32, the check it replaces on sealed pages;
  2. the disk tier's write and read GB/s with plaintext and with sealed pages (real
     files, fsync, O_DIRECT where the filesystem allows it), mid-model pages;
  3. disk-hit TTFT of an ~8k-token prompt on the `mid` demo model: two vLLM + symram
     engines, one with ``encryption: off`` and one with ``encryption: required``, served
     the same way as ``bench_ttft --tier disk`` (a DRAM tier of ~1.3 prompts, two 8k
     fillers push the prompt to NVMe) and asked in alternating order.

Writes loadtest/results/encryption.json (``aes_gcm_gbps_per_core``,
``disk_hit_encrypted_over_plain_8k``, target <= 1.1) and prints a table.

    python -m loadtest.bench_encryption [--repeats 3] [--no-engine]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from loadtest.bench_ttft import BYTES_PER_TOKEN_MID, LENGTHS, ttft
from loadtest.machine import describe_machine
from symram_vllm.keys import BlockKey
from symram_vllm.tiers.aligned_io import AlignedBuffer
from symram_vllm.tiers.crypto import TAG_BYTES, PageCipher
from symram_vllm.tiers.disk import DiskTier, DiskTierConfig
from symram_vllm.tiers.page_format import HEADER_BYTES, unpack_header

RESULTS = Path(__file__).parent / "results"
TARGET = 1.1
# One page of the mid model as the engine saves it: a 128-token block, all layers (1.5 MiB).
PAGE_BYTES = 128 * BYTES_PER_TOKEN_MID
ARMS = ("plain", "encrypted")


def _rate(nbytes: int, fn: Callable[[], object], rounds: int) -> float:
    """Median GB/s of `rounds` timed calls of `fn` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def cipher_speed(rounds: int) -> dict[str, float]:
    cipher = PageCipher(os.urandom(32), b"bench")
    n = 8 << 20
    plain = memoryview(bytearray(os.urandom(n)))
    sealed = memoryview(bytearray(n + TAG_BYTES))
    out = memoryview(bytearray(n))
    nonce, aad = cipher.new_nonce(), b"a" * 120
    cipher.seal_into(nonce, aad, plain, sealed)
    return {
        "aes_gcm_seal_gbps": _rate(n, lambda: cipher.seal_into(nonce, aad, plain, sealed), rounds),
        "aes_gcm_open_gbps": _rate(n, lambda: cipher.open_into(nonce, aad, sealed, out), rounds),
        "crc32_gbps": _rate(n, lambda: zlib.crc32(plain), rounds),
    }


def disk_speed(base: Path, pages: int, repeats: int) -> dict[str, object]:
    """Write then read `pages` pages per arm and repeat, arms alternated."""
    data = [torch.randint(0, 256, (PAGE_BYTES,), dtype=torch.uint8) for _ in range(pages)]
    out = AlignedBuffer(PAGE_BYTES).tensor[:PAGE_BYTES]
    samples: dict[str, dict[str, list[float]]] = {a: {"write": [], "read": []} for a in ARMS}
    direct = None
    for r in range(repeats):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            cipher = PageCipher(os.urandom(32), b"bench") if arm == "encrypted" else None
            root = Path(tempfile.mkdtemp(prefix=f"enc-{arm}-", dir=base))
            tier = DiskTier(root, 4 * pages * (PAGE_BYTES + HEADER_BYTES), cipher=cipher,
                            config=DiskTierConfig(manifest=False))
            direct = bool(tier.io.direct)
            keys = [BlockKey(os.urandom(32)) for _ in range(pages)]
            start = time.perf_counter()
            for k, page in zip(keys, data, strict=True):
                assert tier.set(k, page)
            samples[arm]["write"].append(pages * PAGE_BYTES / (time.perf_counter() - start) / 1e9)
            start = time.perf_counter()
            for k, page in zip(keys, data, strict=True):
                got = tier.get(k, out=out)
                assert got is not None and got.numel() == page.numel()
            samples[arm]["read"].append(pages * PAGE_BYTES / (time.perf_counter() - start) / 1e9)
            assert torch.equal(tier.get(keys[-1]), data[-1])
            sealed = unpack_header(tier.path_of(keys[0]).read_bytes()[:HEADER_BYTES]).sealed
            assert sealed == (cipher is not None)
            tier.close()
    med = {a: {op: statistics.median(v) for op, v in ops.items()} for a, ops in samples.items()}
    return {"page_bytes": PAGE_BYTES, "pages": pages, "direct_io": direct, "median_gbps": med,
            "samples_gbps": samples}


def engine_ttft(repeats: int, size: str) -> dict[str, object]:
    from symram_vllm.demo_model import build_demo_model
    from symram_vllm.serving.engine_process import EngineServer

    model = build_demo_model(None, size)
    rng = random.Random(11)
    length = LENGTHS["8k"]
    kv_bytes = int(1.3 * length * BYTES_PER_TOKEN_MID)
    dirs = {a: tempfile.TemporaryDirectory(prefix=f"symram-bench-enc-{a}-", dir=RESULTS.parent)
            for a in ARMS}
    settings = {
        "plain": {"SYMRAM_ENCRYPTION": "off"},
        "encrypted": {"SYMRAM_ENCRYPTION": "required",
                      "SYMRAM_ENCRYPTION_KEY": os.urandom(32).hex()},
    }
    servers = {
        arm: EngineServer(
            model, RESULTS / "logs" / f"bench_encryption_{arm}_server.log", connector="symram",
            kv_cache_bytes=kv_bytes, max_model_len=8448, dram_bytes=str(kv_bytes),
            env={"SYMRAM_DISK_PATH": dirs[arm].name, "SYMRAM_DISK_BYTES": "8GiB",
                 **settings[arm]},
        )
        for arm in ARMS
    }

    def fresh(n: int) -> list[int]:
        return [rng.randrange(10, 8000) for _ in range(n)]

    samples: dict[str, dict[str, list[float]]] = {
        a: {"recompute": [], "disk_hit": []} for a in ARMS
    }
    cached: dict[str, list[int]] = {a: [] for a in ARMS}
    metrics: dict[str, dict[str, float]] = {}
    try:
        print(f"starting two engines ({size} model): {', '.join(ARMS)}", flush=True)
        for server in servers.values():
            server.launch()
        for server in servers.values():
            server.wait_healthy()
            ttft(server, fresh(512))  # warm-up
        for r in range(repeats):
            for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
                server, prompt = servers[arm], fresh(length)
                samples[arm]["recompute"].append(ttft(server, prompt)[0])
                for _filler in range(2):
                    ttft(server, fresh(length))
                seconds, tokens = ttft(server, prompt)
                samples[arm]["disk_hit"].append(seconds)
                cached[arm].append(tokens)
                print(f"repeat {r + 1}/{repeats} {arm:>9}: disk hit {seconds:.3f} s "
                      f"({tokens} cached tokens)", flush=True)
        metrics = {arm: server.metrics() for arm, server in servers.items()}
        sealed_pages = [
            unpack_header(p.read_bytes()[:HEADER_BYTES]).sealed
            for p in Path(dirs["encrypted"].name).rglob("*.page")
        ]
    finally:
        for server in servers.values():
            server.stop()
        for d in dirs.values():
            d.cleanup()
    med = {a: {k: statistics.median(v) for k, v in s.items()} for a, s in samples.items()}
    return {
        "model": size,
        "prompt_tokens": length,
        "median_ttft_s": med,
        "samples_s": samples,
        "cached_tokens": cached,
        "disk_hits": {a: m.get("symram:disk_hits_total", 0.0) for a, m in metrics.items()},
        "load_failed_blocks": {
            a: m.get("symram:load_failed_blocks_total", 0.0) for a, m in metrics.items()
        },
        "encrypted_arm_pages_sealed": f"{sum(sealed_pages)} of {len(sealed_pages)}",
        "disk_hit_encrypted_over_plain_8k":
            med["encrypted"]["disk_hit"] / med["plain"]["disk_hit"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="engine repeats per arm")
    parser.add_argument("--disk-repeats", type=int, default=5)
    parser.add_argument("--disk-pages", type=int, default=32)
    parser.add_argument("--size", default="mid", choices=["tiny", "mid"])
    parser.add_argument("--no-engine", action="store_true", help="skip the TTFT part")
    parser.add_argument("--out", type=Path, default=RESULTS / "encryption.json")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    speed = cipher_speed(rounds=15)
    aes = min(speed["aes_gcm_seal_gbps"], speed["aes_gcm_open_gbps"])
    with tempfile.TemporaryDirectory(prefix="symram-bench-enc-disk-", dir=RESULTS.parent) as d:
        disk = disk_speed(Path(d), args.disk_pages, args.disk_repeats)
    med = disk["median_gbps"]
    result: dict[str, object] = {
        "aes_gcm_gbps_per_core": aes,
        **speed,
        "disk_tier": disk,
        "disk_write_gbps": med["plain"]["write"],
        "disk_read_gbps": med["plain"]["read"],
        "aes_gcm_over_disk_read": aes / med["plain"]["read"],
        "aes_gcm_over_disk_write": aes / med["plain"]["write"],
        "disk_read_encrypted_over_plain_time": med["plain"]["read"] / med["encrypted"]["read"],
        "disk_write_encrypted_over_plain_time": med["plain"]["write"] / med["encrypted"]["write"],
        "target_disk_hit_encrypted_over_plain_8k": TARGET,
    }
    if not args.no_engine:
        ttfts = engine_ttft(args.repeats, args.size)
        result["disk_hit_encrypted_over_plain_8k"] = ttfts.pop("disk_hit_encrypted_over_plain_8k")
        result["engine"] = ttfts
    result["machine"] = describe_machine()
    result["notes"] = (
        "2-core machine shared with other sessions (load average "
        f"{load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at the end): absolute "
        "figures are noisy; ratios come from alternating arms in this run."
    )
    result["command"] = (
        f"python -m loadtest.bench_encryption --repeats {args.repeats} --size {args.size}"
        + (" --no-engine" if args.no_engine else "")
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nAES-256-GCM on one core: seal {speed['aes_gcm_seal_gbps']:.2f} GB/s, open "
          f"{speed['aes_gcm_open_gbps']:.2f} GB/s (CRC32 {speed['crc32_gbps']:.2f} GB/s)")
    print(f"disk tier ({PAGE_BYTES} B pages, O_DIRECT {disk['direct_io']}): "
          f"{'arm':>10} {'write GB/s':>11} {'read GB/s':>10}")
    for arm in ARMS:
        print(f"{'':>40}{arm:>10} {med[arm]['write']:>11.3f} {med[arm]['read']:>10.3f}")
    if "engine" in result:
        m = result["engine"]["median_ttft_s"]  # type: ignore[index]
        print(f"disk-hit TTFT, {LENGTHS['8k']} tokens: plain {m['plain']['disk_hit']:.3f} s, "
              f"encrypted {m['encrypted']['disk_hit']:.3f} s -> ratio "
              f"{result['disk_hit_encrypted_over_plain_8k']:.3f} (target <= {TARGET})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

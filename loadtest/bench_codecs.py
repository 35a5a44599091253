"""Codec benchmark (not a timed test): speed, size and accuracy of each page codec.

On KV-like synthetic pages (``symram_vllm.codecs.synthetic``) shaped like the `mid`
demo model (8 layers, 2 KV heads, head dim 192, vLLM CPU's 128-token blocks):

* encode / decode GB/s per codec on this CPU (uncompressed bytes per second, medians
  over repeats, codecs alternated inside each repeat);
* zstd compression ratio on raw pages and on pages already quantized to 8 bits;
* capacity multiplier per codec (raw page bytes / encoded page bytes);
* the scale-granularity study behind docs/codecs.md (error vs size, per token vs per
  (block, head)).

Writes loadtest/results/codecs.json. Keys this script does not produce (the engine
run adds ``token_agreement_int8`` / ``token_agreement_fp8``) are kept when rewriting.

    python -m loadtest.bench_codecs [--repeats 5] [--blocks 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from loadtest.machine import describe_machine
from symram_vllm.codecs import FixedSizeCodec, PageGeometry, get_codec
from symram_vllm.codecs.synthetic import attention_output, key_like_queries, synthetic_kv
from symram_vllm.kernels import dequantize_scatter, gather_quantize, kernel_backend

RESULTS = Path(__file__).parent / "results"
CODECS = ["none", "int8", "fp8", "zstd", "int8+zstd", "fp8+zstd"]
MID = {"layers": 8, "heads": 2, "tokens": 128, "head_dim": 192}


def make_caches(blocks: int, profile: str = "llm") -> list[torch.Tensor]:
    return [
        synthetic_kv(blocks, MID["heads"], MID["tokens"], MID["head_dim"], seed=layer,
                     profile=profile)
        for layer in range(MID["layers"])
    ]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def codec_round(
    name: str, caches: list[torch.Tensor], ids: list[int], dst: list[torch.Tensor]
) -> tuple[float, float]:
    """Seconds to encode `ids` of `caches` and to decode them into `dst` (a separate
    cache, so the source stays pristine for the next codec), error measuring off."""
    codec = get_codec(name, PageGeometry.from_tensors(caches), measure_error=False)
    if isinstance(codec, FixedSizeCodec):
        # The connector's batched path: straight into rows of a DRAM-like arena.
        arena = torch.empty(len(ids), codec.encoded_size(), dtype=torch.uint8)
        slots = list(range(len(ids)))
        enc = timed(lambda: codec.encode_blocks(caches, ids, arena, slots))
        dec = timed(lambda: codec.decode_blocks(arena, slots, dst, ids))
        return enc, dec
    pages: list[torch.Tensor] = []
    enc = timed(lambda: pages.extend(
        codec.encode([c[b] for c in caches]).data for b in ids))
    dec = timed(lambda: [codec.decode(p, [c[b] for c in dst])
                         for p, b in zip(pages, ids, strict=True)])
    return enc, dec


def page_stats(name: str, caches: list[torch.Tensor], ids: list[int]) -> dict[str, float]:
    codec = get_codec(name, PageGeometry.from_tensors(caches), measure_error=True)
    metas = [codec.encode([c[b] for c in caches]).meta for b in ids]
    raw = codec.geometry.page_bytes
    mean_bytes = statistics.fmean(m.nbytes for m in metas)
    return {
        "page_bytes": raw,
        "encoded_bytes_mean": mean_bytes,
        "capacity_multiplier": raw / mean_bytes,
        "rel_error_mean": statistics.fmean(m.rel_error or 0.0 for m in metas),
        "max_abs_error_max": max(m.max_abs_error or 0.0 for m in metas),
        "measured_error_encode_s_per_page": timed(
            lambda: codec.encode([c[ids[0]] for c in caches])),
    }


def speed(repeats: int, blocks: int) -> dict[str, dict[str, float]]:
    caches = make_caches(blocks)
    dst = [torch.empty_like(c) for c in caches]
    ids = list(range(blocks))
    raw = blocks * PageGeometry.from_tensors(caches).page_bytes
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in CODECS}
    codec_round("int8", caches, ids[:2], dst)  # warm-up: first-call allocations
    for _ in range(repeats):
        for name in CODECS:  # alternate codecs inside each repeat: noise hits all alike
            runs[name].append(codec_round(name, caches, ids, dst))
    out: dict[str, dict[str, float]] = {}
    for name, times in runs.items():
        enc = statistics.median(t[0] for t in times)
        dec = statistics.median(t[1] for t in times)
        out[name] = {"encode_gbps": raw / enc / 1e9, "decode_gbps": raw / dec / 1e9,
                     **page_stats(name, caches, ids[: min(8, blocks)])}
    return out


def zstd_ratios(blocks: int) -> dict[str, dict[str, float]]:
    """Compression ratio of zstd alone, by what the page holds and by level."""
    out: dict[str, dict[str, float]] = {}
    for profile in ("llm", "gaussian"):
        caches = make_caches(blocks, profile)
        geometry = PageGeometry.from_tensors(caches)
        for fmt in ("none", "int8", "fp8"):
            inner = get_codec(fmt, geometry, measure_error=False)
            pages = [inner.encode([c[b] for c in caches]).data for b in range(blocks)]
            for level in (1, 3, 9):
                stage = get_codec(f"{fmt}+zstd:{level}", geometry).transform  # type: ignore[attr-defined]
                packed = sum(stage.encode(p).numel() for p in pages)
                key = f"{profile}/{'bf16' if fmt == 'none' else fmt}"
                out.setdefault(key, {})[f"level_{level}"] = sum(p.numel() for p in pages) / packed
    return out


def granularity_study() -> list[dict[str, object]]:
    """Error of int8/fp8 per token vs per (block, head) scales, and what each costs."""
    rows: list[dict[str, object]] = []
    for profile in ("llm", "gaussian"):
        for head_dim in (64, 128, 192, 256):
            for tokens in (16, 128):
                blocks = 2048 // tokens  # one 2048-token sequence per head
                kv = synthetic_kv(blocks, 2, tokens, head_dim, seed=3, profile=profile)
                queries = key_like_queries(kv, 16)
                reference_out = attention_output(kv, queries)
                ids = torch.arange(blocks)
                x = kv.float()
                for fmt in ("int8", "fp8"):
                    for granularity in ("token", "head"):
                        q, s = gather_quantize(kv, ids, fmt, granularity)
                        x_hat = torch.empty_like(kv)
                        dequantize_scatter(q, s, x_hat, ids)
                        err = x_hat.float() - x
                        att = attention_output(x_hat, queries)
                        rows.append({
                            "profile": profile, "head_dim": head_dim, "block_size": tokens,
                            "fmt": fmt, "granularity": granularity,
                            "rel_error_k": float(err[..., :head_dim].norm()
                                                 / x[..., :head_dim].norm()),
                            "rel_error_v": float(err[..., head_dim:].norm()
                                                 / x[..., head_dim:].norm()),
                            "rel_error_attention": float((att - reference_out).norm()
                                                         / reference_out.norm()),
                            "scale_overhead": s.numel() * 4 / q.numel(),
                        })
    return rows


def capacity_by_head_dim() -> dict[str, dict[str, float]]:
    """Exact capacity multipliers of the fixed codecs for common shapes (bf16 cache)."""
    out: dict[str, dict[str, float]] = {}
    for head_dim in (64, 128, 192, 256):
        for tokens in (16, 128):
            g = PageGeometry(1, 8, tokens, 2 * head_dim, torch.bfloat16)
            out[f"head_dim_{head_dim}/block_{tokens}"] = {
                name: g.page_bytes / get_codec(name, g).encoded_size()
                for name in ("int8", "fp8")
            }
    return out


def write_merged(path: Path, result: dict[str, object]) -> None:
    """Update our keys, keep the rest (e.g. token agreement merged in by an engine run)."""
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
    parser.add_argument("--blocks", type=int, default=24, help="pages per timed round")
    parser.add_argument("--out", type=Path, default=RESULTS / "codecs.json")
    args = parser.parse_args()

    started = time.perf_counter()
    per_codec = speed(args.repeats, args.blocks)
    ratios = zstd_ratios(min(args.blocks, 8))
    study = granularity_study()
    result: dict[str, object] = {
        "benchmark": "codecs",
        "command": "python -m loadtest.bench_codecs",
        "machine": {**describe_machine(), "torch_threads": torch.get_num_threads(),
                    "kernel_backend": kernel_backend(torch.device("cpu"))},
        "geometry": {**MID, "dtype": "bfloat16",
                     "page_bytes": per_codec["none"]["page_bytes"]},
        "data": "synthetic KV, profile 'llm' (symram_vllm/codecs/synthetic.py)",
        "repeats": args.repeats,
        "blocks_per_round": args.blocks,
        **{f"capacity_multiplier_{name}": round(stats["capacity_multiplier"], 4)
           for name, stats in per_codec.items()},
        **{f"rel_error_{name}": stats["rel_error_mean"] for name, stats in per_codec.items()
           if name in ("int8", "fp8")},
        "codecs": per_codec,
        "zstd_ratio": ratios,
        "capacity_by_head_dim": capacity_by_head_dim(),
        "granularity_study": study,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_merged(args.out, result)

    print(f"{'codec':<12}{'enc GB/s':>10}{'dec GB/s':>10}{'capacity x':>12}{'rel err':>10}")
    for name, s in per_codec.items():
        print(f"{name:<12}{s['encode_gbps']:>10.2f}{s['decode_gbps']:>10.2f}"
              f"{s['capacity_multiplier']:>12.3f}{s['rel_error_mean']:>10.4f}")
    print("zstd ratio (level 1/3/9):")
    for key, levels in ratios.items():
        print(f"  {key:<16}" + " ".join(f"{v:6.3f}" for v in levels.values()))
    print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()

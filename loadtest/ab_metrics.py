"""Prometheus scrapes of an engine's /metrics around one A/B point, and where the prompt
tokens came from (device prefix cache, symram DRAM, symram disk, recomputed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

PREFIXES = ("symram:", "vllm:prefix_cache_", "vllm:external_prefix_cache_",
            "vllm:prompt_tokens_by_source", "vllm:num_preemptions", "vllm:prompt_tokens_total")
# Series whose label value we keep apart (summed over every other label).
SPLIT_LABEL = "source"


def parse_metrics(text: str, prefixes: tuple[str, ...] = PREFIXES) -> dict[str, float]:
    """{name or name:source -> value} for matching series, summed over other labels.
    ``*_created`` timestamps are dropped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or not line.startswith(prefixes):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        if name.endswith("_created"):
            continue
        key = name
        for label in labels.rstrip("}").split(","):
            label_name, _, label_value = label.partition("=")
            if label_name == SPLIT_LABEL:
                key = f"{name}:{label_value.strip(chr(34))}"
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            continue
    return out


def scrape(base_url: str, timeout_s: float = 10.0) -> dict[str, float]:
    try:
        response = httpx.get(f"{base_url}/metrics", timeout=timeout_s)
        response.raise_for_status()
    except httpx.HTTPError:
        return {}
    return parse_metrics(response.text)


def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Counters (``*_total``) as after - before; gauges as their value after."""
    out: dict[str, float] = {}
    for key, value in after.items():
        is_counter = "_total" in key
        out[key] = value - before.get(key, 0.0) if is_counter else value
    return out


def tier_breakdown(d: Mapping[str, float]) -> dict[str, Any]:
    """Prompt tokens by where their KV came from, over one point.

    vLLM splits prompt tokens into local_compute / local_cache_hit (device prefix
    cache) / external_kv_transfer (symram). symram counts page reads served by DRAM
    and by disk; the external tokens are split in that proportion.
    """
    computed = d.get("vllm:prompt_tokens_by_source_total:local_compute", 0.0)
    device = d.get("vllm:prompt_tokens_by_source_total:local_cache_hit", 0.0)
    external = d.get("vllm:prompt_tokens_by_source_total:external_kv_transfer", 0.0)
    if not (computed or device or external):
        # Older vLLM without the by-source series: fall back to the hit counters.
        queries = d.get("vllm:prefix_cache_queries_total", 0.0)
        device = d.get("vllm:prefix_cache_hits_total", 0.0)
        external = d.get("vllm:external_prefix_cache_hits_total", 0.0)
        computed = max(queries - device - external, 0.0)
    dram_pages = d.get("symram:dram_hits_total", 0.0)
    disk_pages = d.get("symram:disk_hits_total", 0.0)
    pages = dram_pages + disk_pages
    dram_share = dram_pages / pages if pages else (1.0 if external else 0.0)
    total = computed + device + external
    tokens = {
        "device": device,
        "symram_dram": external * dram_share,
        "symram_disk": external * (1.0 - dram_share),
        "recomputed": computed,
    }
    return {
        "prompt_tokens": total,
        "tokens": tokens,
        "fraction": {k: (v / total if total else 0.0) for k, v in tokens.items()},
        "external_hit_rate": (
            d.get("vllm:external_prefix_cache_hits_total", 0.0)
            / d["vllm:external_prefix_cache_queries_total"]
            if d.get("vllm:external_prefix_cache_queries_total") else 0.0
        ),
        "symram_loaded_blocks": d.get("symram:loaded_blocks_total", 0.0),
        "symram_load_failed_blocks": d.get("symram:load_failed_blocks_total", 0.0),
        "symram_saved_blocks": d.get("symram:saved_blocks_total", 0.0),
        "symram_dram_hits": dram_pages,
        "symram_disk_hits": disk_pages,
        "symram_tier_misses": d.get("symram:tier_misses_total", 0.0),
        "symram_dram_evictions": d.get("symram:dram_evictions_total", 0.0),
        "preemptions": d.get("vllm:num_preemptions_total", 0.0),
    }

"""Placement and eviction: which tier a page lives in, and which page leaves first.

Eviction keeps the pages whose loss would cost the most. A page's score is

    recency x salience^a x recompute_cost^b
    recency  = 0.5 ** (age / half_life)       (age: seconds since last use)
    salience = 1 + hits                       (hits served from any tier)
    recompute_cost = seconds to prefill the block again

and the lowest score goes first. Recompute cost grows with the block's position in
its prefix: every token of block p attends to the p * block_tokens tokens before
it, so late blocks of long prompts are the expensive ones to lose and the first
blocks of a prompt (cheap, and re-derivable fastest) are the ones to drop.

Prefix chains: a block is only useful while every block before it is cached (a
lookup stops at the first miss), so evicting a cheap head block strands its
expensive descendants. When callers pass each block's `parent`, a block with
cached children is not evicted while any candidate without children exists:
leaves go first, and the score orders the leaves. Without parents, the rule above
applies as is.

Scores are compared among the `victim_window` (16) least recently used candidates only
(sampled eviction, as Redis does), which keeps an eviction O(window) on arenas of
100k pages; it is exact when a tier holds fewer pages than the window.

Placement uses a per-tier cost model (bandwidth, latency, cost per GB): a page is
written to a lower tier only if loading it from there beats recomputing it by at
least ``min_saving_s``. Storage cost (cost_per_gb) is reported, not optimised.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from symram_vllm.keys import BlockKey


class TierCost(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bandwidth_gbps: float = Field(gt=0, description="Sustained read GB/s into host memory.")
    latency_s: float = Field(0.0, ge=0, description="Fixed cost of one page access.")
    cost_per_gb: float = Field(0.0, ge=0, description="Storage cost ($/GB-month), reported.")

    def load_seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / (self.bandwidth_gbps * 1e9)


class RecomputeCost(BaseModel):
    """Prefill cost of one block: a per-token part (projections, MLP) plus attention,
    which is linear in the context each token sees. Calibrate per model and device."""

    model_config = ConfigDict(extra="forbid")

    block_tokens: int = Field(16, ge=1)
    seconds_per_token: float = Field(3.0e-4, ge=0)
    seconds_per_token_context: float = Field(1.0e-8, ge=0)

    def block_seconds(self, position: int) -> float:
        n = self.block_tokens
        before = position * n
        # Token i of the block attends to `before + i + 1` tokens.
        attended = n * before + n * (n + 1) / 2
        return n * self.seconds_per_token + attended * self.seconds_per_token_context


class EvictionWeights(BaseModel):
    model_config = ConfigDict(extra="forbid")

    half_life_s: float = Field(120.0, gt=0, description="Age at which recency halves.")
    salience_exponent: float = Field(1.0, ge=0)
    cost_exponent: float = Field(1.0, ge=0)


def _default_dram() -> TierCost:
    # Measured on the project's CPU hosts (torch copy_ ~12 GB/s); GPU hosts see PCIe.
    return TierCost(bandwidth_gbps=12.0, latency_s=2e-6, cost_per_gb=3.0)


def _default_disk() -> TierCost:
    # O_DIRECT reads ~1.8 GB/s here; a Gen4 NVMe does ~7 GB/s.
    return TierCost(bandwidth_gbps=1.8, latency_s=1e-4, cost_per_gb=0.08)


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dram: TierCost = Field(default_factory=_default_dram)
    disk: TierCost = Field(default_factory=_default_disk)
    recompute: RecomputeCost = Field(default_factory=RecomputeCost)
    eviction: EvictionWeights = Field(default_factory=EvictionWeights)
    write_policy: Literal["write_back", "write_through_selective"] = Field(
        "write_back",
        description="write_back: DRAM evictions go to disk. write_through_selective: a "
        "page is copied to disk once it has `write_through_hits` hits; cold evictions "
        "are dropped (HiCache's policy: disk bandwidth only for pages that earn it).",
    )
    write_through_hits: int = Field(
        2, ge=0, description="Hits before write-through; 0 writes every page at save."
    )
    promote_on_hit: bool = Field(True, description="Copy disk hits up into DRAM.")
    min_saving_s: float = Field(
        0.0, ge=0, description="Keep a page on disk only if a disk hit beats recompute by this."
    )
    save_wait_s: float | None = Field(
        5.0, ge=0, description="With DRAM full, a saver waits this long for disk-queue room."
    )
    victim_window: int = Field(
        16, ge=1, description="Oldest evictable pages scored per eviction (sampled)."
    )
    prefetch_workers: int = Field(
        4, ge=1, le=16,
        description="Parallel disk->DRAM promotions (the read queue depth of a disk hit).",
    )
    background_writeback_s: float = Field(
        1.0,
        ge=0,
        description="With write_back, copy DRAM-only pages to disk in the background every "
        "this many seconds, while the disk is otherwise idle, so a crash or a fast "
        "shutdown loses little. 0 = only on eviction and at shutdown.",
    )


@dataclass
class BlockMeta:
    last_access: float
    hits: int = 0
    position: int = 0
    parent: BlockKey | None = None
    children: int = 0  # cached blocks whose parent this is

    def copy(self) -> BlockMeta:
        return BlockMeta(self.last_access, self.hits, self.position, self.parent, self.children)


class BlockLedger:
    """Recency, hit count, prefix position and chain links of every page the stack holds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meta: dict[BlockKey, BlockMeta] = {}

    def touch(
        self,
        key: BlockKey,
        now: float,
        position: int | None = None,
        parent: BlockKey | None = None,
    ) -> BlockMeta:
        with self._lock:
            meta = self._meta.get(key)
            if meta is None:
                meta = self._meta[key] = BlockMeta(now, 0, position or 0)
            else:
                meta.last_access = now
                if position is not None:
                    meta.position = position
            if parent is not None and meta.parent is None:
                meta.parent = parent
                parent_meta = self._meta.get(parent)
                if parent_meta is not None:
                    parent_meta.children += 1
            return meta.copy()

    def hit(self, key: BlockKey, now: float) -> BlockMeta:
        with self._lock:
            meta = self._meta.get(key)
            if meta is None:
                meta = self._meta[key] = BlockMeta(now)
            meta.last_access = now
            meta.hits += 1
            return meta.copy()

    def get(self, key: BlockKey) -> BlockMeta | None:
        with self._lock:
            meta = self._meta.get(key)
            return None if meta is None else meta.copy()

    def lookup(self, keys: list[BlockKey]) -> list[BlockMeta | None]:
        """Metadata of several keys under one lock (live objects: read, do not keep)."""
        with self._lock:
            return [self._meta.get(k) for k in keys]

    def forget(self, key: BlockKey) -> None:
        with self._lock:
            meta = self._meta.pop(key, None)
            if meta is not None and meta.parent is not None:
                parent_meta = self._meta.get(meta.parent)
                if parent_meta is not None and parent_meta.children > 0:
                    parent_meta.children -= 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._meta)


class EvictionPolicy:
    def __init__(
        self,
        config: PolicyConfig,
        ledger: BlockLedger,
        clock: Callable[[], float],
        *,
        fallback_position: Callable[[BlockKey], int] | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.clock = clock
        # Pages indexed from disk at restart have no ledger entry yet; their header
        # still knows their position.
        self.fallback_position = fallback_position
        self._origin = clock()
        self._decay = math.log(2) / config.eviction.half_life_s
        self._cost_cache: dict[int, float] = {}

    def _cost(self, position: int) -> float:
        cost = self._cost_cache.get(position)
        if cost is None:
            exponent = self.config.eviction.cost_exponent
            cost = self.config.recompute.block_seconds(position) ** exponent
            if len(self._cost_cache) < 65536:
                self._cost_cache[position] = cost
        return cost

    def _ranks(self, candidates: list[BlockKey], now: float) -> list[tuple[bool, float]]:
        """(has cached children, score) per candidate; one ledger lookup for all."""
        salience_exp = self.config.eviction.salience_exponent
        out = []
        for key, meta in zip(candidates, self.ledger.lookup(candidates), strict=True):
            if meta is None:
                position = self.fallback_position(key) if self.fallback_position else 0
                meta = BlockMeta(self._origin, 0, position)
            age = max(0.0, now - meta.last_access)
            score = (
                math.exp(-self._decay * age)
                * (1 + meta.hits) ** salience_exp
                * self._cost(meta.position)
            )
            out.append((meta.children > 0, score))
        return out

    def score(self, key: BlockKey, now: float | None = None) -> float:
        return self._ranks([key], self.clock() if now is None else now)[0][1]

    def choose_victim(self, candidates: list[BlockKey]) -> BlockKey:
        """Leaves before blocks with cached children, then lowest score; on ties the
        least recently used (candidates come oldest first)."""
        ranks = self._ranks(candidates, self.clock())
        return candidates[min(range(len(candidates)), key=ranks.__getitem__)]

    def order(self, candidates: list[BlockKey]) -> list[BlockKey]:
        """Candidates in eviction order (first = evicted first)."""
        ranks = self._ranks(candidates, self.clock())
        return [candidates[i] for i in sorted(range(len(candidates)), key=ranks.__getitem__)]


class PlacementPolicy:
    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    def tier_cost(self, tier: str) -> TierCost:
        if tier == "dram":
            return self.config.dram
        if tier == "disk":
            return self.config.disk
        raise ValueError(f"no cost model for tier {tier!r}")

    def saving_seconds(self, tier: str, nbytes: int, position: int) -> float:
        """Seconds a hit in `tier` saves against recomputing the block."""
        return self.config.recompute.block_seconds(position) - self.tier_cost(tier).load_seconds(
            nbytes
        )

    def worth_storing(self, tier: str, nbytes: int, position: int) -> bool:
        saving = self.saving_seconds(tier, nbytes, position)
        return saving > 0 and saving >= self.config.min_saving_s

    def write_through_due(self, hits: int) -> bool:
        return (
            self.config.write_policy == "write_through_selective"
            and hits >= self.config.write_through_hits
        )

    def holding_cost(self, tier: str, nbytes: int) -> float:
        return nbytes / 1e9 * self.tier_cost(tier).cost_per_gb

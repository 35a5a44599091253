"""TieredStore: the worker-side home of KV pages (put / get / contains / pin / evict).

It owns the tiers and reports what it gained and lost as *events* (chain keys
stored / removed), which the connector forwards to the scheduler-side directory.
It knows keys and bytes, not vLLM.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.dram import DramTier, DramTierFull


@dataclass
class StoreEvents:
    stored: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.stored or self.removed)


@dataclass
class LatencyWindow:
    """Recent latencies in seconds, for p50/p95 without unbounded memory."""

    samples: list[float] = field(default_factory=list)
    limit: int = 2048

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)
        if len(self.samples) > self.limit:
            del self.samples[: len(self.samples) - self.limit]

    def quantile(self, q: float) -> float:
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class TieredStore:
    def __init__(self, page_bytes: int, dram_bytes: int, *, pin_memory: bool | None = None) -> None:
        self.page_bytes = page_bytes
        self.dram = DramTier(page_bytes, dram_bytes, pin_memory=pin_memory, on_evict=self._evicted)
        self._events = StoreEvents()
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {
            "put_pages": 0,
            "put_skipped_present": 0,
            "put_rejected_full": 0,
            "get_hits": 0,
            "get_misses": 0,
        }
        self.get_latency = LatencyWindow()
        self.put_latency = LatencyWindow()

    # -- events --------------------------------------------------------------------------
    def _evicted(self, key: BlockKey, _page: torch.Tensor) -> None:
        with self._lock:
            self._events.removed.append(key.chain)

    def drain_events(self) -> StoreEvents:
        with self._lock:
            events, self._events = self._events, StoreEvents()
            return events

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    # -- write path ----------------------------------------------------------------------
    def contains(self, key: BlockKey) -> bool:
        return self.dram.exists(key)

    def reserve(self, key: BlockKey) -> torch.Tensor | None:
        """A slot to fill for `key`; None if it is already stored or there is no room."""
        try:
            slot = self.dram.reserve(key)
        except DramTierFull:
            self._count("put_rejected_full")
            return None
        if slot is None:
            self._count("put_skipped_present")
        return slot

    def commit(self, key: BlockKey) -> None:
        self.dram.commit(key)
        with self._lock:
            self.counters["put_pages"] += 1
            self._events.stored.append(key.chain)

    def abort(self, key: BlockKey) -> None:
        self.dram.abort(key)

    def put(self, key: BlockKey, page: torch.Tensor) -> bool:
        start = time.perf_counter()
        slot = self.reserve(key)
        if slot is None:
            return self.contains(key)
        try:
            slot.copy_(page)
        except BaseException:
            self.abort(key)
            raise
        self.commit(key)
        self.put_latency.add(time.perf_counter() - start)
        return True

    # -- read path -----------------------------------------------------------------------
    def acquire(self, key: BlockKey) -> torch.Tensor | None:
        """A read view of the page, held until `release`; None on a miss."""
        view = self.dram.acquire(key)
        self._count("get_hits" if view is not None else "get_misses")
        return view

    def release(self, key: BlockKey) -> None:
        self.dram.release(key)

    def get(self, key: BlockKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        start = time.perf_counter()
        view = self.acquire(key)
        if view is None:
            return None
        try:
            if out is None:
                return view.clone()
            out.copy_(view)
            return out
        finally:
            self.release(key)
            self.get_latency.add(time.perf_counter() - start)

    # -- management ----------------------------------------------------------------------
    def pin(self, key: BlockKey, ttl_s: float | None = None) -> bool:
        return self.dram.pin(key, ttl_s)

    def unpin(self, key: BlockKey) -> None:
        self.dram.unpin(key)

    def evict(self, key: BlockKey) -> bool:
        removed = self.dram.delete(key)
        if removed:
            with self._lock:
                self._events.removed.append(key.chain)
        return removed

    def prefetch(self, keys: Iterable[BlockKey]) -> int:
        """Promote `keys` toward DRAM ahead of need; returns how many are DRAM-resident.

        With DRAM as the only tier this only counts; lower tiers promote here.
        """
        return sum(1 for key in keys if self.dram.exists(key))

    def stats(self) -> dict[str, float]:
        dram = self.dram.stats()
        with self._lock:
            out: dict[str, float] = {f"store_{k}": float(v) for k, v in self.counters.items()}
        out.update({f"dram_{k}": float(v) for k, v in dram.as_dict().items()})
        out["get_p50_s"] = self.get_latency.quantile(0.5)
        out["get_p95_s"] = self.get_latency.quantile(0.95)
        return out

    def close(self) -> None:
        self.dram.close()

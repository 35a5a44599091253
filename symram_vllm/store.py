"""TieredStore: the worker-side home of KV pages.

It owns the tier stack (DRAM over an optional NVMe tier, over optional remote tiers:
other engines' disk slots and the Redis page tier) and exposes the verbs the worker's
jobs use: whole-job reserve / commit / abort for saves, acquire / release of a prefix's
arena rows for loads. It reports what the tiers gained and lost as *events* (chain
keys stored / removed from every local tier, and keys that entered or left the tiers
other engines can read), which the connector forwards to the scheduler-side
directory. Everything else (pins, prefetches, snapshots, per-page reads) is the
stack's own (``store.stack``), used by the control endpoint and the CLI. It knows
keys and bytes, not vLLM.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from symram_vllm import latency_sink
from symram_vllm.keys import BlockKey
from symram_vllm.tiers.disk import DiskTier
from symram_vllm.tiers.dram import DramTier
from symram_vllm.tiers.events import TierEvent, TierName, TierOp
from symram_vllm.tiers.policy import PolicyConfig
from symram_vllm.tiers.stack import RemoteTier, TierStack

if TYPE_CHECKING:
    from symram_vllm.tiers.peer_redis import RedisPages


@dataclass
class StoreEvents:
    stored: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)
    # Tiers other engines can read: this worker's disk slot, the Redis page tier.
    disk_stored: list[bytes] = field(default_factory=list)
    disk_removed: list[bytes] = field(default_factory=list)
    redis_stored: list[bytes] = field(default_factory=list)
    redis_removed: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(self.__dict__.values())

    def tier_events(self, rank: int) -> list[TierEvent]:
        """The same facts as typed events, for the scheduler (see tiers/events.py)."""
        pairs: list[tuple[list[bytes], TierName, TierOp]] = [
            (self.stored, "local", "stored"), (self.removed, "local", "removed"),
            (self.disk_stored, "disk", "stored"), (self.disk_removed, "disk", "removed"),
            (self.redis_stored, "redis", "stored"), (self.redis_removed, "redis", "removed"),
        ]
        # Removals first: a key removed and stored again in one step ends up stored.
        order = [p for p in pairs if p[2] == "removed"] + [p for p in pairs if p[2] == "stored"]
        return [TierEvent(tier, op, tuple(keys), rank) for keys, tier, op in order if keys]


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
    def __init__(
        self,
        page_bytes: int,
        dram_bytes: int,
        *,
        disk: DiskTier | None = None,
        policy: PolicyConfig | None = None,
        pin_memory: bool | None = None,
        remotes: Sequence[RemoteTier] = (),
        redis_pages: RedisPages | None = None,
        device_index: int | None = None,
    ) -> None:
        self.page_bytes = page_bytes
        self.redis_pages = redis_pages
        all_remotes = list(remotes)
        if redis_pages is not None:
            redis_pages.on_stored = lambda keys: self._record("redis_stored", keys)
            redis_pages.on_removed = lambda keys: self._record("redis_removed", keys)
            all_remotes.append(redis_pages)
        self.stack = TierStack(
            page_bytes,
            dram_bytes,
            disk,
            config=policy,
            pin_memory=pin_memory,
            on_removed=self._removed,
            remotes=all_remotes,
            remote_writer=redis_pages,
            on_event=self._tier_event,
            device_index=device_index,
        )
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

    @property
    def dram(self) -> DramTier:
        return self.stack.dram

    @property
    def disk(self) -> DiskTier | None:
        return self.stack.disk

    # -- events --------------------------------------------------------------------------
    def _removed(self, key: BlockKey) -> None:
        # The stack calls this when a key has left every tier.
        with self._lock:
            self._events.removed.append(key.chain)

    def _record(self, field_name: str, keys: Iterable[BlockKey]) -> None:
        with self._lock:
            getattr(self._events, field_name).extend(k.chain for k in keys)

    def _tier_event(self, kind: str, keys: list[BlockKey]) -> None:
        if kind == "remote_loaded":
            # Promoted from another engine's tier: now in this worker's DRAM as well.
            self._record("stored", keys)
        elif kind in ("disk_stored", "disk_removed"):
            self._record(kind, keys)

    def readvertise(self, key: BlockKey) -> None:
        """A save found `key` already held: report it again, so a directory that lost
        it (Redis restarted or flushed) learns it back."""
        self._record("stored", [key])
        disk = self.stack.disk
        if disk is not None and disk.entry(key) is not None:
            self._record("disk_stored", [key])

    def busy(self) -> bool:
        """Tier writes are queued or running (their events are still to come)."""
        disk = self.stack.disk
        if disk is not None and not disk.write_queue_idle() and disk.gate.retry_in() <= 0:
            return True
        return self.redis_pages is not None and self.redis_pages.pending()

    def drain_events(self) -> StoreEvents:
        with self._lock:
            events, self._events = self._events, StoreEvents()
            return events

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    # -- write path ----------------------------------------------------------------------
    def contains(self, key: BlockKey) -> bool:
        return self.stack.contains(key)

    def reserve_many(
        self, keys: Sequence[BlockKey], positions: Sequence[int],
        parents: Sequence[BlockKey | None],
    ) -> list[int | None]:
        """DRAM arena rows for a whole save job (one lock round trip): None where the
        key is held already or there is no room. `commit` or `abort` each row's key."""
        rows = self.stack.reserve_many(keys, positions, parents)
        for key, row in zip(keys, rows, strict=True):
            if row is None:
                self._count("put_skipped_present" if self.stack.contains(key)
                            else "put_rejected_full")
        return rows

    def commit(self, key: BlockKey) -> None:
        self.stack.commit(key)
        with self._lock:
            self.counters["put_pages"] += 1
            self._events.stored.append(key.chain)

    def abort(self, key: BlockKey) -> None:
        self.stack.abort(key)

    # -- read path -----------------------------------------------------------------------
    def acquire_prefix(self, keys: Sequence[BlockKey]) -> list[int]:
        """DRAM arena rows of the longest prefix of `keys` any tier holds (promoted
        into DRAM first), held until `release_many`."""
        start = time.perf_counter()
        rows = self.stack.acquire_prefix(keys)
        with self._lock:
            self.counters["get_hits"] += len(rows)
            self.counters["get_misses"] += int(len(rows) < len(keys))
        elapsed = time.perf_counter() - start
        self.get_latency.add(elapsed)
        latency_sink.record("get", elapsed)  # symram:page_get_duration_seconds
        return rows

    def remotes_reachable(self) -> bool:
        return self.stack.remotes_reachable()

    def release_many(self, keys: Sequence[BlockKey]) -> None:
        self.stack.release_many(keys)

    def flush(self, timeout: float | None = None) -> None:
        self.stack.flush(timeout)

    def stats(self) -> dict[str, float]:
        out = self.stack.stats()
        with self._lock:
            out.update({f"store_{k}": float(v) for k, v in self.counters.items()})
        out["get_p50_s"] = self.get_latency.quantile(0.5)
        out["get_p95_s"] = self.get_latency.quantile(0.95)
        return out

    def close(self) -> None:
        self.stack.close()

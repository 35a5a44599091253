"""Promotion: copying pages up into DRAM from the disk tier and the remote tiers.

The stack is inclusive: a page promoted from disk stays on disk, so a later DRAM
eviction of it costs nothing. Remote tiers (other engines' slots of a shared
disk_path, the Redis page tier) are read only on a local miss, and best effort: a
remote tier that fails to read counts as a miss, never as an error of the stack.

A page brought in from a remote tier remembers where from (``RemoteOrigins``): one
that another engine's slot of the shared disk holds must not be written to this
engine's slot as well.

Several pages are promoted in parallel on the prefetch pool, so one page's read
overlaps another's checksum and a disk hit of n pages keeps several reads in flight.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.disk import DiskTier
from symram_vllm.tiers.dram import DramTier, DramTierFull
from symram_vllm.tiers.policy import BlockLedger, PolicyConfig
from symram_vllm.tiers.stack_counters import StackCounters

logger = logging.getLogger(__name__)

# Tells the stack's owner that `key` entered or left a tier ("remote_loaded", ...).
TierEventReporter = Callable[[str, BlockKey], None]
# Bounded: an entry whose page left DRAM unnoticed must not live forever.
MAX_REMOTE_ORIGINS = 1 << 18
PEER_DISK = "peer_disk"  # PeerDiskReader.name: another engine's slot of the shared disk


class RemoteTier(Protocol):
    """A tier other engines fill: read into a DRAM slot on a local miss."""

    name: str

    def read_into(self, key: BlockKey, out: torch.Tensor) -> bool: ...

    # False while the tier cannot be asked (a Redis link waiting to reconnect): its
    # misses then say nothing about what it holds.
    @property
    def reachable(self) -> bool: ...

    def stats(self) -> dict[str, float]: ...

    def close(self) -> None: ...


class RemoteOrigins:
    """Which remote tier each page promoted from one came from (oldest forgotten first)."""

    def __init__(self, limit: int = MAX_REMOTE_ORIGINS) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._origin: dict[BlockKey, str] = {}

    def remember(self, key: BlockKey, tier: str) -> None:
        with self._lock:
            if len(self._origin) >= self._limit:
                self._origin.pop(next(iter(self._origin)))
            self._origin[key] = tier

    def forget(self, key: BlockKey) -> str | None:
        with self._lock:
            return self._origin.pop(key, None)

    def on_peer_disk(self, key: BlockKey) -> bool:
        """Another engine's slot of the shared disk holds the page already."""
        with self._lock:
            return self._origin.get(key) == PEER_DISK


class Promoter:
    def __init__(
        self,
        dram: DramTier,
        disk: DiskTier | None,
        remotes: Sequence[RemoteTier],
        *,
        ledger: BlockLedger,
        config: PolicyConfig,
        clock: Callable[[], float],
        counters: StackCounters,
        origins: RemoteOrigins,
        report: TierEventReporter,
    ) -> None:
        self.dram = dram
        self.disk = disk
        self.remotes = remotes
        self.ledger = ledger
        self.config = config
        self.clock = clock
        self.counters = counters
        self.origins = origins
        self._report = report
        self._pool = ThreadPoolExecutor(config.prefetch_workers, "symram-prefetch")

    def promote(self, key: BlockKey) -> bool:
        """Copy a disk page into a DRAM slot. True if the key is in DRAM afterwards."""
        if self.disk is None or not self.config.promote_on_hit:
            return False
        entry = self.disk.entry(key)
        if entry is None or entry.payload_len != self.dram.page_bytes:
            return False
        try:
            slot = self.dram.reserve(key)
        except DramTierFull:
            self.counters.count("promotion_failures")
            return False
        if slot is None:
            return self.dram.exists(key)  # promoted concurrently
        if self.disk.get(key, out=slot) is None:
            self.dram.abort(key)
            self.counters.count("promotion_failures")
            return False
        self.ledger.touch(key, self.clock(), entry.position)
        self.dram.commit(key)
        self.counters.count("promotions")
        return True

    def promote_remote(self, key: BlockKey) -> str | None:
        """Copy `key`'s page from the first remote tier that has it into a DRAM slot.
        Returns that tier's name, or None (a miss everywhere, or no DRAM room)."""
        try:
            slot = self.dram.reserve(key)
        except DramTierFull:
            self.counters.count("remote_promotion_failures")
            return None
        if slot is None:
            return "dram" if self.dram.exists(key) else None  # promoted concurrently
        for remote in self.remotes:
            try:
                found = remote.read_into(key, slot)
            except Exception:  # a remote tier is best effort: a failure is a miss
                logger.exception("symram: reading %s from %s failed", key, remote.name)
                found = False
            if found:
                self.ledger.touch(key, self.clock())
                self.origins.remember(key, remote.name)
                self.counters.remote_hit(remote.name)
                self.dram.commit(key)
                self._report("remote_loaded", key)
                return remote.name
        self.dram.abort(key)
        self.counters.count("remote_misses")
        return None

    def bring_up(self, key: BlockKey) -> str | None:
        """Promote one page into DRAM; the tier it came from, None if none had it."""
        if self.dram.exists(key):
            return "dram"
        if self.promote(key):
            return "disk"
        return self.promote_remote(key) if self.remotes else None

    def bring_up_prefix(self, keys: Sequence[BlockKey]) -> dict[BlockKey, str]:
        """Promote the pages of `keys` that are not in DRAM, in parallel: the tier each
        came from, up to the first page no tier had."""
        missing = [key for key in keys if not self.dram.exists(key)]
        origin: dict[BlockKey, str] = {}
        futures = [self._pool.submit(self.bring_up, key) for key in missing]
        for key, fut in zip(missing, futures, strict=True):
            tier = fut.result()
            if tier is None:
                break  # later pages are useless without this one
            origin[key] = tier
        return origin

    def prefetch(self, keys: Iterable[BlockKey]) -> Future[int]:
        """Promote `keys` from disk to DRAM ahead of need, in parallel on the pool.
        The future resolves to how many of `keys` are DRAM-resident afterwards."""
        wanted = list(dict.fromkeys(keys))
        result: Future[int] = Future()
        if not wanted:
            result.set_result(0)
            return result
        lock = threading.Lock()
        tally = {"left": len(wanted), "resident": 0}

        def bring_up(key: BlockKey) -> bool:
            if self.dram.exists(key):
                return True
            promoted = self.promote(key)
            if promoted:
                self.counters.count("prefetched")
            return promoted

        def finished(fut: Future[bool]) -> None:
            ok = fut.exception() is None and fut.result()
            with lock:
                tally["left"] -= 1
                tally["resident"] += int(ok)
                last = tally["left"] == 0
            if last:
                result.set_result(tally["resident"])

        for key in wanted:
            self._pool.submit(bring_up, key).add_done_callback(finished)
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True)

"""The save path of the tier stack: DRAM slots a save fills in place, then commits.

A save reserves slots first (one DRAM lock round trip for a whole job), the
connector copies the pages straight into them, and each key is then committed
(visible to reads, written through to disk or offered to the Redis page tier as
the policy says) or aborted. A reserved slot is not evictable, so a write-through
may copy it after the commit has begun.

Back-pressure happens here, before a slot is taken: with DRAM full, the saver
waits for disk-queue room (``WriteBack.wait_for_room``) instead of an eviction
blocking under the DRAM lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.dram import DramTier, DramTierFull
from symram_vllm.tiers.policy import BlockLedger
from symram_vllm.tiers.stack_counters import StackCounters
from symram_vllm.tiers.write_back import WriteBack


class RemoteWriter(Protocol):
    def offer(self, key: BlockKey, page: torch.Tensor) -> bool: ...


class SaveSlots:
    def __init__(
        self,
        dram: DramTier,
        *,
        ledger: BlockLedger,
        clock: Callable[[], float],
        counters: StackCounters,
        write_back: WriteBack,
        remote_writer: RemoteWriter | None,
        contains: Callable[[BlockKey], bool],
    ) -> None:
        self.dram = dram
        self.ledger = ledger
        self.clock = clock
        self.counters = counters
        self.write_back = write_back
        self.remote_writer = remote_writer
        self._contains = contains  # in any local tier: a held page is not saved again
        self._lock = threading.Lock()
        self._reserved: dict[BlockKey, torch.Tensor] = {}

    def reserve(
        self, key: BlockKey, position: int = 0, parent: BlockKey | None = None
    ) -> torch.Tensor | None:
        """A DRAM slot to fill for `key` (then `commit` or `abort`); None if the key is
        already held or nothing can be evicted. `position` is the block's index in
        its prefix (its recompute cost); `parent` the block before it in the chain
        (keeps heads of cached chains from being evicted before their tails)."""
        if self._contains(key):
            return None
        self.write_back.wait_for_room()
        try:
            slot = self.dram.reserve(key)
        except DramTierFull:
            self.counters.count("put_rejected_full")
            return None
        if slot is not None:
            self.ledger.touch(key, self.clock(), position, parent)
            with self._lock:
                self._reserved[key] = slot
        return slot

    def reserve_many(
        self, keys: Sequence[BlockKey], positions: Sequence[int],
        parents: Sequence[BlockKey | None],
    ) -> list[int | None]:
        """`reserve` for a whole save job: arena rows (None: held already, or no room),
        taken in one DRAM lock round trip. Fill the rows, then `commit` or `abort`
        each reserved key."""
        fresh = [key for key in keys if not self._contains(key)]
        if not fresh:
            return [None] * len(keys)
        self.write_back.wait_for_room()
        wanted = set(fresh)
        rows = self.dram.reserve_rows([k for k in keys if k in wanted])
        by_key = dict(zip([k for k in keys if k in wanted], rows, strict=True))
        out: list[int | None] = []
        now = self.clock()
        for key, position, parent in zip(keys, positions, parents, strict=True):
            row = by_key.pop(key, None)
            out.append(row)
            if row is None:
                continue
            self.ledger.touch(key, now, position, parent)
            with self._lock:
                self._reserved[key] = self.dram.arena[row]
        if any(r is None for r in rows):
            self.counters.count("put_rejected_full", sum(r is None for r in rows))
        return out

    def commit(self, key: BlockKey) -> None:
        with self._lock:
            slot = self._reserved.pop(key)
        meta = self.ledger.touch(key, self.clock())
        if self.write_back.write_through_due(meta.hits):
            # The slot is still reserved, hence not evictable, while set_async copies it.
            self.write_back.write_through(key, slot, meta.position)
        if self.remote_writer is not None and self.remote_writer.offer(key, slot):
            self.counters.count("remote_offered")
        self.dram.commit(key)

    def abort(self, key: BlockKey) -> None:
        with self._lock:
            self._reserved.pop(key, None)
        self.dram.abort(key)
        if not self._contains(key):
            self.ledger.forget(key)

    def put(
        self, key: BlockKey, page: torch.Tensor, position: int, parent: BlockKey | None
    ) -> bool:
        """Store a page (copied). True if the stack holds it afterwards."""
        if self._contains(key):
            return True
        slot = self.reserve(key, position, parent)
        if slot is None:
            if self._contains(key):
                return True
            return self.write_back.store_direct(key, page, position, parent)
        try:
            slot.copy_(page.reshape(-1))
        except BaseException:
            self.abort(key)
            raise
        self.commit(key)
        return True

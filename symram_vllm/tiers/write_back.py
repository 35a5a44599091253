"""Write-back: every way a page of the tier stack reaches the disk tier.

What reaches disk depends on the policy:

* ``write_back``: a page evicted from DRAM is written to disk, if the cost model
  says a disk hit beats recomputing it; with ``background_writeback_s`` a cleaner
  thread also copies DRAM-only pages while the disk is idle, so that a later
  eviction finds them there and costs nothing;
* ``write_through_selective``: a page is copied to disk once it has N hits (N = 0:
  at save); cold pages evicted from DRAM are dropped.

Whatever the policy, a page goes to disk directly when DRAM is full of pinned pages,
and ``flush`` copies everything DRAM holds. A page promoted from another engine's
slot of the shared disk is never written to this engine's slot: one copy serves both.

DRAM evictions run under the DRAM lock, so they hand pages to the disk queue
without blocking (``block=False``); the back-pressure happens earlier, in
``wait_for_room``, where a saver waits for disk-queue room while DRAM is full.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.disk import DiskTier
from symram_vllm.tiers.dram import DramTier
from symram_vllm.tiers.policy import BlockLedger, PlacementPolicy, PolicyConfig
from symram_vllm.tiers.promotion import PEER_DISK, RemoteOrigins, TierEventReporter
from symram_vllm.tiers.stack_counters import StackCounters

logger = logging.getLogger(__name__)


class WriteBack:
    def __init__(
        self,
        dram: DramTier,
        disk: DiskTier | None,
        *,
        ledger: BlockLedger,
        config: PolicyConfig,
        clock: Callable[[], float],
        placement: PlacementPolicy,
        counters: StackCounters,
        origins: RemoteOrigins,
        report: TierEventReporter,
        removed: Callable[[BlockKey], None],
        contains: Callable[[BlockKey], bool],
    ) -> None:
        self.dram = dram
        self.disk = disk
        self.ledger = ledger
        self.config = config
        self.clock = clock
        self.placement = placement
        self.counters = counters
        self.origins = origins
        self._report = report
        self._removed = removed  # a page left every tier: the stack forgets it, tells its owner
        self._contains = contains
        self._stop = threading.Event()
        self._cleaner: threading.Thread | None = None
        if (
            disk is not None
            and config.write_policy == "write_back"
            and config.background_writeback_s > 0
        ):
            self._cleaner = threading.Thread(
                target=self._clean_loop, name="symram-writeback", daemon=True
            )
            self._cleaner.start()

    def wait_for_room(self) -> None:
        """Back-pressure: with DRAM full, the saver (not the DRAM lock) waits for disk."""
        if (
            self.disk is None
            or self.config.write_policy != "write_back"
            or self.dram.free_slots() > 0
        ):
            return
        self.counters.count("save_waits")
        if not self.disk.wait_for_room(self.config.save_wait_s):
            self.counters.count("save_wait_timeouts")

    def write_through_due(self, hits: int) -> bool:
        return self.disk is not None and self.placement.write_through_due(hits)

    def write_through(self, key: BlockKey, page: torch.Tensor, position: int) -> None:
        assert self.disk is not None
        if self.disk.exists(key):
            return
        fut = self._write(key, page, position, block=False)
        self.counters.count("write_through")
        if fut.done() and not fut.result():
            self.counters.count("writeback_dropped")

    def store_direct(
        self, key: BlockKey, page: torch.Tensor, position: int, parent: BlockKey | None
    ) -> bool:
        """DRAM is full of pinned pages: place the page on disk if it is worth it."""
        if self.disk is None or not self.placement.worth_storing("disk", page.numel(), position):
            return False
        self.counters.count("put_to_disk_direct")
        stored = self.disk.set(key, page, position=position)
        if stored:
            self.ledger.touch(key, self.clock(), position, parent)
            self._report("disk_stored", key)
        return stored

    def on_dram_evict(self, key: BlockKey, page: torch.Tensor) -> None:
        # Runs under the DRAM lock: never block here.
        disk = self.disk
        if disk is not None and disk.exists(key):
            return  # inclusive hierarchy: the disk copy remains
        meta = self.ledger.get(key)
        position = meta.position if meta else 0
        if self.origins.forget(key) == PEER_DISK:
            # Another engine's slot of the shared disk holds it: no second copy.
            self.counters.count("cold_dropped")
        elif disk is None or self.config.write_policy != "write_back":
            self.counters.count("cold_dropped")
        elif not self.placement.worth_storing("disk", page.numel(), position):
            self.counters.count("writeback_skipped_cost")
        else:
            fut = self._write(key, page, position, block=False)
            if not (fut.done() and not fut.result()):
                self.counters.count("writebacks")
                fut.add_done_callback(lambda f: f.result() or self._lost(key))
                return
            self.counters.count("writeback_dropped")
        self._removed(key)

    def write_back_idle(self, limit: int | None = None) -> int:
        """Copy DRAM-only pages to disk while the disk has nothing else to write
        (oldest first, one write at a time, each waited for, so saves and evictions
        always find the queue free). Returns how many were written."""
        disk = self.disk
        if disk is None:
            return 0
        queued = 0
        for key in list(self.dram.keys()):
            if self._stop.is_set() or (limit is not None and queued >= limit):
                break
            if self.origins.on_peer_disk(key) or disk.exists(key):
                continue
            if not disk.write_queue_idle():
                break  # saves and evictions come first
            # The page is copied into a staging buffer before set_async returns.
            written = self._write_resident(key, block=False)
            if written is None:
                continue
            if not written.result():
                break  # queue taken meanwhile, or the disk refused: try next round
            queued += 1
        if queued:
            self.counters.count("background_writebacks", queued)
        return queued

    def flush(self, timeout: float | None = None) -> None:
        """Copy every DRAM page that is not on disk yet to disk, and wait for it."""
        if self.disk is None:
            return
        for key in list(self.dram.keys()):
            if self.origins.on_peer_disk(key):
                continue  # another engine's slot of the shared disk has it already
            self._write_resident(key, block=None)  # counts a DRAM hit: flushes are rare
        self.disk.flush(timeout)

    def close(self) -> None:
        self._stop.set()
        if self._cleaner is not None:
            self._cleaner.join(timeout=10)

    def _write_resident(self, key: BlockKey, block: bool | None) -> Future[bool] | None:
        """Queue the DRAM page of `key` for disk; None if it left DRAM meanwhile."""
        view = self.dram.acquire(key)
        if view is None:
            return None
        try:
            meta = self.ledger.get(key)
            return self._write(key, view, meta.position if meta else 0, block=block)
        finally:
            self.dram.release(key)

    def _write(
        self, key: BlockKey, page: torch.Tensor, position: int, block: bool | None
    ) -> Future[bool]:
        """`disk.set_async`, reporting the page to the owner once it is on disk."""
        assert self.disk is not None
        fut = self.disk.set_async(key, page, position=position, block=block)
        fut.add_done_callback(
            lambda f: f.exception() is None and f.result() and self._report("disk_stored", key)
        )
        return fut

    def _lost(self, key: BlockKey) -> None:
        self.counters.count("writeback_dropped")
        if not self._contains(key):
            self._removed(key)

    def _clean_loop(self) -> None:
        while not self._stop.wait(self.config.background_writeback_s):
            try:
                self.write_back_idle()
            except Exception:  # the cleaner must outlive one bad page
                logger.exception("symram background write-back failed")

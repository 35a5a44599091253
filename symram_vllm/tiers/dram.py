"""Host-DRAM tier: a byte-budgeted arena of fixed-size page slots with LRU eviction.

The arena is one tensor allocated once, so no page ever costs a malloc on the hot
path, and on CUDA hosts it is page-locked (pinned) so device copies run at full
PCIe/NVLink speed and asynchronously. Slots are handed out zero-copy:
``reserve`` gives the writer a view to fill, ``commit`` publishes it, and
``acquire``/``release`` bracket a reader so a page cannot be evicted mid-copy.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch

from symram_vllm.capability import on_numa_node_of, pinned_memory_supported
from symram_vllm.keys import BlockKey
from symram_vllm.tiers.base import Tier, TierStats
from symram_vllm.tiers.pins import Pins

EvictCallback = Callable[[BlockKey, torch.Tensor], None]
# Picks the victim among the least recently used evictable keys (oldest first).
VictimChooser = Callable[[list[BlockKey]], BlockKey]


class DramTierFull(RuntimeError):
    """Every slot is pinned or being read/written: nothing can be evicted."""


class DramTier(Tier):
    name = "dram"

    def __init__(
        self,
        page_bytes: int,
        budget_bytes: int,
        *,
        pin_memory: bool | None = None,
        on_evict: EvictCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        victim_chooser: VictimChooser | None = None,
        victim_window: int = 16,
        device_index: int | None = None,
    ) -> None:
        if page_bytes <= 0:
            raise ValueError(f"page_bytes must be positive, got {page_bytes}")
        num_slots = budget_bytes // page_bytes
        if num_slots < 1:
            raise ValueError(
                f"DRAM budget of {budget_bytes} bytes holds no page of {page_bytes} bytes; "
                f"raise SYMRAM_DRAM_BYTES (or dram_bytes in the config) to at least {page_bytes}"
            )
        self.page_bytes = page_bytes
        self.num_slots = num_slots
        self.pinned = pinned_memory_supported() if pin_memory is None else pin_memory
        # torch.empty does not touch the pages, so an unused budget costs no RSS on
        # CPU hosts; pinned allocations are committed up front, as CUDA requires.
        self.placement = "not pinned: no NUMA placement"
        if self.pinned:
            # Pinned pages are touched at allocation: do it next to the GPU it serves.
            with on_numa_node_of(device_index) as self.placement:
                self.arena = torch.empty((num_slots, page_bytes), dtype=torch.uint8,
                                         pin_memory=True)
        else:
            self.arena = torch.empty((num_slots, page_bytes), dtype=torch.uint8)
        self._lock = threading.RLock()
        self._lru: OrderedDict[BlockKey, int] = OrderedDict()
        self._reserved: dict[BlockKey, int] = {}
        self._readers: dict[BlockKey, int] = {}
        self._pins = Pins(clock)
        # A min-heap: the lowest free slot goes first, so a job's rows are usually one
        # consecutive run of the arena (one copy per segment instead of a scatter).
        self._free: list[int] = list(range(num_slots))
        self._on_evict = on_evict
        # Scoring only the `victim_window` oldest candidates keeps eviction O(window)
        # (sampled, like Redis' approximated LRU/LFU) instead of O(slots).
        self._victim_chooser = victim_chooser
        self._victim_window = max(1, victim_window)
        self._stats = TierStats(bytes_capacity=num_slots * page_bytes)

    # -- the three verbs ---------------------------------------------------------------
    def exists(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._lru

    def get(self, key: BlockKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
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

    def set(self, key: BlockKey, page: torch.Tensor) -> bool:
        if page.numel() != self.page_bytes or page.dtype != torch.uint8:
            raise ValueError(
                f"page must be {self.page_bytes} uint8 bytes, got {page.numel()} {page.dtype}"
            )
        slot = self.reserve(key)
        if slot is None:
            return key in self._lru
        slot.copy_(page)
        self.commit(key)
        return True

    def delete(self, key: BlockKey) -> bool:
        with self._lock:
            if key in self._readers or key not in self._lru:
                return False
            slot = self._lru.pop(key)
            self._pins.unpin(key)
            heapq.heappush(self._free, slot)
            return True

    def keys(self) -> Iterator[BlockKey]:
        with self._lock:
            return iter(list(self._lru))

    def stats(self) -> TierStats:
        with self._lock:
            self._stats.pages = len(self._lru)
            self._stats.bytes_used = len(self._lru) * self.page_bytes
            self._stats.extra["pinned_host_memory"] = float(self.pinned)
            return TierStats(**{**self._stats.__dict__, "extra": dict(self._stats.extra)})

    # -- zero-copy slot protocol -------------------------------------------------------
    def reserve(self, key: BlockKey) -> torch.Tensor | None:
        """A writable slot for `key`, or None if `key` is already stored or being written.

        Raises DramTierFull when every slot is pinned or in use.
        """
        with self._lock:
            if key in self._lru or key in self._reserved:
                return None
            slot = self._take_slot()
            self._reserved[key] = slot
            return self.arena[slot]

    def commit(self, key: BlockKey) -> None:
        with self._lock:
            slot = self._reserved.pop(key)
            self._lru[key] = slot
            self._stats.puts += 1

    def abort(self, key: BlockKey) -> None:
        with self._lock:
            slot = self._reserved.pop(key, None)
            if slot is not None:
                heapq.heappush(self._free, slot)

    def acquire(self, key: BlockKey) -> torch.Tensor | None:
        """Read view of a stored page, protected from eviction until `release`."""
        with self._lock:
            slot = self._lru.get(key)
            if slot is None:
                self._stats.misses += 1
                return None
            self._lru.move_to_end(key)
            self._readers[key] = self._readers.get(key, 0) + 1
            self._stats.hits += 1
            return self.arena[slot]

    def release(self, key: BlockKey) -> None:
        with self._lock:
            count = self._readers.get(key, 0) - 1
            if count <= 0:
                self._readers.pop(key, None)
            else:
                self._readers[key] = count

    # -- whole jobs in one lock round trip ----------------------------------------------
    def reserve_rows(self, keys: Sequence[BlockKey]) -> list[int | None]:
        """Arena rows to fill for `keys` (then ``commit``/``abort`` each), taken under
        one lock. None for a key already stored or being written, and for every key
        once nothing more can be evicted. Free slots come off a min-heap in ascending
        order, so a job's rows are usually one consecutive run: one copy per segment."""
        rows: list[int | None] = []
        with self._lock:
            full = False
            for key in keys:
                if full or key in self._lru or key in self._reserved:
                    rows.append(None)
                    continue
                try:
                    slot = self._take_slot()
                except DramTierFull:
                    full = True
                    rows.append(None)
                    continue
                self._reserved[key] = slot
                rows.append(slot)
        return rows

    def acquire_rows(self, keys: Sequence[BlockKey]) -> list[int]:
        """Rows of the longest prefix of `keys` stored here, each protected from
        eviction until ``release``; one lock round trip."""
        rows: list[int] = []
        with self._lock:
            for key in keys:
                slot = self._lru.get(key)
                if slot is None:
                    self._stats.misses += 1
                    break
                self._lru.move_to_end(key)
                self._readers[key] = self._readers.get(key, 0) + 1
                rows.append(slot)
            self._stats.hits += len(rows)
        return rows

    def release_many(self, keys: Sequence[BlockKey]) -> None:
        with self._lock:
            for key in keys:
                self.release(key)

    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)

    # -- pinning -----------------------------------------------------------------------
    def pin(self, key: BlockKey, ttl_s: float | None = None) -> bool:
        """Keep `key` resident for `ttl_s` seconds (forever when None)."""
        with self._lock:
            if key not in self._lru:
                return False
            self._pins.pin(key, ttl_s)
            return True

    def unpin(self, key: BlockKey) -> None:
        with self._lock:
            self._pins.unpin(key)

    def is_pinned(self, key: BlockKey) -> bool:
        with self._lock:
            return self._pins.active(key)

    # -- eviction ----------------------------------------------------------------------
    def _take_slot(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        victim = self._pick_victim()
        if victim is not None:
            slot = self._lru.pop(victim)
            self._stats.evictions += 1
            if self._on_evict is not None:
                self._on_evict(victim, self.arena[slot])
            return slot
        raise DramTierFull(
            f"all {self.num_slots} DRAM slots are pinned or in use; unpin pages or raise "
            "SYMRAM_DRAM_BYTES"
        )

    def _pick_victim(self) -> BlockKey | None:
        eligible = (k for k in self._lru if k not in self._readers and not self._pins.active(k))
        if self._victim_chooser is None:
            return next(eligible, None)  # oldest first: plain LRU
        window = list(itertools.islice(eligible, self._victim_window))
        return self._victim_chooser(window) if window else None

    def close(self) -> None:
        with self._lock:
            self._lru.clear()
            self._reserved.clear()
            self._readers.clear()
            self._free = list(range(self.num_slots))

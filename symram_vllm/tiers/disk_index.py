"""The disk tier's book: the pages on disk (least recently used first), the bytes they
hold against the budget, pins, the tier's counters, and the choice of eviction victims.

One re-entrant lock guards all of it, and the write queue's pending map too
(``disk_writer``): a page moves from pending to indexed under it, so a reader never
finds it in neither place. Re-entrant: eviction runs with it held and the victim
chooser calls back into the tier (the stack's policy asks ``DiskTier.entry`` for a
page's position), and the tier's compound steps call the book's methods while holding
it. It covers bookkeeping only: file I/O happens outside it, except the cheap rename
that detaches an evicted file (``PageFiles.detach``).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.base import TierStats
from symram_vllm.tiers.disk_housekeeping import PageFiles
from symram_vllm.tiers.disk_layout import DiskEntry
from symram_vllm.tiers.pins import Pins

VictimChooser = Callable[[list[BlockKey]], BlockKey]

# The disk tier's own figures, reported in TierStats.extra (in this order).
COUNTERS = (
    "dropped_writes", "write_errors", "read_errors", "quarantined",
    "temp_files_removed", "vanished_files", "pages_scanned",
    "pages_from_manifest", "manifest_rejected", "bytes_written", "bytes_read",
    "foreign_files", "zstd_pages", "zstd_raw_bytes", "zstd_stored_bytes",
    "zstd_incompressible", "auth_failures", "plaintext_rejected",
    "other_key_pages", "modes_tightened",
)


class DiskIndex:
    def __init__(
        self,
        budget_bytes: int,
        files: PageFiles,
        clock: Callable[[], float],
        victim_chooser: VictimChooser | None,
        victim_window: int,
    ) -> None:
        self.lock = threading.RLock()
        self.budget_bytes = budget_bytes
        self.files = files
        # LRU candidates the chooser sees; the tier stack sets both from its policy.
        self.victim_chooser = victim_chooser
        self.victim_window = victim_window
        self.entries: OrderedDict[BlockKey, DiskEntry] = OrderedDict()
        self.bytes_used = 0
        # Bytes of writes in flight: counted against the budget before their file exists.
        self.reserved = 0
        self.stats = TierStats(bytes_capacity=budget_bytes)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.pins = Pins(clock)

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n

    # -- entries -------------------------------------------------------------------------
    def add_locked(self, key: BlockKey, entry: DiskEntry) -> None:
        self.entries[key] = entry
        self.bytes_used += entry.file_bytes

    def touch(self, key: BlockKey) -> None:
        """Mark `key` most recently used (if it is still indexed)."""
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)

    def remove_locked(self, key: BlockKey, trash: list[Path]) -> bool:
        """Drop `key` and its pin, its file detached into `trash`. True if it was indexed."""
        entry = self.entries.pop(key, None)
        self.pins.unpin(key)
        if entry is None:
            return False
        self.bytes_used -= entry.file_bytes
        self.files.detach(key, trash)
        return True

    def forget(self, key: BlockKey, entry: DiskEntry) -> bool:
        """Drop `key` if the index still maps it to `entry` (not a newer write); its file
        is the caller's to deal with (gone, or quarantined)."""
        with self.lock:
            if self.entries.get(key) is not entry:
                return False
            del self.entries[key]
            self.bytes_used -= entry.file_bytes
            self.pins.unpin(key)
        return True

    # -- eviction ------------------------------------------------------------------------
    def make_room_locked(self, need: int, trash: list[Path]) -> list[BlockKey] | None:
        """Evict until `need` more bytes fit; the victims, or None if pins prevent it.
        Victim files are moved to `trash` for the caller to unlink after the lock."""
        victims: list[BlockKey] = []
        while self.bytes_used + self.reserved + need > self.budget_bytes:
            victim = self._pick_victim()
            if victim is None:
                return None if need else victims
            entry = self.entries.pop(victim)
            self.bytes_used -= entry.file_bytes
            self.stats.evictions += 1
            self.files.detach(victim, trash)
            victims.append(victim)
        return victims

    def _pick_victim(self) -> BlockKey | None:
        eligible = (k for k in self.entries if not self.pins.active(k))
        if self.victim_chooser is None:
            return next(eligible, None)
        window = list(itertools.islice(eligible, self.victim_window))
        return self.victim_chooser(window) if window else None

    # -- pins ----------------------------------------------------------------------------
    def pin(self, key: BlockKey, ttl_s: float | None) -> None:
        with self.lock:
            self.pins.pin(key, ttl_s)

    def unpin(self, key: BlockKey) -> None:
        with self.lock:
            self.pins.unpin(key)

    def is_pinned(self, key: BlockKey) -> bool:
        with self.lock:
            return self.pins.active(key)

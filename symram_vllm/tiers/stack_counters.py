"""The tier stack's counters: what its paths did, reported as ``stack_*`` stats.

One object is shared by the stack's collaborators (promotion, disk writes) so each
counts where the event happens, under one lock, and every name exists (at 0) from
the start: a dashboard sees a counter before its first event.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

COUNTER_NAMES = (
    "dram_hits", "disk_hits", "misses", "promotions", "promotion_failures",
    "writebacks", "writeback_dropped", "writeback_skipped_cost", "cold_dropped",
    "write_through", "put_rejected_full", "put_to_disk_direct", "save_waits",
    "save_wait_timeouts", "prefetched", "removed", "background_writebacks",
    "remote_hits", "remote_misses", "remote_promotion_failures", "remote_offered",
)


class StackCounters:
    def __init__(self, remote_names: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        for name in remote_names:
            self._counts[f"{name}_hits"] = 0  # one hit counter per remote tier

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def remote_hit(self, tier: str) -> None:
        """A page came from remote tier `tier`: counted in total and per tier at once."""
        with self._lock:
            self._counts["remote_hits"] += 1
            self._counts[f"{tier}_hits"] += 1

    def as_stats(self) -> dict[str, float]:
        with self._lock:
            return {f"stack_{k}": float(v) for k, v in self._counts.items()}

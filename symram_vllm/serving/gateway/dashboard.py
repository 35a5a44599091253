"""/dashboard: tier occupancy and hit rates per engine, and a live timeline of tier
events, derived from the deltas of each engine's ``/symram/stats`` counters between
two polls. ``/dashboard/data`` is the same as JSON."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Timeline event -> TierStack.stats() counters whose increase counts as that event.
EVENTS: dict[str, tuple[str, ...]] = {
    "ingest": ("dram_puts",),
    "prefetch": ("stack_prefetched",),
    "evict": ("dram_evictions", "disk_evictions"),
    "hit": ("stack_dram_hits", "stack_disk_hits"),
    "miss": ("stack_misses",),
}

DISK_ERRORS = ("disk_write_errors", "disk_read_errors", "disk_integrity_failures")


def _total(stats: dict[str, float], names: tuple[str, ...]) -> float:
    return sum(stats.get(n, 0.0) for n in names)


class Timeline:
    """Per-instance event counts between consecutive stats polls, newest last."""

    def __init__(self, history: int = 300) -> None:
        self.history = history
        self.points: deque[dict[str, Any]] = deque(maxlen=history)
        self._last: dict[str, dict[str, float]] = {}

    def record(self, instance: str, stats: dict[str, float], t: float | None = None) -> None:
        t = time.time() if t is None else t
        previous = self._last.get(instance)
        self._last[instance] = stats
        if previous is None:
            return  # the first poll only sets the baseline
        point: dict[str, Any] = {"t": round(t, 3), "instance": instance}
        for event, names in EVENTS.items():
            now, before = _total(stats, names), _total(previous, names)
            # A counter that went down means the engine restarted: count from zero.
            point[event] = now - before if now >= before else now
        self.points.append(point)

    def instances(self) -> list[str]:
        return sorted({point["instance"] for point in self.points})

    def series(self, bucket_s: float = 1.0, instance: str | None = None
               ) -> dict[str, list[float]]:
        """Events summed over instances (or of one `instance`), on a common time axis
        (for the chart): each value is the count of events in its `bucket_s` bucket."""
        buckets: dict[float, dict[str, float]] = {}
        for point in self.points:
            if instance is not None and point["instance"] != instance:
                continue
            t = round(point["t"] / bucket_s) * bucket_s
            row = buckets.setdefault(t, dict.fromkeys(EVENTS, 0.0))
            for event in EVENTS:
                row[event] += point[event]
        times = sorted(buckets)
        out: dict[str, list[float]] = {"t": times}
        for event in EVENTS:
            out[event] = [buckets[t][event] for t in times]
        return out


def occupancy(stats: dict[str, float]) -> dict[str, Any]:
    hits = _total(stats, EVENTS["hit"])
    misses = stats.get("stack_misses", 0.0)
    looked = hits + misses
    out: dict[str, Any] = {
        "dram": {"used": stats.get("dram_bytes_used", 0.0),
                 "capacity": stats.get("dram_bytes_capacity", 0.0),
                 "pages": stats.get("dram_pages", 0.0)},
        "hits": {"dram": stats.get("stack_dram_hits", 0.0),
                 "disk": stats.get("stack_disk_hits", 0.0), "miss": misses},
        "hit_rate": hits / looked if looked else None,
        "dram_hit_rate": stats.get("stack_dram_hits", 0.0) / looked if looked else None,
        "promotions": stats.get("stack_promotions", 0.0),
        "prefetched": stats.get("stack_prefetched", 0.0),
        "ingested": stats.get("dram_puts", 0.0),
        "evictions": {"dram": stats.get("dram_evictions", 0.0),
                      "disk": stats.get("disk_evictions", 0.0)},
    }
    if "disk_bytes_capacity" in stats:
        out["disk"] = {"used": stats.get("disk_bytes_used", 0.0),
                       "capacity": stats.get("disk_bytes_capacity", 0.0),
                       "pages": stats.get("disk_pages", 0.0)}
        # What an operator must notice before the hit rate drops: a failing or full disk.
        out["disk_health"] = {
            "errors": _total(stats, DISK_ERRORS),
            "quarantined": stats.get("disk_quarantined", 0.0),
            "writes_disabled": bool(stats.get("disk_writes_disabled", 0.0)),
            "write_queue": stats.get("disk_write_queue_depth", 0.0),
            "write_queue_capacity": stats.get("disk_write_queue_capacity", 0.0),
        }
    return out


def dashboard_html() -> str:
    return (STATIC_DIR / "dashboard.html").read_text()

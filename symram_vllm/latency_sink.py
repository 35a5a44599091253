"""Latency histograms, recorded where the work happens and shipped as bucket counts.

A page get (``store.py``), a load job and a save job (``connectors/job_tracker.py``, as
it takes their outcomes) each ``record(name, seconds)``. ``drain()`` hands the counts
gathered since the last call to the connector's stats (``connectors/vllm_stats.py``),
which crosses vLLM's IPC as plain lists and becomes a real Prometheus histogram in
vLLM's ``/metrics``: buckets add up across ranks and engines, which quantile gauges
cannot.

Each bucket keeps the count and the sum of its samples, so the exporter can replay the
bucket's mean ``count`` times: exact counts per bucket and an exact sum, in O(buckets)
memory whatever the request rate. No torch, no vLLM.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

# Seconds; from a DRAM page get (~10 us) to a large save on a slow disk.
BUCKETS: tuple[float, ...] = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
NAMES = ("get", "load", "save")

_lock = threading.Lock()
_counts: dict[str, list[int]] = {}
_sums: dict[str, list[float]] = {}


def record(name: str, seconds: float) -> None:
    """One sample of `name` ("get", "load" or "save")."""
    i = bisect.bisect_left(BUCKETS, seconds)  # Prometheus buckets are "<= le"
    with _lock:
        counts = _counts.get(name)
        if counts is None:
            counts = _counts[name] = [0] * (len(BUCKETS) + 1)
            _sums[name] = [0.0] * (len(BUCKETS) + 1)
        counts[i] += 1
        _sums[name][i] += seconds


def drain() -> dict[str, dict[str, list[Any]]]:
    """{name: {"counts": [...], "sums": [...]}} since the last drain (empty names left out)."""
    global _counts, _sums
    with _lock:
        counts, sums = _counts, _sums
        _counts, _sums = {}, {}
    return {name: {"counts": counts[name], "sums": sums[name]} for name in counts}


def merge(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Add `other`'s bucket counts and sums to `into` (both drain() results)."""
    for name, buckets in other.items():
        mine = into.get(name)
        if mine is None:
            into[name] = {"counts": list(buckets["counts"]), "sums": list(buckets["sums"])}
            continue
        mine["counts"] = [a + b for a, b in zip(mine["counts"], buckets["counts"], strict=True)]
        mine["sums"] = [a + b for a, b in zip(mine["sums"], buckets["sums"], strict=True)]
    return into


def replay(buckets: dict[str, list[Any]], observe: Any) -> None:
    """Call observe(value) so a histogram with BUCKETS gets these counts and sums."""
    for i, (count, total) in enumerate(zip(buckets["counts"], buckets["sums"], strict=True)):
        if count:
            mean = total / count
            if i < len(BUCKETS):  # rounding must not move the mean out of its bucket
                mean = min(mean, BUCKETS[i])
            for _ in range(int(count)):
                observe(mean)

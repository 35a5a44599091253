"""Timing helpers of the directory benchmarks: alternating arms, medians of p50/p95."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


def latencies(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def alternate(repeats: int, n: int, arms: dict[str, Callable[[], object]]) -> dict[str, dict]:
    """Per arm: median over repeats of each repeat's p50 and p95 (ms)."""
    names = list(arms)
    p50: dict[str, list[float]] = {a: [] for a in names}
    p95: dict[str, list[float]] = {a: [] for a in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples = latencies(arms[name], n)
            p50[name].append(statistics.median(samples))
            p95[name].append(percentile(samples, 0.95))
    return {
        a: {"p50_ms": ms(statistics.median(p50[a])), "p95_ms": ms(statistics.median(p95[a]))}
        for a in names
    }

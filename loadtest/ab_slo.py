"""Latency summaries, goodput and "sessions at SLO" for the A/B runner (pure functions).

Definitions (also in docs/loadtest.md):

* A point is one (arm, user count) run of a fixed, seeded workload. Its duration runs
  from the first request's start to the last request's end.
* goodput = requests that completed **and** met every per-request objective
  (TTFT <= ``ttft_s``, and TPOT <= ``tpot_s`` when set) per second of the point, as in
  ``vllm bench serve --goodput``.
* A point meets the SLO when its p95 TTFT is <= ``ttft_p95_s``, no request failed, and
  the run finished inside its time cap.
* Sessions at SLO = the largest swept user count U such that every swept count <= U
  meets the SLO (the load an arm sustains, not a lucky point above a failure). With
  repeats, a point's p95 is the median over its repeats.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Slo:
    ttft_p95_s: float = 2.0
    ttft_s: float = 2.0  # per-request objective for goodput
    tpot_s: float | None = None
    max_error_rate: float = 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=float), q))


def meets_request_slo(record: Mapping[str, Any], slo: Slo) -> bool:
    if not record.get("ok"):
        return False
    if record["ttft_s"] > slo.ttft_s:
        return False
    return slo.tpot_s is None or record["tpot_s"] <= slo.tpot_s


def summarize(records: Sequence[Mapping[str, Any]], slo: Slo, *,
              completed: bool = True) -> dict[str, Any]:
    """One point's latency, throughput, goodput and cache figures from its records."""
    ok = [r for r in records if r.get("ok")]
    errors = len(records) - len(ok)
    if records:
        begin = min(r["start"] for r in records)
        end = max(r["start"] + r.get("e2e_s", 0.0) for r in records)
        duration = max(end - begin, 1e-9)
    else:
        duration = float("nan")
    ttft = [r["ttft_s"] for r in ok]
    tpot = [r["tpot_s"] for r in ok if r["output_tokens"] > 1]
    e2e = [r["e2e_s"] for r in ok]
    prompt_tokens = sum(r["prompt_tokens"] for r in ok)
    cached_tokens = sum(r["cached_tokens"] for r in ok)
    reusable_tokens = sum(r["reusable_tokens"] for r in ok)
    good = sum(1 for r in records if meets_request_slo(r, slo))
    error_rate = errors / len(records) if records else 1.0
    summary: dict[str, Any] = {
        "requests": len(records),
        "errors": errors,
        "error_rate": error_rate,
        "completed": completed,
        "duration_s": duration,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p95_s": percentile(ttft, 95),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_mean_s": statistics.fmean(ttft) if ttft else float("nan"),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p95_s": percentile(tpot, 95),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p95_s": percentile(e2e, 95),
        "requests_per_s": len(ok) / duration if records else 0.0,
        "output_tokens_per_s": sum(r["output_tokens"] for r in ok) / duration if ok else 0.0,
        "prompt_tokens_per_s": prompt_tokens / duration if ok else 0.0,
        "goodput_rps": good / duration if records else 0.0,
        "good_requests": good,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "cached_fraction": cached_tokens / prompt_tokens if prompt_tokens else 0.0,
        "reusable_fraction": reusable_tokens / prompt_tokens if prompt_tokens else 0.0,
    }
    by_kind: dict[str, list[float]] = {}
    for r in ok:
        by_kind.setdefault(r["kind"], []).append(r["ttft_s"])
    summary["ttft_p50_s_by_kind"] = {k: percentile(v, 50) for k, v in sorted(by_kind.items())}
    summary["ttft_p95_s_by_kind"] = {k: percentile(v, 95) for k, v in sorted(by_kind.items())}
    summary["meets_slo"] = point_meets_slo(summary, slo)
    return summary


def point_meets_slo(summary: Mapping[str, Any], slo: Slo) -> bool:
    p95 = summary["ttft_p95_s"]
    return (
        bool(summary["completed"])
        and summary["requests"] > 0
        and summary["error_rate"] <= slo.max_error_rate
        and p95 == p95  # not NaN
        and p95 <= slo.ttft_p95_s
    )


def combine_repeats(summaries: Sequence[Mapping[str, Any]], slo: Slo) -> dict[str, Any]:
    """Median of each numeric figure over repeats; the SLO verdict on those medians."""
    if not summaries:
        raise ValueError("no repeats to combine")
    out: dict[str, Any] = {}
    for key, value in summaries[0].items():
        if isinstance(value, dict):  # e.g. per-kind percentiles: median per kind
            out[key] = {k: statistics.median([float(s[key][k]) for s in summaries
                                              if k in s.get(key, {})]) for k in value}
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        values = [float(s[key]) for s in summaries]
        out[key] = statistics.median(values)
    out["completed"] = all(s["completed"] for s in summaries)
    out["repeats"] = len(summaries)
    out["meets_slo"] = point_meets_slo(out, slo)
    return out


def sessions_at_slo(meets_by_users: Mapping[int, bool]) -> int:
    """Largest swept user count with every swept count up to it meeting the SLO; 0 if
    even the smallest fails (or nothing ran)."""
    best = 0
    for users in sorted(meets_by_users):
        if not meets_by_users[users]:
            break
        best = users
    return best


def sessions_ratio(symram: int, baseline: int) -> float | None:
    """symram / baseline; None when the baseline sustains no swept load (ratio unbounded)."""
    if baseline <= 0:
        return None
    return symram / baseline


def slo_dict(slo: Slo) -> dict[str, Any]:
    return asdict(slo)


def ratio_table(
    baseline: Mapping[int, Mapping[str, Any]], symram: Mapping[int, Mapping[str, Any]],
    keys: Iterable[str] = ("ttft_p50_s", "ttft_p95_s"),
) -> dict[int, dict[str, float]]:
    """baseline / symram for latency keys, per user count both arms ran (same run)."""
    table: dict[int, dict[str, float]] = {}
    for users in sorted(set(baseline) & set(symram)):
        row: dict[str, float] = {}
        for key in keys:
            b, s = baseline[users].get(key), symram[users].get(key)
            if b is not None and s:
                row[key] = float(b) / float(s)
        table[users] = row
    return table

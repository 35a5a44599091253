"""symram counters in vLLM's connector-stats pipeline, so they show up in vLLM's own
``/metrics`` (prefix ``symram:``) and in its periodic log line.

The payload is ``{"counters": {name: n}, "gauges": {name: {source: x}},
"histograms": {name: {"counts": [...], "sums": [...]}}}``: plain strings, numbers and
lists, so it survives vLLM's IPC without our classes on the receiving side.

* Counters add up (across ranks and steps).
* Gauges are kept per source process (each TP rank's worker, the scheduler): a newer
  value replaces that source's older one, and the exported value is the sum over
  sources (bytes, pages) or the maximum (flags, ratios), so TP > 1 reports the engine's
  total rather than whichever rank came last.
* Histograms (``latency_sink``) carry bucket counts and sums, exported as Prometheus
  histograms that aggregate across engines.

Exported names put the unit last (``symram:dram_used_bytes``); ``EXPORTED`` maps the
payload's internal names (shared with the tier stats) to them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

from symram_vllm import latency_sink

COUNTERS: dict[str, str] = {
    "loaded_blocks": "KV blocks loaded from symram tiers into the engine",
    "load_failed_blocks": "KV blocks whose load failed (vLLM recomputed them)",
    "saved_blocks": "KV blocks saved from the engine into symram tiers",
    "save_skipped_blocks": "KV blocks not saved (already stored, or no room)",
    "nonfinite_pages": "KV blocks not saved because they held inf/NaN (int8/fp8 codecs)",
    "load_bytes": "Bytes copied from symram tiers into the engine",
    "save_bytes": "Bytes copied from the engine into symram tiers",
    "dram_evictions": "Pages evicted from the DRAM tier",
    "dram_hits": "Page reads served from the DRAM tier",
    "disk_hits": "Page reads served from the disk tier (promoted to DRAM)",
    "tier_misses": "Page reads no tier could serve",
    "promotions": "Pages copied from disk up to DRAM",
    "prefetched_pages": "Pages promoted to DRAM by prefetch requests",
    "spilled_pages": "Pages written to disk as DRAM evicted them",
    "spill_dropped_pages": "DRAM evictions that could not be written to disk",
    "disk_evictions": "Pages evicted from the disk tier",
    "integrity_failures": "Disk pages that failed verification (quarantined, recomputed)",
    "disk_write_errors": "Disk tier write errors (ENOSPC, EIO, ...)",
    "disk_written_bytes": "Bytes written to the disk tier",
    "disk_read_bytes": "Bytes read from the disk tier",
    "remote_hits": "Page reads served by another engine's tier (peer disk slot or Redis)",
    "peer_disk_hits": "Page reads served from another engine's slot of a shared disk_path",
    "redis_hits": "Page reads served from the Redis page tier",
    "peer_disk_integrity_failures": "Peer disk pages that failed verification (not used)",
    "redis_pages_written": "Pages written to the Redis page tier",
    "redis_pages_write_dropped": "Redis page writes dropped (queue full or Redis down)",
    "redis_pages_write_rejected": "Redis page writes refused (budget, outage)",
    "redis_pages_evicted": "Pages this engine's writes evicted from the Redis page tier",
    "lookup_hit_blocks": "Blocks the directory promised for loading (own and shared tiers)",
    "redis_removed_blocks": "Redis page-tier evictions removed from the directory",
    "directory_stale_blocks": "Directory locations dropped because a load could not use them",
    "load_unreachable_misses": "Loads that missed while a remote tier (Redis) could not be "
                               "asked: recomputed, and the directory keeps its locations",
    "transfer_ops": "Device copy operations and kernel launches issued by load and save jobs",
    "load_jobs": "Load jobs finished (each moves a request's blocks in one batch)",
    "save_jobs": "Save jobs finished (each moves a request's blocks in one batch)",
    "load_job_errors": "Load jobs that raised (all their blocks became load errors)",
    "save_job_errors": "Save jobs that raised (their pages were dropped)",
    "control_restarts": "Control endpoint processes started again after one died",
}
GAUGES: dict[str, str] = {
    "dram_pages": "Pages resident in the DRAM tier",
    "dram_used_bytes": "Bytes used in the DRAM tier",
    "dram_capacity_bytes": "DRAM tier budget in bytes",
    "disk_pages": "Pages on the disk tier",
    "disk_used_bytes": "Bytes used on the disk tier",
    "disk_capacity_bytes": "Disk tier budget in bytes",
    "disk_write_queue_depth": "Disk writes staged or running",
    "disk_writes_disabled": "1 while disk writes are stopped by an I/O error",
    "peer_disk_slots": "Other engines' slot directories readable on the shared disk_path",
    "dedupe_logical_bytes": "Bytes requested to be stored (every block, every request)",
    "dedupe_physical_bytes": "Bytes of distinct blocks stored (fleet-wide with Redis)",
    "dedupe_logical_blocks": "Blocks requested to be stored",
    "dedupe_physical_blocks": "Distinct blocks stored",
    "dedupe_ratio": "Logical over physical bytes",
    "directory_available": "1 while the block directory (Redis) is reachable",
    "redis_tier_available": "1 while every worker reaches the Redis page tier (0 while one "
                            "waits to reconnect: its Redis loads fail and are recomputed)",
    "bypass_active": "1 while `symram bypass on` stops symram's loads and saves",
}
# Exported as the maximum over sources, not the sum: flags, ratios, per-rank views.
MAX_GAUGES = frozenset({"disk_writes_disabled", "directory_available", "bypass_active",
                        "dedupe_ratio", "peer_disk_slots"})
# Exported as the minimum: "every rank can" (one rank's dead link fails the whole load).
MIN_GAUGES = frozenset({"redis_tier_available"})
HISTOGRAMS: dict[str, tuple[str, str]] = {
    "get": ("page_get_duration_seconds",
            "Latency of getting a load job's pages from the tiers (promotion included)"),
    "load": ("load_duration_seconds", "Latency of one load job (tiers -> engine)"),
    "save": ("save_duration_seconds", "Latency of one save job (engine -> tiers)"),
}
# Payload name (the tier stats' spelling) -> exported name (unit last).
EXPORTED: dict[str, str] = {
    "disk_bytes_written": "disk_written_bytes",
    "disk_bytes_read": "disk_read_bytes",
    "dram_bytes_used": "dram_used_bytes",
    "dram_bytes_capacity": "dram_capacity_bytes",
    "disk_bytes_used": "disk_used_bytes",
    "disk_bytes_capacity": "disk_capacity_bytes",
}
SOURCE = str(os.getpid())  # this process: one TP rank's worker, or the scheduler


def exported(name: str) -> str:
    return EXPORTED.get(name, name)


def gauge_value(name: str, per_source: Any) -> float:
    """A gauge over its sources (older payloads carried a bare number)."""
    if not isinstance(per_source, dict):
        return float(per_source)
    values = [float(v) for v in per_source.values()]
    if not values:
        return 0.0
    if exported(name) in MAX_GAUGES:
        return max(values)
    return min(values) if exported(name) in MIN_GAUGES else sum(values)


@dataclass
class SymramConnectorStats(KVConnectorStats):
    def __post_init__(self) -> None:
        if "counters" not in self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {"counters": {}, "gauges": {}, "histograms": {}}

    def add(self, name: str, value: float) -> None:
        counters = self.data["counters"]
        counters[name] = counters.get(name, 0) + value

    def set_gauge(self, name: str, value: float, source: str = SOURCE) -> None:
        self.data["gauges"].setdefault(name, {})[source] = value

    def add_latencies(self, drained: dict[str, Any]) -> None:
        """Bucket counts from ``latency_sink.drain()``."""
        latency_sink.merge(self.data.setdefault("histograms", {}), drained)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.get("counters", {}).items():
            self.add(name, value)
        gauges = self.data["gauges"]
        for name, per_source in other.data.get("gauges", {}).items():
            if not isinstance(per_source, dict):
                per_source = {"?": per_source}
            gauges.setdefault(name, {}).update(per_source)  # newest value per source
        self.add_latencies(other.data.get("histograms", {}))
        return self

    def reduce(self) -> dict[str, int | float]:
        gauges = {name: gauge_value(name, v) for name, v in self.data["gauges"].items()}
        return {**self.data["counters"], **gauges}

    def is_empty(self) -> bool:
        return not (self.data["counters"] or self.data["gauges"]
                    or self.data.get("histograms"))


class SymramPromMetrics(KVConnectorPromMetrics):
    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: self._counter_cls(
                name=f"symram:{name}_total", documentation=doc, labelnames=labelnames
            )
            for name, doc in COUNTERS.items()
        }
        self._histograms = {
            name: self._histogram_cls(
                name=f"symram:{metric}", documentation=doc, labelnames=labelnames,
                buckets=list(latency_sink.BUCKETS),
            )
            for name, (metric, doc) in HISTOGRAMS.items()
        }
        self._gauges = {
            name: self._gauge_cls(
                name=f"symram:{name}",
                documentation=doc,
                labelnames=labelnames,
                multiprocess_mode="mostrecent",
            )
            for name, doc in GAUGES.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for name, value in transfer_stats_data.get("counters", {}).items():
            metric = self._counters.get(exported(name))
            if metric is not None and value:
                metric.labels(*labels).inc(value)
        for name, per_source in transfer_stats_data.get("gauges", {}).items():
            gauge = self._gauges.get(exported(name))
            if gauge is not None:
                gauge.labels(*labels).set(gauge_value(name, per_source))
        for name, buckets in transfer_stats_data.get("histograms", {}).items():
            histogram = self._histograms.get(name)
            if histogram is not None:
                latency_sink.replay(buckets, histogram.labels(*labels).observe)

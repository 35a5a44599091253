"""Worker-side set-up and reporting of the tiers: the disk tier's directory, the
control endpoint, and the mapping of tier stats to symram's metric names.

Failures here never stop the engine: a disk tier that cannot open leaves DRAM
serving (with an error in the log saying why), a control port that is taken leaves
the engine without a control endpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from symram_vllm.config import SymramConfig
from symram_vllm.store import TieredStore
from symram_vllm.tiers.disk import DiskTier, DiskTierLocked
from symram_vllm.tiers.disk_layout import rank_directory

logger = logging.getLogger(__name__)

# Cumulative tier-stack stats reported as counters (the worker sends deltas).
TOTALS: dict[str, str] = {
    "dram_hits": "stack_dram_hits",
    "disk_hits": "stack_disk_hits",
    "tier_misses": "stack_misses",
    "promotions": "stack_promotions",
    "prefetched_pages": "stack_prefetched",
    "spilled_pages": "stack_writebacks",
    "spill_dropped_pages": "stack_writeback_dropped",
    "dram_evictions": "dram_evictions",
    "disk_evictions": "disk_evictions",
    "integrity_failures": "disk_integrity_failures",
    "disk_write_errors": "disk_write_errors",
    "disk_bytes_written": "disk_bytes_written",
    "disk_bytes_read": "disk_bytes_read",
}
GAUGES: dict[str, str] = {
    "dram_pages": "dram_pages",
    "dram_bytes_used": "dram_bytes_used",
    "dram_bytes_capacity": "dram_bytes_capacity",
    "disk_pages": "disk_pages",
    "disk_bytes_used": "disk_bytes_used",
    "disk_bytes_capacity": "disk_bytes_capacity",
    "disk_write_queue_depth": "disk_write_queue_depth",
    "disk_writes_disabled": "disk_writes_disabled",
    "get_p50_seconds": "get_p50_s",
    "get_p95_seconds": "get_p95_s",
}


def tier_report(stats: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(cumulative totals, gauges) under symram's metric names; absent tiers are left out."""
    totals = {name: stats[src] for name, src in TOTALS.items() if src in stats}
    gauges = {name: stats[src] for name, src in GAUGES.items() if src in stats}
    return totals, gauges


def open_disk_tier(config: SymramConfig, namespace: bytes, rank: int) -> DiskTier | None:
    if config.disk_path is None:
        return None
    root = rank_directory(config.disk_path, namespace, rank)
    disk_config = config.disk.model_copy(update={"codec": config.codec})
    try:
        return DiskTier(root, config.disk_bytes, config=disk_config)
    except DiskTierLocked as exc:
        logger.error(
            "symram rank %d: disk tier %s is in use by another engine (%s); serving from "
            "DRAM only. Give each engine its own disk_path.", rank, root, exc,
        )
    except (OSError, ValueError) as exc:
        logger.error(
            "symram rank %d: cannot open disk tier %s (%s); serving from DRAM only",
            rank, root, exc,
        )
    return None


def start_control_server(
    config: SymramConfig, store: TieredStore, rank: int, info: dict[str, object]
) -> Any:
    """The gateway's lookup/prefetch endpoint on control_port + rank, or None."""
    if not config.control_port:
        return None
    port = config.control_port + rank
    try:
        from symram_vllm.control import ControlServer

        server = ControlServer(store.stack, rank=rank, info=info)
        server.start(host=config.control_host, port=port)
    except Exception as exc:  # a control endpoint is optional; serving is not
        logger.error(
            "symram rank %d: control endpoint on %s:%d not started: %s",
            rank, config.control_host, port, exc,
        )
        return None
    logger.info("symram rank %d: control endpoint on http://%s:%d", rank, config.control_host, port)
    return server

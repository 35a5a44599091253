"""Worker-side set-up and reporting of the tiers: the disk tier's directory (its slot
under a disk_path several engines may share), the remote tiers (other engines' disk
slots, the Redis page tier), the control endpoint, and the mapping of tier stats to
symram's metric names.

Failures here never stop the engine: a disk tier that cannot open leaves DRAM
serving (with an error in the log saying why), a control port that is taken (or a
control process that does not start) leaves the engine without a control endpoint; a
control process that dies later is started again (``control_restart``).
"""

from __future__ import annotations

import logging
from typing import Any

from symram_vllm.config import SymramConfig
from symram_vllm.store import TieredStore
from symram_vllm.tiers.crypto import PageCipher, page_cipher
from symram_vllm.tiers.disk import DiskTier, DiskTierLocked
from symram_vllm.tiers.disk_layout import MAX_SLOTS, rank_directory, slot_directory

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
    "remote_hits": "stack_remote_hits",
    "peer_disk_hits": "stack_peer_disk_hits",
    "redis_hits": "stack_redis_hits",
    "peer_disk_integrity_failures": "peer_disk_integrity_failures",
    "redis_pages_written": "redis_writes",
    "redis_pages_write_dropped": "redis_write_dropped",
    "redis_pages_write_rejected": "redis_write_rejected",
    "redis_pages_evicted": "redis_evicted",
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
    "peer_disk_slots": "peer_disk_peers",
    "redis_tier_available": "redis_available",
}


def tier_report(stats: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(cumulative totals, gauges) under symram's metric names; absent tiers are left out."""
    totals = {name: stats[src] for name, src in TOTALS.items() if src in stats}
    gauges = {name: stats[src] for name, src in GAUGES.items() if src in stats}
    return totals, gauges


def open_disk_tier(config: SymramConfig, namespace: bytes, rank: int) -> DiskTier | None:
    """This engine's disk tier: the first slot directory of `rank` no live engine holds
    (slot 0 unless another engine shares the disk_path and got there first)."""
    if config.disk_path is None:
        return None
    cipher = _cipher(config, namespace)  # raises (refuses to start) on bad key settings
    slots = MAX_SLOTS if config.disk_share else 1
    for slot in range(slots):
        root = slot_directory(config.disk_path, namespace, rank, slot)
        try:
            tier = DiskTier(root, config.disk_bytes, config=config.disk, codec=config.codec,
                            cipher=cipher)
        except DiskTierLocked as exc:
            if slot + 1 < slots:
                continue
            logger.error(
                "symram rank %d: disk tier %s is in use by another engine (%s); serving "
                "from DRAM only. Give each engine its own disk_path, or set "
                "disk_share=true.", rank, root, exc,
            )
        except (OSError, ValueError) as exc:
            logger.error(
                "symram rank %d: cannot open disk tier %s (%s); serving from DRAM only",
                rank, root, exc,
            )
        else:
            if slot:
                logger.info(
                    "symram rank %d: %s is shared with other engines; writing slot %s",
                    rank, rank_directory(config.disk_path, namespace, rank).parent, root.name,
                )
            return tier
        break
    return None


def open_remote_tiers(
    config: SymramConfig, namespace: bytes, rank: int, disk: DiskTier | None
) -> tuple[list[Any], Any]:
    """(remote tiers read on a local miss, the Redis page writer or None).

    Peer disk slots when the disk_path is shared; the Redis page tier when
    redis_pages_bytes > 0. Neither may stop the engine: a failure is logged and
    the tier left out."""
    remotes: list[Any] = []
    cipher = _cipher(config, namespace)
    if config.disk_path is not None and config.disk_share:
        from symram_vllm.tiers.peer_disk import PeerDiskReader

        remotes.append(PeerDiskReader(
            config.disk_path, namespace, rank,
            own_root=disk.root if disk is not None else None, codec=config.codec,
            cipher=cipher,
        ))
    pages = None
    url = config.redis_pages_url or config.directory_url
    if config.redis_pages_bytes > 0:
        if not url:
            logger.error(
                "symram rank %d: redis_pages_bytes is set but neither redis_pages_url nor "
                "directory_url names a Redis; the Redis page tier is off", rank,
            )
        else:
            try:
                from symram_vllm.tiers.peer_redis import RedisPages
                from symram_vllm.tiers.redis_tier import RedisPageTier, RedisPageTierOptions

                tier = RedisPageTier(
                    url, namespace=namespace, capacity_bytes=config.redis_pages_bytes,
                    cipher=cipher,
                    options=RedisPageTierOptions(link=config.redis.link_options(pages=True)),
                )
                pages = RedisPages(tier, queue_pages=config.redis_pages_queue)
            except (ValueError, OSError) as exc:
                logger.error("symram rank %d: Redis page tier off: %s", rank, exc)
    return remotes, pages


def _cipher(config: SymramConfig, namespace: bytes) -> PageCipher | None:
    """The pages-at-rest cipher (None: plaintext). Raises EncryptionConfigError, which
    stops the engine, when the encryption settings cannot be honoured."""
    return page_cipher(
        config.encryption, config.encryption_key_file, config.encryption_key, namespace
    )


def control_token(config: SymramConfig) -> str | None:
    """The shared control token: control_token, else the contents of control_token_file."""
    if config.control_token is not None:
        return config.control_token.get_secret_value()
    if config.control_token_file is not None:
        return config.control_token_file.read_text().strip()
    return None


def start_control_server(
    config: SymramConfig, store: TieredStore, rank: int, info: dict[str, object]
) -> Any:
    """The gateway's lookup/prefetch endpoint on control_port + rank, or None. It needs
    the shared control token; without one it stays off (the engine serves on). Its HTTP
    side runs in a low-priority child process; this process keeps one small thread
    answering it (``symram_vllm.control``)."""
    if not config.control_port:
        return None
    port = config.control_port + rank
    try:
        from symram_vllm.control import ControlServer
        from symram_vllm.control_guard import ControlLimits

        limits = ControlLimits(rate_per_client=config.control_rate_per_client,
                               burst_per_client=2 * config.control_rate_per_client,
                               cpu_share=config.control_cpu_share)
        server = ControlServer(store.stack, token=control_token(config), rank=rank, info=info,
                               limits=limits)
        server.start(host=config.control_host, port=port)
    except Exception as exc:  # a control endpoint is optional; serving is not
        logger.error(
            "symram rank %d: control endpoint on %s:%d not started: %s",
            rank, config.control_host, port, exc,
        )
        return None
    logger.info("symram rank %d: control endpoint on http://%s:%d (token required; "
                "served by process %s at nice +%d)", rank, config.control_host, port,
                server.child_pid, server.nice)
    return server

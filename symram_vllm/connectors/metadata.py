"""Messages between the scheduler-side and worker-side halves of the connector.

Both travel through vLLM's own IPC each engine step, so they are plain dataclasses
of ints, strings and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass
class BlockJob:
    """Copy pages for one request: engine block `block_ids[i]` <-> chain key `keys[i]`."""

    req_id: str
    block_ids: list[int]
    keys: list[bytes]
    # Index of each block in its request's prefix (its recompute cost for eviction).
    positions: list[int] = field(default_factory=list)

    def position(self, index: int) -> int:
        return self.positions[index] if index < len(self.positions) else 0


@dataclass
class SymramConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockJob] = field(default_factory=list)
    saves: list[BlockJob] = field(default_factory=list)
    # Requests whose blocks the scheduler holds until we report them finished.
    delayed_free: list[str] = field(default_factory=list)
    # Requests preempted this step: their blocks may be reused right away.
    preempted: list[str] = field(default_factory=list)


@dataclass
class SymramWorkerMetadata(KVConnectorWorkerMetadata):
    stored: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)
    # Save keys the worker has finished with (stored or skipped).
    processed: list[bytes] = field(default_factory=list)
    # Keys that entered / left tiers other engines can read (this worker's disk slot,
    # the Redis page tier), for a shared directory.
    disk_stored: list[bytes] = field(default_factory=list)
    disk_removed: list[bytes] = field(default_factory=list)
    redis_stored: list[bytes] = field(default_factory=list)
    redis_removed: list[bytes] = field(default_factory=list)
    # Keys a load found in no tier (or only damaged): the directory was wrong about them.
    load_failed: list[bytes] = field(default_factory=list)
    # Tier writes still running (disk, Redis): their events come in later steps.
    pending: bool = False

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, SymramWorkerMetadata)

        # With tensor parallelism every rank must hold its shard before the block
        # counts as stored; a removal (or a failed load) on any rank removes it.
        def both(a: list[bytes], b: list[bytes]) -> list[bytes]:
            kept = set(b)
            return [k for k in a if k in kept]

        def either(a: list[bytes], b: list[bytes]) -> list[bytes]:
            return list(dict.fromkeys(a + b))

        return SymramWorkerMetadata(
            stored=both(self.stored, other.stored),
            removed=either(self.removed, other.removed),
            processed=either(self.processed, other.processed),
            disk_stored=both(self.disk_stored, other.disk_stored),
            disk_removed=either(self.disk_removed, other.disk_removed),
            redis_stored=both(self.redis_stored, other.redis_stored),
            redis_removed=either(self.redis_removed, other.redis_removed),
            load_failed=either(self.load_failed, other.load_failed),
            pending=self.pending or other.pending,
        )

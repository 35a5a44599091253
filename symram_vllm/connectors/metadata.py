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

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, SymramWorkerMetadata)
        # With tensor parallelism every rank must hold its shard before the block
        # counts as stored; a removal on any rank removes it.
        stored_other = set(other.stored)
        return SymramWorkerMetadata(
            stored=[k for k in self.stored if k in stored_other],
            removed=list(dict.fromkeys(self.removed + other.removed)),
            processed=list(dict.fromkeys(self.processed + other.processed)),
        )

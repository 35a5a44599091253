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

from symram_vllm.tiers.events import TierEvent, TierName, TierOp, keys_of


@dataclass
class BlockJob:
    """Copy pages for one request: engine block `block_ids[i]` <-> chain key `keys[i]`."""

    req_id: str
    block_ids: list[int]
    keys: list[bytes]
    # Index of each block in its request's prefix (its recompute cost for eviction).
    positions: list[int] = field(default_factory=list)
    # Models with several KV-cache groups (vLLM's hybrid allocator): every group's
    # block ids, `block_ids` being group 0's; -1 where a load skips that group's part
    # (a sliding-window group's blocks outside its window, which vLLM leaves
    # unallocated).
    group_block_ids: list[list[int]] | None = None

    def position(self, index: int) -> int:
        return self.positions[index] if index < len(self.positions) else 0

    def ids(self, start: int = 0, end: int | None = None) -> list[int] | list[list[int]]:
        """Block ids of blocks [start, end) in the form the copies take: a list, or one
        list per KV-cache group."""
        if self.group_block_ids is None:
            return self.block_ids[start:end]
        return [group[start:end] for group in self.group_block_ids]

    def engine_blocks(self) -> set[int]:
        """Every engine block the job reads or writes."""
        if self.group_block_ids is None:
            return set(self.block_ids)
        return {b for group in self.group_block_ids for b in group if b >= 0}


@dataclass
class SymramConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockJob] = field(default_factory=list)
    saves: list[BlockJob] = field(default_factory=list)
    # Requests whose blocks the scheduler holds until we report them finished.
    delayed_free: list[str] = field(default_factory=list)
    # Requests preempted this step: their blocks may be reused right away.
    preempted: list[str] = field(default_factory=list)
    # Engine blocks allocated this step, sent only when a KV-cache group frees blocks
    # of running requests (sliding window): a save still reading one must finish
    # before this step's forward pass overwrites it.
    allocated: list[int] = field(default_factory=list)


@dataclass
class SymramWorkerMetadata(KVConnectorWorkerMetadata):
    # What the workers' tiers gained and lost (tiers/events.py), each event tagged with
    # the reporting rank; aggregation across ranks concatenates them and the scheduler
    # counts ranks per key (ResidencyReports).
    events: list[TierEvent] = field(default_factory=list)
    # Save keys the worker has finished with (stored or skipped).
    processed: list[bytes] = field(default_factory=list)
    # Keys a load found in no tier (or only damaged): the directory was wrong about them.
    load_failed: list[bytes] = field(default_factory=list)
    # Tier writes still running (disk, Redis): their events come in later steps.
    pending: bool = False

    def keys(self, tier: TierName, op: TierOp) -> list[bytes]:
        return keys_of(self.events, tier, op)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, SymramWorkerMetadata)

        def either(a: list[bytes], b: list[bytes]) -> list[bytes]:
            return list(dict.fromkeys(a + b))

        # No intersection here: ranks report the same block in different steps (saves
        # are asynchronous), and vLLM skips a rank that sent nothing. The scheduler
        # completes a store when every rank has reported it, whenever that is.
        return SymramWorkerMetadata(
            events=self.events + other.events,
            processed=either(self.processed, other.processed),
            load_failed=either(self.load_failed, other.load_failed),
            pending=self.pending or other.pending,
        )

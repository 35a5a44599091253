"""What a worker's tiers gained and lost, as one typed list the scheduler consumes.

``tier``: "local" (this worker's DRAM or disk: the block is loadable here), "disk"
(this worker's disk slot, readable by engines sharing the disk_path) or "redis" (the
Redis page tier, readable by every engine). ``op``: "stored" or "removed". ``rank``
is the tensor-parallel rank that reports it: a block is stored only once every rank
has reported its shard, in whatever steps those reports arrive, while one rank's
removal removes it at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

TierName = Literal["local", "disk", "redis"]
TierOp = Literal["stored", "removed"]


@dataclass(frozen=True)
class TierEvent:
    tier: TierName
    op: TierOp
    keys: tuple[bytes, ...]
    rank: int = 0


def keys_of(events: Iterable[TierEvent], tier: TierName, op: TierOp) -> list[bytes]:
    """Every key of `events` with this tier and op, in order (duplicates kept)."""
    return [k for e in events if e.tier == tier and e.op == op for k in e.keys]

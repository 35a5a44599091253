"""One step's worth of directory traffic as data: queued writes in order, lease
lookups for waiting requests, and whether to read the dedupe counters.

``Directory.apply_batch`` runs a whole batch; a remote directory does it in one
pipelined round trip (``redis_batch.py``). The asynchronous directory
(``async_directory.py``) fills batches on the scheduling path and applies them on its
background thread, so the scheduler never waits on the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from symram_vllm.directory.base import DedupeStats

WriteKind = Literal["add", "remove", "remove_own", "record_store", "release"]
WRITE_KINDS: tuple[str, ...] = ("add", "remove", "remove_own", "record_store", "release")


@dataclass
class WriteOp:
    """`add(keys, tier)`, `remove(keys, tier)` (tier None = all own), `remove_own`,
    `record_store(keys, nbytes)` or `release_lease(keys)`."""

    kind: WriteKind
    keys: list[bytes]
    tier: str | None = None
    nbytes: int = 0

    def __post_init__(self) -> None:
        if self.kind not in WRITE_KINDS:
            raise ValueError(f"WriteOp kind must be one of {WRITE_KINDS}, got {self.kind!r}")
        if self.kind in ("add", "remove_own") and not self.tier:
            raise ValueError(f"WriteOp {self.kind} needs a tier")
        if self.nbytes < 0:
            raise ValueError(f"WriteOp nbytes must be >= 0, got {self.nbytes}")


@dataclass
class LeaseQuery:
    """Lease the leading usable keys of one request (prefix order) for `ttl_s`."""

    keys: list[bytes]
    ttl_s: float


@dataclass
class DirectoryBatch:
    writes: list[WriteOp] = field(default_factory=list)
    leases: list[LeaseQuery] = field(default_factory=list)
    read_dedupe: bool = False
    # Merging bookkeeping: the last write touching each key, and per kind/tier/size.
    _last_for_key: dict[bytes, int] = field(default_factory=dict, repr=False)
    _last_of_kind: dict[tuple[str, str | None, int], int] = field(
        default_factory=dict, repr=False)

    def __bool__(self) -> bool:
        return bool(self.writes or self.leases or self.read_dedupe)

    def add_write(self, op: WriteOp) -> None:
        """Append `op`, merged into the latest op of its kind, tier and size when no
        op after that one touches the same keys (per-key order is kept, so a batch
        of 256 requests' writes is a handful of commands, not 256 x kinds)."""
        if not op.keys:
            return
        kind = (op.kind, op.tier, op.nbytes)
        target = self._last_of_kind.get(kind)
        if target is not None and all(self._last_for_key.get(k, -1) <= target for k in op.keys):
            self.writes[target].keys.extend(op.keys)
        else:
            target = len(self.writes)
            self.writes.append(WriteOp(op.kind, list(op.keys), op.tier, op.nbytes))
            self._last_of_kind[kind] = target
        for k in op.keys:
            self._last_for_key[k] = target


@dataclass
class BatchResult:
    # Per lease query: how many leading keys are now leased (0 when unanswered).
    leased: list[int] = field(default_factory=list)
    dedupe: DedupeStats | None = None
    # False when the round trip failed (Redis down): leases read 0, writes are queued
    # for replay by the directory's link.
    ok: bool = True
    # Keys leased past a gap (a later chunk of a query answered although an earlier one
    # missed): nobody will load them, so the caller releases them.
    over_leased: list[bytes] = field(default_factory=list)

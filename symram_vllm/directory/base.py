"""The directory interface the scheduler side consults before promising a load.

The five abstract methods are what the scheduler needs. The optional ones below them
have defaults that suit an in-process directory; a shared directory (Redis)
overrides them: batched tier queries, leases, lease-aware collection, fleet-wide
dedupe accounting, stats and close.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from symram_vllm.directory.batch import BatchResult, DirectoryBatch


@dataclass(frozen=True)
class DedupeStats:
    """Bytes (and blocks) requested to be stored vs. actually stored.

    A store of a block the directory already knows is logical only."""

    logical_bytes: int = 0
    physical_bytes: int = 0
    logical_blocks: int = 0
    physical_blocks: int = 0

    @property
    def ratio(self) -> float:
        """logical / physical: 16.0 means every stored byte served 16 requests."""
        return self.logical_bytes / self.physical_bytes if self.physical_bytes else 0.0


class Directory(ABC):
    # True when other instances read and write the same directory (a network one):
    # then fleet lookups are worth a round trip. In-process directories know it all.
    shared: bool = False

    @abstractmethod
    def add(self, chain_keys: Iterable[bytes], tier: str) -> None:
        """Record that `chain_keys` are held in `tier`."""

    @abstractmethod
    def remove(self, chain_keys: Iterable[bytes], tier: str | None = None) -> None:
        """Forget `chain_keys` in `tier` (all tiers when None)."""

    @abstractmethod
    def longest_prefix(self, chain_keys: Sequence[bytes]) -> int:
        """How many leading keys are held, in any tier. Stops at the first miss."""

    @abstractmethod
    def tiers_of(self, chain_key: bytes) -> frozenset[str]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    # -- optional ------------------------------------------------------------------------
    def remove_own(self, chain_keys: Iterable[bytes], tier: str) -> None:
        """Forget only *this instance's* location of `chain_keys` in `tier`, even in a
        shared tier (other instances' copies, e.g. in their slots of a shared disk,
        are still there). In-process there is only this instance: `remove`."""
        self.remove(chain_keys, tier)

    def tiers_of_many(self, chain_keys: Sequence[bytes]) -> list[frozenset[str]]:
        """`tiers_of` for many keys (one round trip in a remote directory)."""
        return [self.tiers_of(key) for key in chain_keys]

    def acquire_lease(self, chain_keys: Sequence[bytes], ttl_s: float) -> int:
        """Lease the leading held keys so `collect` keeps them for `ttl_s` or until
        `release_lease`; returns how many were leased (a `longest_prefix` that also
        protects). In-process nothing else collects, so this is `longest_prefix`."""
        return self.longest_prefix(chain_keys)

    def release_lease(self, chain_keys: Iterable[bytes]) -> None:  # noqa: B027 - optional
        """Drop one lease reference per key taken by `acquire_lease`."""

    def collect(self, chain_keys: Iterable[bytes], tier: str) -> list[bytes]:
        """Forget `tier` for the keys nobody leases; returns those keys, whose pages
        the caller may now delete. Leased keys are kept and not returned."""
        keys = list(chain_keys)
        self.remove(keys, tier)
        return keys

    def record_store(self, chain_keys: Sequence[bytes], nbytes: int) -> int:
        """Account requests to store `chain_keys` (pages of `nbytes`); returns how many
        are new (physical). The default does not track dedupe."""
        return 0

    def dedupe(self) -> DedupeStats:
        return DedupeStats()

    def stats(self) -> dict[str, float]:
        return {"entries": float(len(self))}

    def apply_batch(self, batch: DirectoryBatch) -> BatchResult:
        """Run a batch: writes in order, then lease lookups, then the dedupe read. A
        remote directory overrides this with one pipelined round trip."""
        from symram_vllm.directory.batch import BatchResult

        for op in batch.writes:
            if op.kind == "add":
                self.add(op.keys, op.tier or "")
            elif op.kind == "remove":
                self.remove(op.keys, op.tier)
            elif op.kind == "remove_own":
                self.remove_own(op.keys, op.tier or "")
            elif op.kind == "record_store":
                self.record_store(op.keys, op.nbytes)
            else:
                self.release_lease(op.keys)
        leased = [self.acquire_lease(q.keys, q.ttl_s) for q in batch.leases]
        return BatchResult(leased=leased, dedupe=self.dedupe() if batch.read_dedupe else None)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads."""

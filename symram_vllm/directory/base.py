"""The directory interface the scheduler side consults before promising a load."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence


class Directory(ABC):
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

"""The tier interface: three verbs (`get` / `exists` / `set`) plus delete and stats.

Pages are flat ``torch.uint8`` tensors. A tier never interprets them; layout and
codecs live above it (``layout.py``, ``codecs/``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from symram_vllm.keys import BlockKey


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    rejected_puts: int = 0
    integrity_failures: int = 0
    bytes_used: int = 0
    bytes_capacity: int = 0
    pages: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out.update(self.extra)
        return out


class Tier(ABC):
    """One level of the hierarchy (host DRAM, NVMe, remote...)."""

    name: str = "tier"

    @abstractmethod
    def exists(self, key: BlockKey) -> bool: ...

    @abstractmethod
    def get(self, key: BlockKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Return the page bytes for `key`, or None on a miss (or a page that failed
        verification). With `out`, bytes are written there and `out` is returned."""

    @abstractmethod
    def set(self, key: BlockKey, page: torch.Tensor) -> bool:
        """Store a page. Returns False if the tier declined (full of pinned pages,
        disk error...): a declined put is never an error for the caller."""

    @abstractmethod
    def delete(self, key: BlockKey) -> bool: ...

    @abstractmethod
    def keys(self) -> Iterator[BlockKey]: ...

    @abstractmethod
    def stats(self) -> TierStats: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (files, pinned memory)."""

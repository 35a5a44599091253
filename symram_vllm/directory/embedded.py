"""In-process directory: the default when no shared directory is configured."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from symram_vllm.directory.base import DedupeStats, Directory

PENDING_MAX = 1 << 16


class EmbeddedDirectory(Directory):
    def __init__(self) -> None:
        self._where: dict[bytes, set[str]] = {}
        self._lock = threading.Lock()
        # Dedupe accounting (same rule as the Redis directory): a store request is
        # physical unless the block is held or already requested (pending: bounded,
        # so requests whose save never lands cannot grow it without limit).
        self._pending: OrderedDict[bytes, None] = OrderedDict()
        self._dedupe = DedupeStats()

    def add(self, chain_keys: Iterable[bytes], tier: str) -> None:
        with self._lock:
            for key in chain_keys:
                self._where.setdefault(key, set()).add(tier)
                self._pending.pop(key, None)

    def remove(self, chain_keys: Iterable[bytes], tier: str | None = None) -> None:
        with self._lock:
            for key in chain_keys:
                tiers = self._where.get(key)
                if tiers is None:
                    continue
                if tier is None:
                    tiers.clear()
                else:
                    tiers.discard(tier)
                if not tiers:
                    del self._where[key]

    def longest_prefix(self, chain_keys: Sequence[bytes]) -> int:
        with self._lock:
            for i, key in enumerate(chain_keys):
                if key not in self._where:
                    return i
            return len(chain_keys)

    def tiers_of(self, chain_key: bytes) -> frozenset[str]:
        with self._lock:
            return frozenset(self._where.get(chain_key, ()))

    def record_store(self, chain_keys: Sequence[bytes], nbytes: int) -> int:
        with self._lock:
            physical = 0
            for key in chain_keys:
                if key in self._where or key in self._pending:
                    continue
                physical += 1
                self._pending[key] = None
                if len(self._pending) > PENDING_MAX:
                    self._pending.popitem(last=False)
            d = self._dedupe
            self._dedupe = DedupeStats(
                d.logical_bytes + len(chain_keys) * nbytes,
                d.physical_bytes + physical * nbytes,
                d.logical_blocks + len(chain_keys),
                d.physical_blocks + physical,
            )
            return physical

    def dedupe(self) -> DedupeStats:
        return self._dedupe

    def __len__(self) -> int:
        with self._lock:
            return len(self._where)

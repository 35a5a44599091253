"""In-process directory: the default when no shared directory is configured."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from symram_vllm.directory.base import Directory


class EmbeddedDirectory(Directory):
    def __init__(self) -> None:
        self._where: dict[bytes, set[str]] = {}
        self._lock = threading.Lock()

    def add(self, chain_keys: Iterable[bytes], tier: str) -> None:
        with self._lock:
            for key in chain_keys:
                self._where.setdefault(key, set()).add(tier)

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

    def __len__(self) -> int:
        with self._lock:
            return len(self._where)

"""Pins with a time to live: pages eviction must pass over, in the DRAM and disk tiers.

Not locked: each tier calls it under its own lock. A pin that has expired is dropped
the next time it is looked at, so a pin never unpinned costs nothing after its TTL.
"""

from __future__ import annotations

from collections.abc import Callable

from symram_vllm.keys import BlockKey


class Pins:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._until: dict[BlockKey, float] = {}

    def pin(self, key: BlockKey, ttl_s: float | None) -> None:
        """Pin `key` for `ttl_s` seconds (forever when None)."""
        self._until[key] = float("inf") if ttl_s is None else self._clock() + ttl_s

    def unpin(self, key: BlockKey) -> None:
        self._until.pop(key, None)

    def active(self, key: BlockKey) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[key]
            return False
        return True

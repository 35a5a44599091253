"""Tensor-parallel completion of tier events: a block is stored once every rank holds
its shard.

Each rank saves its shard asynchronously, so ranks report the same block in different
engine steps (and vLLM skips a rank that has nothing to say in a step). vLLM's own
``KVOutputAggregator`` counts finished transfers across steps for the same reason.
Here a store completes when the set of ranks that reported it is full; any rank's
removal removes the block at once (and forgets partial reports), since a block with
one shard missing cannot be loaded. Pending entries are bounded: the oldest partial
reports are dropped first (the block is then simply not advertised: a future miss).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Iterable

from symram_vllm.tiers.events import TierEvent

MAX_PENDING = 1 << 18


class RankReports:
    def __init__(self, tp_size: int, limit: int = MAX_PENDING) -> None:
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        self.tp_size = tp_size
        self.limit = limit
        self._pending: OrderedDict[tuple[str, bytes], set[int]] = OrderedDict()

    def apply(
        self, events: Iterable[TierEvent]
    ) -> tuple[dict[str, list[bytes]], dict[str, list[bytes]]]:
        """(stores completed by these events, removals) per tier, in event order."""
        stored: dict[str, list[bytes]] = defaultdict(list)
        removed: dict[str, list[bytes]] = defaultdict(list)
        for event in events:
            for key in event.keys:
                slot = (event.tier, key)
                if event.op == "removed":
                    self._pending.pop(slot, None)
                    removed[event.tier].append(key)
                    continue
                ranks = self._pending.setdefault(slot, set())
                ranks.add(event.rank)
                if len(ranks) >= self.tp_size:
                    del self._pending[slot]
                    stored[event.tier].append(key)
                elif len(self._pending) > self.limit:
                    self._pending.popitem(last=False)
        return stored, removed

    def waiting(self, tier: str, key: bytes) -> bool:
        """Some ranks reported `key` stored in `tier`, not all yet."""
        return (tier, key) in self._pending

    def __len__(self) -> int:
        return len(self._pending)

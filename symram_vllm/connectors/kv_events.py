"""symram's tiers as vLLM KV events, for external indexers (llm-d style).

The scheduler side learns from the workers which chain keys entered the tiers and
which left every tier; this turns those into vLLM's own ``BlockStored`` /
``BlockRemoved`` events (medium ``CPU``: symram's host tiers), keyed by vLLM's
block hashes as vLLM's own events are, and hands them to ``take_events``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

if TYPE_CHECKING:
    from vllm.v1.request import Request

MEDIUM = "CPU"
# A chain key's block hash is kept while symram holds the block, for its removal
# event; past this many the oldest are forgotten (their removal goes unreported).
MAX_TRACKED = 1 << 20


@dataclass(frozen=True)
class _Block:
    block_hash: bytes
    parent_hash: bytes | None
    token_ids: tuple[int, ...]
    lora_name: str | None


class TierEventLog:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._pending: dict[bytes, _Block] = {}
        self._held: dict[bytes, bytes] = {}
        self._events: list[KVCacheEvent] = []

    def saving(self, chain_key: bytes, request: Request, index: int) -> None:
        """Block `index` of `request` is being saved under `chain_key`."""
        hashes = request.block_hashes
        start = index * self.block_size
        lora = request.lora_request.name if request.lora_request else None
        self._pending[chain_key] = _Block(
            bytes(hashes[index]),
            bytes(hashes[index - 1]) if index > 0 else None,
            tuple(request.all_token_ids[start : start + self.block_size]),
            lora,
        )

    def dropped(self, chain_keys: list[bytes]) -> None:
        """Saves that ended without storing (skipped or failed)."""
        for key in chain_keys:
            self._pending.pop(key, None)

    def stored(self, chain_keys: list[bytes]) -> None:
        for key in chain_keys:
            block = self._pending.pop(key, None)
            if block is None:
                continue
            if len(self._held) >= MAX_TRACKED:
                self._held.pop(next(iter(self._held)))
            self._held[key] = block.block_hash
            self._events.append(
                BlockStored(
                    block_hashes=[maybe_convert_block_hash(block.block_hash)],
                    parent_block_hash=(
                        maybe_convert_block_hash(block.parent_hash)
                        if block.parent_hash is not None
                        else None
                    ),
                    token_ids=list(block.token_ids),
                    block_size=self.block_size,
                    lora_id=None,
                    medium=MEDIUM,
                    lora_name=block.lora_name,
                )
            )

    def removed(self, chain_keys: list[bytes]) -> None:
        hashes = [h for key in chain_keys if (h := self._held.pop(key, None)) is not None]
        if hashes:
            self._events.append(
                BlockRemoved(block_hashes=[maybe_convert_block_hash(h) for h in hashes],
                             medium=MEDIUM)
            )

    def take(self) -> list[KVCacheEvent]:
        events, self._events = self._events, []
        return events

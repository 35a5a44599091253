"""Which blocks of a running request the workers save this step.

A block is saved once it is full (prompt blocks only, unless ``save_decode_blocks``),
at most once per request (a cursor), never while a save of the same chain key is in
flight (``saving``, until a worker acknowledges it as processed), and never when the
directory already knows a copy this engine can read. That last answer is in-process
(held here, or usable per a recent fleet answer): a stale "no" costs a redundant save
(the worker skips pages it holds), never a wrong token.

Every block that wants storing counts as logical bytes for dedupe accounting; only
new ones as physical (fleet-wide with a Redis directory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from symram_vllm.connectors.hybrid_blocks import NULL_BLOCK_ID
from symram_vllm.connectors.kv_events import TierEventLog
from symram_vllm.connectors.metadata import BlockJob
from symram_vllm.connectors.request_state import RequestState
from symram_vllm.directory.async_directory import AsyncDirectory

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from symram_vllm.config import SymramConfig


class SavePlanner:
    def __init__(
        self,
        block_size: int,
        config: SymramConfig,
        directory: AsyncDirectory,
        events: TierEventLog,
        count: Callable[[str, float], None],
        *,
        page_bytes: int,
        num_groups: int,
    ) -> None:
        self.block_size = block_size
        self.config = config
        self.directory = directory
        self.events = events
        self._count = count
        self.page_bytes = page_bytes
        self.num_groups = num_groups
        # Chain keys sent to workers for saving and not yet acknowledged.
        self.saving: set[bytes] = set()

    def acknowledged(self, processed: Iterable[bytes]) -> None:
        """Keys a worker is done with (saved, skipped or dropped): savable again."""
        self.saving.difference_update(processed)

    def plan(
        self, state: RequestState, computed_before: int, scheduled: int,
        kv_cache_manager: KVCacheManager,
    ) -> BlockJob | None:
        """The save job for the blocks `state`'s request fills this step, if any."""
        request = state.request
        req_id = request.request_id
        full_blocks = min((computed_before + scheduled) // self.block_size, len(state.keys))
        if not self.config.save_decode_blocks:
            full_blocks = min(full_blocks, request.num_prompt_tokens // self.block_size)
        if full_blocks <= state.save_cursor:
            return None
        all_ids = kv_cache_manager.get_block_ids(req_id)
        block_ids = all_ids[0]
        job = BlockJob(req_id, [], [])
        if self.num_groups > 1:
            job.group_block_ids = [[] for _ in all_ids]
        indexes = range(state.save_cursor, min(full_blocks, *(len(ids) for ids in all_ids)))
        if self.page_bytes and indexes:
            self.directory.record_store([state.keys[i] for i in indexes], self.page_bytes)
        candidates = [i for i in indexes if state.keys[i] not in self.saving]
        held = self.directory.held_local([state.keys[i] for i in candidates])
        for index, known in zip(candidates, held, strict=True):
            key = state.keys[index]
            if known or key in self.saving:
                continue
            if job.group_block_ids is not None:
                ids_at = [ids[index] for ids in all_ids]
                if NULL_BLOCK_ID in ids_at:
                    # A windowed group already freed this block: the page would not be
                    # whole, so it is not stored (a later hit stops before it).
                    self._count("save_window_missed_blocks", 1)
                    continue
                for group, block in zip(job.group_block_ids, ids_at, strict=True):
                    group.append(block)
            self.saving.add(key)
            job.block_ids.append(block_ids[index])
            job.keys.append(key)
            job.positions.append(index)
            self.events.saving(key, request, index)
        state.save_cursor = full_blocks
        if not job.keys:
            return None
        state.has_jobs = True
        return job

"""Scheduler-side half of the connector: decides what to load and what to save.

It never touches KV bytes. It keeps a directory of chain keys the workers hold
(fed by the workers' per-step metadata), answers "how many tokens can symram
supply for this request", and turns each engine step into load and save jobs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from symram_vllm.connectors.kv_events import TierEventLog
from symram_vllm.connectors.metadata import BlockJob, SymramConnectorMetadata, SymramWorkerMetadata
from symram_vllm.directory import Directory, EmbeddedDirectory
from symram_vllm.keys import chain_keys
from symram_vllm.tiers.disk_layout import rank_directory, stored_keys

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from symram_vllm.config import SymramConfig

logger = logging.getLogger(__name__)


@dataclass
class RequestState:
    request: Request
    keys: list[bytes] = field(default_factory=list)
    local_computed_tokens: int = 0
    # Leading blocks already handled for saving (saved, scheduled, or present).
    save_cursor: int = 0
    has_jobs: bool = False


class SchedulerSide:
    def __init__(
        self,
        signature_digest: bytes,
        block_size: int,
        config: SymramConfig,
        directory: Directory | None = None,
    ) -> None:
        self.signature_digest = signature_digest
        self.block_size = block_size
        self.config = config
        self.directory = directory or EmbeddedDirectory()
        self.kv_cache_manager: KVCacheManager | None = None
        self._requests: dict[str, RequestState] = {}
        self._pending_loads: list[BlockJob] = []
        self._delayed_free: list[str] = []
        # Chain keys sent to workers for saving and not yet acknowledged.
        self._saving: set[bytes] = set()
        self.lookups = 0
        self.hit_tokens = 0
        self.events = TierEventLog(block_size)

    def seed_from_disk(self, tp_size: int) -> int:
        """Warm restart: blocks already on every rank's disk tier count as held.

        Workers report what they store only once steps run; without this the first
        requests after a restart would all miss. Names only, no reads: a page that
        turns out corrupt is a load error, which vLLM recomputes."""
        if self.config.disk_path is None:
            return 0
        held: set[bytes] | None = None
        for rank in range(tp_size):
            root = rank_directory(self.config.disk_path, self.signature_digest, rank)
            keys = {key.chain for key in stored_keys(root) if key.rank == rank}
            held = keys if held is None else held & keys
        if held:
            self.directory.add(held, "disk")
        return len(held or ())

    # -- keys ----------------------------------------------------------------------------
    def _state(self, request: Request) -> RequestState:
        state = self._requests.get(request.request_id)
        if state is None:
            state = RequestState(request)
            self._requests[request.request_id] = state
        hashes = request.block_hashes
        if len(state.keys) < len(hashes):
            state.keys.extend(
                chain_keys(self.signature_digest, [bytes(h) for h in hashes[len(state.keys) :]])
            )
        return state

    # -- vLLM scheduler hooks ------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        state = self._state(request)
        state.local_computed_tokens = num_computed_tokens
        # vLLM must compute at least the last prompt token itself (it needs its logits).
        loadable_blocks = min(len(state.keys), (request.num_tokens - 1) // self.block_size)
        local_blocks = num_computed_tokens // self.block_size
        if loadable_blocks <= local_blocks:
            return 0, False
        self.lookups += 1
        held = self.directory.longest_prefix(state.keys[:loadable_blocks])
        if held - local_blocks < self.config.min_load_blocks:
            return 0, False
        new_tokens = held * self.block_size - num_computed_tokens
        return new_tokens, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0:
            return
        state = self._state(request)
        start = state.local_computed_tokens // self.block_size
        count = num_external_tokens // self.block_size
        block_ids = blocks.get_block_ids()[0][start : start + count]
        keys = state.keys[start : start + count]
        if len(block_ids) != count or len(keys) != count:
            raise RuntimeError(
                f"symram: request {request.request_id} expected {count} blocks to load from "
                f"block {start}, got {len(block_ids)} block ids and {len(keys)} keys"
            )
        self._pending_loads.append(
            BlockJob(request.request_id, list(block_ids), keys, list(range(start, start + count)))
        )
        state.has_jobs = True
        # Loaded blocks are already in the store: never save them back.
        state.save_cursor = max(state.save_cursor, start + count)
        self.hit_tokens += num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> SymramConnectorMetadata:
        meta = SymramConnectorMetadata(
            loads=self._pending_loads,
            delayed_free=self._delayed_free,
            preempted=sorted(scheduler_output.preempted_req_ids or ()),
        )
        self._pending_loads = []
        self._delayed_free = []
        computed_before: dict[str, int] = {
            req.req_id: req.num_computed_tokens for req in scheduler_output.scheduled_new_reqs
        }
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, num_computed in zip(cached.req_ids, cached.num_computed_tokens, strict=True):
            computed_before[req_id] = num_computed
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            job = self._save_job(req_id, computed_before.get(req_id), num_scheduled)
            if job is not None:
                meta.saves.append(job)
        return meta

    def _save_job(
        self, req_id: str, computed_before: int | None, scheduled: int
    ) -> BlockJob | None:
        state = self._requests.get(req_id)
        if state is None or computed_before is None or self.kv_cache_manager is None:
            return None
        request = state.request
        self._state(request)  # pick up block hashes of newly appended tokens
        full_blocks = min((computed_before + scheduled) // self.block_size, len(state.keys))
        if not self.config.save_decode_blocks:
            full_blocks = min(full_blocks, request.num_prompt_tokens // self.block_size)
        if full_blocks <= state.save_cursor:
            return None
        block_ids = self.kv_cache_manager.get_block_ids(req_id)[0]
        job = BlockJob(req_id, [], [])
        for index in range(state.save_cursor, min(full_blocks, len(block_ids))):
            key = state.keys[index]
            if key in self._saving or self.directory.tiers_of(key):
                continue
            self._saving.add(key)
            job.block_ids.append(block_ids[index])
            job.keys.append(key)
            job.positions.append(index)
            self.events.saving(key, request, index)
        state.save_cursor = full_blocks
        if not job.keys:
            return None
        state.has_jobs = True
        return job

    def update_connector_output(self, worker_meta: SymramWorkerMetadata | None) -> None:
        if worker_meta is None:
            return
        self._saving.difference_update(worker_meta.processed)
        if worker_meta.removed:
            self.directory.remove(worker_meta.removed)
            self.events.removed(worker_meta.removed)
        if worker_meta.stored:
            self.directory.add(worker_meta.stored, "dram")
            self.events.stored(worker_meta.stored)
        stored = set(worker_meta.stored)
        self.events.dropped([k for k in worker_meta.processed if k not in stored])

    def request_finished(self, request: Request) -> bool:
        """True when workers may still be copying this request's blocks."""
        state = self._requests.pop(request.request_id, None)
        if state is None or not state.has_jobs:
            return False
        self._delayed_free.append(request.request_id)
        return True

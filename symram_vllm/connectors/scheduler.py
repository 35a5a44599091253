"""Scheduler-side half of the connector: decides what to load and what to save.

It never touches KV bytes. It keeps a directory of chain keys the workers hold
(fed by the workers' per-step metadata), answers "how many tokens can symram
supply for this request", and turns each engine step into load and save jobs.

With a shared (Redis) directory, "held" also covers blocks other engines put in a
tier this engine's workers can read (``shared_tiers``: the Redis page tier, the
disk slots of a shared disk_path). Promised loads are leased, so the page tier does
not evict them before the copy; a load that finds no intact page anyway is a load
error (vLLM recomputes) and the directory forgets the locations that misled it.

The scheduling path does no network I/O, whatever ``directory_url`` says: the
directory is an ``AsyncDirectory`` (in-process view and queues; one background
round trip per step). A fleet lookup is answered at a later step: until then a
waiting request is skipped for at most ``FLEET_WAIT_S`` (vLLM asks again), after
which it goes ahead with what is known locally.

This class answers vLLM's scheduler hooks and keeps the per-request state; the
save decisions are ``SavePlanner``'s, the hybrid allocator's block ids are read by
``hybrid_blocks``, and the workers' reports reach the directory through
``DirectoryFeed``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from symram_vllm.bypass import bypass_active
from symram_vllm.connectors.directory_feed import DirectoryFeed
from symram_vllm.connectors.hybrid_blocks import allocated_blocks, load_targets
from symram_vllm.connectors.kv_events import TierEventLog
from symram_vllm.connectors.metadata import BlockJob, SymramConnectorMetadata, SymramWorkerMetadata
from symram_vllm.connectors.request_state import RequestState
from symram_vllm.connectors.residency import RankReports
from symram_vllm.connectors.save_planner import SavePlanner
from symram_vllm.directory import Directory, EmbeddedDirectory
from symram_vllm.directory.async_directory import AsyncDirectory
from symram_vllm.keys import chain_keys
from symram_vllm.tiers.disk_layout import rank_slot_directories, stored_keys

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from symram_vllm.config import SymramConfig

logger = logging.getLogger(__name__)

# A waiting request waits this long at most for the fleet's answer to its lookup (one
# round trip, normally a millisecond): a fleet hit saves a prefill, which costs far
# more, so waiting is worth it, but a slow or dead Redis must not hold requests back.
FLEET_WAIT_S = 0.5
# After a worker said tier writes are still running, keep the engine stepping this
# long (idle steps are throttled) so their events reach the directory while idle.
PENDING_GRACE_S = 1.0
IDLE_STEP_PAUSE_S = 0.01


class SchedulerSide:
    def __init__(
        self,
        signature_digest: bytes,
        block_size: int,
        config: SymramConfig,
        directory: Directory | AsyncDirectory | None = None,
        *,
        page_bytes: int = 0,
        disk_tier: str = "disk",
        shared_tiers: frozenset[str] = frozenset(),
        tp_size: int = 1,
        num_groups: int = 1,
        windowed_groups: frozenset[int] = frozenset(),
    ) -> None:
        self.signature_digest = signature_digest
        # vLLM's hybrid allocator: KV-cache groups, each with its own block ids, and
        # those whose blocks leave a running request with the attention window.
        self.num_groups = num_groups
        self.windowed_groups = windowed_groups
        self.block_size = block_size
        self.config = config
        # Not `directory or ...`: an empty directory is falsy (its __len__ is 0).
        if directory is None:
            directory = EmbeddedDirectory()
        self._directory = (directory if isinstance(directory, AsyncDirectory)
                           else AsyncDirectory(directory))
        # Bytes of one page (all TP ranks' shards count once: dedupe is per block).
        self.page_bytes = page_bytes
        # The directory's name for this engine's disk tier: "disk.<store id>" when
        # engines share the disk_path (then it is one of the shared tiers), else "disk".
        self.disk_tier = disk_tier
        self._counters: dict[str, float] = {}
        self._worker_busy_until = 0.0
        self.kv_cache_manager: KVCacheManager | None = None
        self._requests: dict[str, RequestState] = {}
        self._pending_loads: list[BlockJob] = []
        self._delayed_free: list[str] = []
        self.lookups = 0
        self.hit_tokens = 0
        self.events = TierEventLog(block_size)
        # Stores complete when every tensor-parallel rank has reported its shard.
        self.reports = RankReports(tp_size)
        self.saves = SavePlanner(block_size, config, self.directory, self.events, self._count,
                                 page_bytes=page_bytes, num_groups=num_groups)
        self.feed = DirectoryFeed(self.directory, self.reports, self.events, self._count,
                                  disk_tier=disk_tier, shared_tiers=shared_tiers)

    @property
    def directory(self) -> AsyncDirectory:
        return self._directory

    @directory.setter
    def directory(self, directory: AsyncDirectory) -> None:
        # One directory for the whole half: replacing it (tests wrap it to count
        # calls) replaces the save planner's and the feed's too.
        self._directory = self.saves.directory = self.feed.directory = directory

    def seed_from_disk(self, tp_size: int) -> int:
        """Warm restart: blocks already on every rank's disk tier count as held.

        Workers report what they store only once steps run; without this the first
        requests after a restart would all miss. Names only, no reads: a page that
        turns out corrupt is a load error, which vLLM recomputes."""
        if self.config.disk_path is None:
            return 0
        held: set[bytes] | None = None
        for rank in range(tp_size):
            # Every slot: this engine's own and, on a shared disk_path, its peers'
            # (the workers read those too).
            roots = rank_slot_directories(self.config.disk_path, self.signature_digest, rank)
            if not self.config.disk_share:
                roots = roots[:1]
            keys = {
                key.chain for root in roots for key in stored_keys(root) if key.rank == rank
            }
            held = keys if held is None else held & keys
        if held:
            self.directory.register(list(held), self.disk_tier)
        return len(held or ())

    def _count(self, name: str, n: float = 1) -> None:
        self._counters[name] = self._counters.get(name, 0.0) + n

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
    ) -> tuple[int | None, bool]:
        state = self._state(request)
        state.local_computed_tokens = num_computed_tokens
        if bypass_active():  # the kill switch: vLLM computes everything itself
            self._release(state)
            return 0, False
        # vLLM must compute at least the last prompt token itself (it needs its logits).
        loadable_blocks = min(len(state.keys), (request.num_tokens - 1) // self.block_size)
        local_blocks = num_computed_tokens // self.block_size
        self._release(state)  # vLLM asks again when it could not allocate last time
        if loadable_blocks <= local_blocks:
            return 0, False
        self.lookups += 1
        # Blocks vLLM already has need not be held by us: chain keys name the whole
        # prefix, so the run to load starts right after them. The fleet's answer is a
        # lease (a lookup that also protects), so shared pages are not evicted before
        # the copy ends; it arrives at a later step.
        wanted = state.keys[local_blocks:loadable_blocks]
        answer = self.directory.lookup(request.request_id, wanted)
        if answer.pending and answer.held < len(wanted):
            now = time.monotonic()
            if state.fleet_wait_since is None:
                state.fleet_wait_since = now
            if now - state.fleet_wait_since < FLEET_WAIT_S:
                self._count("fleet_lookup_waits")
                return None, False  # vLLM skips the request and asks next step
        state.fleet_wait_since = None
        held = answer.held
        leased = list(wanted[: answer.leased])
        if held < self.config.min_load_blocks:
            if leased:
                self.directory.release(leased)
            return 0, False
        state.leased = leased
        self._count("lookup_hit_blocks", held)
        return held * self.block_size + local_blocks * self.block_size - num_computed_tokens, True

    def _release(self, state: RequestState) -> None:
        if state.leased:
            self.directory.release(state.leased)
            state.leased = []

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0:
            return
        state = self._state(request)
        start = state.local_computed_tokens // self.block_size
        count = num_external_tokens // self.block_size
        all_ids = blocks.get_block_ids()
        block_ids = all_ids[0][start : start + count]
        keys = state.keys[start : start + count]
        if len(block_ids) != count or len(keys) != count:
            raise RuntimeError(
                f"symram: request {request.request_id} expected {count} blocks to load from "
                f"block {start}, got {len(block_ids)} block ids and {len(keys)} keys"
            )
        job = BlockJob(request.request_id, list(block_ids), keys, list(range(start, start + count)))
        if self.num_groups > 1:
            job.group_block_ids = load_targets(
                request.request_id, self.windowed_groups, all_ids, start, count)
            job.block_ids = job.group_block_ids[0]
        self._pending_loads.append(job)
        state.has_jobs = True
        # Loaded blocks are already in the store: never save them back. They still
        # count as logical bytes for dedupe accounting (served, not stored again).
        if self.page_bytes and start + count > state.save_cursor:
            self.directory.record_store(keys[max(0, state.save_cursor - start) :],
                                        self.page_bytes)
        state.save_cursor = max(state.save_cursor, start + count)
        self.hit_tokens += num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> SymramConnectorMetadata:
        meta = SymramConnectorMetadata(
            loads=self._pending_loads,
            delayed_free=self._delayed_free,
            preempted=sorted(scheduler_output.preempted_req_ids or ()),
        )
        if self.windowed_groups:
            meta.allocated = allocated_blocks(scheduler_output)
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
        self.directory.end_step()  # this step's directory work: one background batch
        return meta

    def _save_job(
        self, req_id: str, computed_before: int | None, scheduled: int
    ) -> BlockJob | None:
        state = self._requests.get(req_id)
        if state is None or computed_before is None or self.kv_cache_manager is None:
            return None
        if bypass_active():
            return None
        self._state(state.request)  # pick up block hashes of newly appended tokens
        return self.saves.plan(state, computed_before, scheduled, self.kv_cache_manager)

    def update_connector_output(
        self,
        worker_meta: SymramWorkerMetadata | None,
        finished_recving: set[str] | frozenset[str] | None = None,
    ) -> None:
        for req_id in finished_recving or ():
            state = self._requests.get(req_id)
            if state is not None:
                self._release(state)
        if worker_meta is None:
            return
        self._worker_busy_until = time.monotonic() + PENDING_GRACE_S if worker_meta.pending else 0.0
        self.saves.acknowledged(worker_meta.processed)
        self.feed.apply(worker_meta)

    def request_finished(self, request: Request) -> bool:
        """True when workers may still be copying this request's blocks."""
        state = self._requests.pop(request.request_id, None)
        self.directory.forget(request.request_id)
        if state is None:
            return False
        self._release(state)
        if not state.has_jobs:
            return False
        self._delayed_free.append(request.request_id)
        return True

    def has_pending_work(self) -> bool:
        """Workers are still writing pages to tiers other engines read: keep the engine
        stepping (vLLM asks every loop) so the directory learns of them while idle.
        Without live requests each idle step is paced, not a busy loop."""
        if time.monotonic() >= self._worker_busy_until:
            return False
        if not self._requests:
            time.sleep(IDLE_STEP_PAUSE_S)
        return True

    # -- reporting -------------------------------------------------------------------------
    def take_stats(self) -> tuple[dict[str, float], dict[str, float]]:
        """(counters since the last call, gauges): lookups, leases, dedupe accounting.
        In-process: the directory's figures are what its background thread last read."""
        counters, self._counters = self._counters, {}
        d = self.directory.dedupe()
        gauges = {
            "dedupe_logical_bytes": float(d.logical_bytes),
            "dedupe_physical_bytes": float(d.physical_bytes),
            "dedupe_logical_blocks": float(d.logical_blocks),
            "dedupe_physical_blocks": float(d.physical_blocks),
            "dedupe_ratio": d.ratio,
        }
        available = self.directory.stats().get("available")
        if available is not None:
            gauges["directory_available"] = available
        return counters, gauges


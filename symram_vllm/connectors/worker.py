"""Worker-side half of the connector: moves pages between the engine's KV cache and
the TieredStore, off the forward path, and reports what happened.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from symram_vllm import latency_sink
from symram_vllm.bypass import bypass_active
from symram_vllm.config import SymramConfig
from symram_vllm.connectors.metadata import BlockJob, SymramConnectorMetadata, SymramWorkerMetadata
from symram_vllm.connectors.page_mover import PageMover
from symram_vllm.connectors.transfer import TransferRunner
from symram_vllm.connectors.worker_tiers import (
    open_disk_tier,
    open_remote_tiers,
    start_control_server,
    tier_report,
)
from symram_vllm.keys import BlockKey
from symram_vllm.layout import KVLayout, LayoutError
from symram_vllm.store import TieredStore

if TYPE_CHECKING:  # imported when the endpoint starts: FastAPI only where it is used
    from symram_vllm.control import ControlServer

logger = logging.getLogger(__name__)


@dataclass
class JobResult:
    req_id: str
    moved_blocks: int = 0
    moved_bytes: int = 0
    seconds: float = 0.0
    failed_block_ids: list[int] = field(default_factory=list)
    processed_keys: list[bytes] = field(default_factory=list)
    skipped: int = 0
    # Pages not stored because the KV held inf/NaN (a quantized page would decode to NaN).
    nonfinite: int = 0
    # The chain key whose page could not be loaded (none of the tiers had it intact).
    failed_keys: list[bytes] = field(default_factory=list)
    # Device copy operations and kernel launches the job issued.
    ops: int = 0
    # The job raised: a load failed all its blocks, a save dropped its pages.
    error: bool = False


class WorkerSide:
    def __init__(
        self,
        config: SymramConfig,
        rank: int,
        *,
        namespace: bytes = b"",
        info: dict[str, object] | None = None,
    ) -> None:
        self.config = config
        self.rank = rank
        # The signature digest: names this model's disk directory and control keys.
        self.namespace = namespace
        self.info = dict(info or {})
        self.layout: KVLayout | None = None
        self.mover: PageMover | None = None
        self.store: TieredStore | None = None
        self.runner: TransferRunner | None = None
        self.control: ControlServer | None = None
        self._lock = threading.Lock()
        self._loads: dict[str, tuple[BlockJob, Future[JobResult]]] = {}
        self._saves: dict[str, list[tuple[BlockJob, Future[JobResult]]]] = defaultdict(list)
        self._awaiting_free: set[str] = set()
        self._load_errors: set[int] = set()
        # Requests whose load failed, for models with several KV-cache groups: vLLM
        # maps block-level errors back to requests only for one group, so these are
        # reported per request (it recomputes the whole prompt).
        self._failed_loads: set[str] = set()
        self._processed: list[bytes] = []
        self._failed_keys: list[bytes] = []
        self._counters: dict[str, float] = defaultdict(float)
        self.disabled_reason: str | None = None
        self._seen: dict[str, float] = {}
        # Brings a load job's next batch into DRAM while the current one is copied.
        self._stager: ThreadPoolExecutor | None = None

    # -- setup ---------------------------------------------------------------------------
    def register_kv_caches(
        self, kv_caches: dict[str, torch.Tensor], layer_groups: dict[str, int] | None = None
    ) -> None:
        try:
            layout = KVLayout(kv_caches, layer_groups)
        except LayoutError as exc:
            self._disable(f"unsupported KV cache layout: {exc}")
            return
        try:
            mover = PageMover(layout, self.config.codec)
        except ValueError as exc:
            self._disable(f"codec {self.config.codec!r} cannot encode this cache: {exc}")
            return
        self.layout, self.mover = layout, mover
        disk = open_disk_tier(self.config, self.namespace, self.rank)
        remotes, redis_pages = open_remote_tiers(self.config, self.namespace, self.rank, disk)
        self.store = TieredStore(
            mover.page_bytes, self.config.dram_bytes, disk=disk, policy=self.config.policy,
            remotes=remotes, redis_pages=redis_pages,
            device_index=layout.device.index if layout.device.type == "cuda" else None,
        )
        self.runner = TransferRunner(layout.device, self.config.transfer_threads)
        self.control = start_control_server(self.config, self.store, self.rank, self.info)
        logger.info(
            "symram worker rank %d: %d layers in %d KV-cache group(s), page %d bytes (codec "
            "%s), DRAM tier %d pages (%s pinned; %s), disk tier %s, remote tiers %s",
            self.rank,
            len(layout.layers),
            layout.num_groups,
            mover.page_bytes,
            mover.codec_name,
            self.store.dram.num_slots,
            "" if self.store.dram.pinned else "not",
            self.store.dram.placement,
            disk.root if disk is not None else "off",
            ", ".join(r.name for r in self.store.stack.remotes) or "none",
        )

    def _disable(self, reason: str) -> None:
        # Serving continues without symram rather than risking a wrong token.
        self.disabled_reason = reason
        logger.error("symram disabled on worker rank %d: %s", self.rank, reason)

    @property
    def active(self) -> bool:
        return self.store is not None and self.disabled_reason is None

    # -- per-step entry points -----------------------------------------------------------
    def handle_preemptions(self, meta: SymramConnectorMetadata) -> None:
        """Blocks about to be overwritten must be read first: preempted requests'
        blocks (freed at once), and blocks a sliding-window group freed under a
        running request that this step hands to another (`meta.allocated`)."""
        if not meta.preempted and not meta.allocated:
            return
        reused = set(meta.allocated)
        with self._lock:
            pending = [f for req in meta.preempted for _, f in self._saves.get(req, [])]
            if reused:
                pending += [f for jobs in self._saves.values() for job, f in jobs
                            if not f.done() and not reused.isdisjoint(job.engine_blocks())]
        if pending and reused:
            self._counters["save_reuse_waits"] += 1
        wait(pending)

    def start_loads(self, meta: SymramConnectorMetadata, *, idle_step: bool = False) -> None:
        """Start this step's loads. On a step with no forward pass nothing competes
        for the copy, so wait for it: the request is then reported loaded in this
        same step instead of the next one (one engine step less on every hit)."""
        submitted: list[Future[JobResult]] = []
        for job in meta.loads:
            if not self.active:
                self._fail_job(job)
                continue
            assert self.runner is not None
            try:
                future = self.runner.submit(lambda job=job: self._run_load(job))
            except Exception:
                logger.exception("symram could not start a load for %s", job.req_id)
                self._fail_job(job)
                continue
            submitted.append(future)
            with self._lock:
                self._loads[job.req_id] = (job, future)
        if idle_step and submitted:
            wait(submitted)

    def submit_saves(self, meta: SymramConnectorMetadata) -> None:
        with self._lock:
            self._awaiting_free.update(meta.delayed_free)
        if not self.active:
            with self._lock:
                self._processed.extend(k for job in meta.saves for k in job.keys)
            return
        assert self.runner is not None
        for job in meta.saves:
            try:
                future = self.runner.submit(lambda job=job: self._run_save(job))
            except Exception:  # no copy started: nothing holds the blocks
                logger.exception("symram could not start a save for %s", job.req_id)
                with self._lock:
                    self._processed.extend(job.keys)
                    self._counters["save_job_errors"] += 1
                continue
            with self._lock:
                self._saves[job.req_id].append((job, future))

    def _fail_job(self, job: BlockJob) -> None:
        future: Future[JobResult] = Future()
        future.set_result(JobResult(job.req_id, failed_block_ids=list(job.block_ids)))
        with self._lock:
            self._loads[job.req_id] = (job, future)

    # -- the copies (run on the transfer thread) -----------------------------------------
    # A job's outcome is data: every block is either moved or reported failed. An
    # exception anywhere in a copy never escapes as a vanished future; a load turns it
    # into load errors for every block of the job (vLLM recomputes them), a save
    # abandons its pages (nothing half-written is ever published).
    def _run_load(self, job: BlockJob) -> JobResult:
        return self._run(job, JobResult(job.req_id), self._load_job, "load")

    def _batches(self, n: int) -> range:
        """Start indexes of a job's batches. A batch holds its DRAM rows until its copy
        ends, so it must leave room in the arena: a job larger than half the DRAM tier
        moves in several batches (still one device operation per layer per batch)."""
        assert self.store is not None
        return range(0, n, max(1, self.store.dram.num_slots // 2))

    def _load_job(self, job: BlockJob, result: JobResult) -> None:
        """Batches are double-buffered: while one batch's rows are copied into the
        engine's blocks, the next batch's pages are brought into DRAM (disk reads,
        remote fetches) on the staging thread. Each batch is at most half the arena,
        so both fit."""
        assert self.store is not None and self.mover is not None
        store = self.store
        keys = [BlockKey(chain, self.rank) for chain in job.keys]
        batches = self._batches(len(keys))
        parts = [keys[start : start + batches.step] for start in batches]
        moved = 0
        staged: Future[list[int]] | None = self._stage(parts[0]) if parts else None
        try:
            for i, (start, part) in enumerate(zip(batches, parts, strict=True)):
                assert staged is not None
                rows, staged = staged.result(), None
                try:
                    if len(rows) == len(part) and i + 1 < len(parts):
                        staged = self._stage(parts[i + 1])
                    if rows:
                        result.ops += self.mover.load(
                            store.dram.arena, rows, job.ids(start, start + len(rows)))
                finally:
                    store.release_many(part[: len(rows)])
                moved += len(rows)
                if len(rows) < len(part):
                    break
        finally:
            if staged is not None:  # a copy failed with the next batch staged: free it
                with contextlib.suppress(Exception):
                    rows = staged.result()
                    store.release_many(parts[i + 1][: len(rows)])
        result.moved_blocks = moved
        result.moved_bytes = moved * self.mover.page_bytes
        if moved < len(job.block_ids):
            # vLLM recomputes from the first failed block on; later blocks are unusable
            # without it, so report them all.
            result.failed_block_ids = list(job.block_ids[moved:])
            result.failed_keys = [job.keys[moved]]

    def _stage(self, keys: list[BlockKey]) -> Future[list[int]]:
        """Hold the arena rows of `keys` (promoted into DRAM first) on the staging
        thread."""
        assert self.store is not None
        if self._stager is None:
            self._stager = ThreadPoolExecutor(1, thread_name_prefix="symram-stage")
        return self._stager.submit(self.store.acquire_prefix, keys)

    def _run_save(self, job: BlockJob) -> JobResult:
        return self._run(job, JobResult(job.req_id, processed_keys=list(job.keys)),
                         self._save_job, "save")

    def _run(
        self, job: BlockJob, result: JobResult,
        body: Callable[[BlockJob, JobResult], None], kind: str,
    ) -> JobResult:
        start = time.perf_counter()
        try:
            body(job, result)
        except Exception:
            logger.exception("symram %s job for %s failed; %s", kind, job.req_id,
                             "vLLM recomputes it" if kind == "load" else "its pages are dropped")
            result.error = True
            result.moved_blocks = result.moved_bytes = 0
            if kind == "load":
                result.failed_block_ids = list(job.block_ids)
                result.failed_keys = list(job.keys[:1])
        result.seconds = time.perf_counter() - start
        return result

    def _save_job(self, job: BlockJob, result: JobResult) -> None:
        assert self.store is not None and self.mover is not None
        if bypass_active():  # the kill switch: nothing new enters the tiers
            result.skipped = len(job.keys)
            return
        keys = [BlockKey(chain, self.rank) for chain in job.keys]
        parents: list[BlockKey | None] = [
            keys[i - 1] if i > 0 and job.position(i - 1) == job.position(i) - 1 else None
            for i in range(len(keys))
        ]
        positions = [job.position(i) for i in range(len(keys))]
        batches = self._batches(len(keys))
        for start in batches:
            end = start + batches.step
            self._save_batch(job, result, keys[start:end], positions[start:end],
                             parents[start:end], job.ids(start, end))
        result.moved_bytes = result.moved_blocks * self.mover.page_bytes

    def _save_batch(
        self, job: BlockJob, result: JobResult, keys: list[BlockKey], positions: list[int],
        parents: list[BlockKey | None], block_ids: list[int] | list[list[int]],
    ) -> None:
        assert self.store is not None and self.mover is not None
        rows = self.store.reserve_many(keys, positions, parents)
        todo = [i for i, row in enumerate(rows) if row is not None]
        for i, row in enumerate(rows):
            if row is None:
                result.skipped += 1
                if self.store.contains(keys[i]):
                    self.store.readvertise(keys[i])
        if not todo:
            return
        try:
            nonfinite, ops = self.mover.save(
                _select(block_ids, todo), self.store.dram.arena, [rows[i] for i in todo],
            )
        except BaseException:
            # Copies already queued on the device must land before the rows are reused.
            with contextlib.suppress(Exception):
                self.mover.fence()
            for i in todo:
                self.store.abort(keys[i])
            raise
        result.ops += ops
        for i, bad in zip(todo, nonfinite, strict=True):
            if bad:
                # Never cache a poisoned page: a later hit would hand NaN to attention
                # where recomputation gives the engine's own (equally non-finite, but
                # not persisted) result.
                self.store.abort(keys[i])
                result.nonfinite += 1
                continue
            self.store.commit(keys[i])
            result.moved_blocks += 1

    # -- completion ----------------------------------------------------------------------
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        recving: set[str] = set()
        sending: set[str] = set()
        with self._lock:
            for req_id, (job, future) in list(self._loads.items()):
                if future.done():
                    del self._loads[req_id]
                    recving.add(req_id)
                    self._absorb(future, "load", job)
            for req_id, futures in list(self._saves.items()):
                remaining = [(j, f) for j, f in futures if not f.done()]
                for j, f in futures:
                    if f.done():
                        self._absorb(f, "save", j)
                if remaining:
                    self._saves[req_id] = remaining
                else:
                    del self._saves[req_id]
            for req_id in list(self._awaiting_free):
                if req_id not in self._saves and req_id not in self._loads:
                    self._awaiting_free.discard(req_id)
                    sending.add(req_id)
        return sending, recving

    def _absorb(self, future: Future[JobResult], kind: str, job: BlockJob) -> None:
        try:
            result = future.result()
        except BaseException:  # _run_* catch everything; this is the last line of defence
            logger.exception("symram %s job failed", kind)
            result = JobResult(job.req_id)
            if kind == "load":
                result.failed_block_ids = list(job.block_ids)
                result.failed_keys = list(job.keys[:1])
            else:
                result.processed_keys = list(job.keys)
            result.error = True
        self._counters[f"{kind}_job_errors"] += int(result.error)
        self._counters["transfer_ops"] += result.ops
        self._counters[f"{kind}_jobs"] += 1
        if not result.error:
            latency_sink.record(kind, result.seconds)  # symram:{load,save}_duration_seconds
        if kind == "load":
            self._counters["loaded_blocks"] += result.moved_blocks
            self._counters["load_bytes"] += result.moved_bytes
            self._counters["load_seconds"] += result.seconds
            self._counters["load_failed_blocks"] += len(result.failed_block_ids)
            if result.failed_block_ids and job.group_block_ids is not None:
                self._failed_loads.add(job.req_id)
            else:
                self._load_errors.update(result.failed_block_ids)
            self._failed_keys.extend(result.failed_keys)
        else:
            self._counters["saved_blocks"] += result.moved_blocks
            self._counters["save_bytes"] += result.moved_bytes
            self._counters["save_seconds"] += result.seconds
            self._counters["save_skipped_blocks"] += result.skipped
            self._counters["nonfinite_pages"] += result.nonfinite
            self._processed.extend(result.processed_keys)

    def take_failed_loads(self, finished: set[str]) -> set[str]:
        """Requests among `finished` (loads reported done) whose load failed."""
        with self._lock:
            failed = self._failed_loads & finished
            self._failed_loads -= failed
            return failed

    def take_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
            return errors

    def build_worker_meta(self) -> SymramWorkerMetadata | None:
        with self._lock:
            processed, self._processed = self._processed, []
            failed, self._failed_keys = self._failed_keys, []
        events = self.store.drain_events() if self.store is not None else None
        pending = self.store is not None and self.store.busy()
        if not processed and not events and not failed and not pending:
            return None
        meta = SymramWorkerMetadata(processed=processed, load_failed=failed, pending=pending)
        if events:
            meta.events = events.tier_events(self.rank)
        return meta

    def take_counters(self) -> tuple[dict[str, float], dict[str, float]]:
        """Counters since the last call, and current gauges."""
        with self._lock:
            counters, self._counters = dict(self._counters), defaultdict(float)
        gauges: dict[str, float] = {}
        if self.store is not None:
            totals, gauges = tier_report(self.store.stats())
            for name, total in totals.items():
                counters[name] = total - self._seen.get(name, 0.0)
                self._seen[name] = total
        if self.control is not None:
            restarts = float(self.control.restarts)
            counters["control_restarts"] = restarts - self._seen.get("control_restarts", 0.0)
            self._seen["control_restarts"] = restarts
        return counters, gauges

    def shutdown(self) -> None:
        if self.control is not None:
            self.control.stop()
        if self.runner is not None:
            self.runner.shutdown()
        if self._stager is not None:
            self._stager.shutdown(wait=True)
        if self.store is not None:
            if self.store.disk is not None and self.config.flush_on_exit_s > 0:
                # Warm restart: what only DRAM holds would otherwise be lost.
                start = time.perf_counter()
                try:
                    self.store.flush(self.config.flush_on_exit_s)
                    logger.info(
                        "symram rank %d: DRAM flushed to disk in %.2fs",
                        self.rank, time.perf_counter() - start,
                    )
                except Exception:
                    logger.exception("symram rank %d: flushing DRAM to disk failed", self.rank)
            self.store.close()


def _select(
    block_ids: list[int] | list[list[int]], picks: list[int]
) -> list[int] | list[list[int]]:
    """Entries `picks` of a job's ids, per group when there are groups."""
    if block_ids and isinstance(block_ids[0], list):
        return [[group[i] for i in picks] for group in block_ids]  # type: ignore[index]
    return [block_ids[i] for i in picks]  # type: ignore[misc]

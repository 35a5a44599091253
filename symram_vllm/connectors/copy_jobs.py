"""Runs one load or save job between the engine's KV cache and the tier stack.

Called on the transfer thread (``TransferRunner``), one job at a time per thread.

* A job's outcome is data: every block is either moved or reported failed. An
  exception anywhere in a copy never escapes as a vanished future; a load turns it
  into load errors for every block of the job (vLLM recomputes them), a save abandons
  its pages (nothing half-written is ever published).
* A batch holds its DRAM rows until its copy ends, so a job larger than half the DRAM
  tier moves in several batches (still one device operation per layer per batch).
* Loads are double-buffered: while one batch's rows are copied into the engine's
  blocks, the next batch's pages are brought into DRAM (disk reads, remote fetches)
  on the staging thread. Each batch is at most half the arena, so both fit.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from symram_vllm.bypass import bypass_active
from symram_vllm.connectors.metadata import BlockJob
from symram_vllm.connectors.page_mover import PageMover
from symram_vllm.keys import BlockKey
from symram_vllm.store import TieredStore

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
    # A load missed while a remote tier could not be asked: vLLM recomputes, but the
    # directory keeps its locations (the page may well be there).
    missed_unreachable: bool = False
    # Device copy operations and kernel launches the job issued.
    ops: int = 0
    # The job raised: a load failed all its blocks, a save dropped its pages.
    error: bool = False

    @classmethod
    def failed(cls, job: BlockJob, kind: str) -> JobResult:
        """A job that raised: a load fails all its blocks (vLLM recomputes them from
        the first), a save's keys count as processed (nothing of it was published)."""
        result = cls(job.req_id, error=True)
        if kind == "load":
            result.failed_block_ids = list(job.block_ids)
            result.failed_keys = list(job.keys[:1])
        else:
            result.processed_keys = list(job.keys)
        return result


class CopyJobs:
    def __init__(self, store: TieredStore, mover: PageMover, rank: int) -> None:
        self.store = store
        self.mover = mover
        self.rank = rank
        # Brings a load job's next batch into DRAM while the current one is copied.
        self._stager: ThreadPoolExecutor | None = None

    def run_load(self, job: BlockJob) -> JobResult:
        return self._run(job, JobResult(job.req_id), self._load_job, "load")

    def run_save(self, job: BlockJob) -> JobResult:
        return self._run(job, JobResult(job.req_id, processed_keys=list(job.keys)),
                         self._save_job, "save")

    def shutdown(self) -> None:
        if self._stager is not None:
            self._stager.shutdown(wait=True)

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

    def _batches(self, n: int) -> range:
        """Start indexes of a job's batches: each at most half the DRAM tier."""
        return range(0, n, max(1, self.store.dram.num_slots // 2))

    # -- loads -----------------------------------------------------------------------------
    def _load_job(self, job: BlockJob, result: JobResult) -> None:
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
            if store.remotes_reachable():
                result.failed_keys = [job.keys[moved]]
            else:
                result.missed_unreachable = True

    def _stage(self, keys: list[BlockKey]) -> Future[list[int]]:
        """Hold the arena rows of `keys` (promoted into DRAM first) on the staging
        thread."""
        if self._stager is None:
            self._stager = ThreadPoolExecutor(1, thread_name_prefix="symram-stage")
        return self._stager.submit(self.store.acquire_prefix, keys)

    # -- saves -----------------------------------------------------------------------------
    def _save_job(self, job: BlockJob, result: JobResult) -> None:
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
            self._save_batch(result, keys[start:end], positions[start:end],
                             parents[start:end], job.ids(start, end))
        result.moved_bytes = result.moved_blocks * self.mover.page_bytes

    def _save_batch(
        self, result: JobResult, keys: list[BlockKey], positions: list[int],
        parents: list[BlockKey | None], block_ids: list[int] | list[list[int]],
    ) -> None:
        store = self.store
        rows = store.reserve_many(keys, positions, parents)
        todo = [i for i, row in enumerate(rows) if row is not None]
        for i, row in enumerate(rows):
            if row is None:
                result.skipped += 1
                if store.contains(keys[i]):
                    store.readvertise(keys[i])
        if not todo:
            return
        try:
            nonfinite, ops = self.mover.save(
                _select(block_ids, todo), store.dram.arena, [rows[i] for i in todo],
            )
        except BaseException:
            # Copies already queued on the device must land before the rows are reused.
            with contextlib.suppress(Exception):
                self.mover.fence()
            for i in todo:
                store.abort(keys[i])
            raise
        result.ops += ops
        for i, bad in zip(todo, nonfinite, strict=True):
            if bad:
                # Never cache a poisoned page: a later hit would hand NaN to attention
                # where recomputation gives the engine's own (equally non-finite, but
                # not persisted) result.
                store.abort(keys[i])
                result.nonfinite += 1
                continue
            store.commit(keys[i])
            result.moved_blocks += 1


def _select(
    block_ids: list[int] | list[list[int]], picks: list[int]
) -> list[int] | list[list[int]]:
    """Entries `picks` of a job's ids, per group when there are groups."""
    if block_ids and isinstance(block_ids[0], list):
        return [[group[i] for i in picks] for group in block_ids]  # type: ignore[index]
    return [block_ids[i] for i in picks]  # type: ignore[misc]

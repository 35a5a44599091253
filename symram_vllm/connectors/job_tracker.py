"""The worker's copy jobs in flight, per request, and what their outcomes tell vLLM.

* A request's blocks go back to vLLM (``get_finished``) only after every job touching
  them returned: a finished request waits for its saves (``delayed_free``), and blocks
  about to be overwritten (a preempted request's, or a windowed group's freed blocks
  handed to another request) are read by their saves first (``fence``).
* Outcomes become what vLLM and the scheduler side consume: load errors per block
  (one KV-cache group) or per request (several groups: vLLM maps block errors back to
  requests only for one), keys processed by saves, keys no tier had intact, and
  counters. All of it is taken (and reset) by the caller once per step.

Futures are added by the engine's thread and completed on the transfer thread; every
field is read and written under one lock.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import Future, wait

from symram_vllm import latency_sink
from symram_vllm.connectors.copy_jobs import JobResult
from symram_vllm.connectors.metadata import BlockJob

logger = logging.getLogger(__name__)


class JobTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.loads: dict[str, tuple[BlockJob, Future[JobResult]]] = {}
        self.saves: dict[str, list[tuple[BlockJob, Future[JobResult]]]] = defaultdict(list)
        self._awaiting_free: set[str] = set()
        self._load_errors: set[int] = set()
        # Requests whose load failed, for models with several KV-cache groups: vLLM
        # maps block-level errors back to requests only for one group, so these are
        # reported per request (it recomputes the whole prompt).
        self._failed_loads: set[str] = set()
        self._processed: list[bytes] = []
        self._failed_keys: list[bytes] = []
        self._counters: dict[str, float] = defaultdict(float)

    # -- jobs in ---------------------------------------------------------------------------
    def add_load(self, job: BlockJob, future: Future[JobResult]) -> None:
        with self._lock:
            self.loads[job.req_id] = (job, future)

    def fail_load(self, job: BlockJob) -> None:
        """A load that never started: all its blocks fail (vLLM recomputes them)."""
        future: Future[JobResult] = Future()
        future.set_result(JobResult(job.req_id, failed_block_ids=list(job.block_ids)))
        self.add_load(job, future)

    def add_save(self, job: BlockJob, future: Future[JobResult]) -> None:
        with self._lock:
            self.saves[job.req_id].append((job, future))

    def save_not_started(self, job: BlockJob) -> None:
        """No copy started, so nothing holds the blocks: the keys are done with."""
        with self._lock:
            self._processed.extend(job.keys)
            self._counters["save_job_errors"] += 1

    def skip_saves(self, jobs: Iterable[BlockJob]) -> None:
        """Saves not attempted (symram is off on this worker): the keys are done with."""
        with self._lock:
            self._processed.extend(k for job in jobs for k in job.keys)

    def free_when_done(self, req_ids: Iterable[str]) -> None:
        """Finished requests: report them once their jobs have returned."""
        with self._lock:
            self._awaiting_free.update(req_ids)

    # -- fences ----------------------------------------------------------------------------
    def fence(self, preempted: Iterable[str], reused: Iterable[int]) -> None:
        """Wait for the saves still reading blocks about to be overwritten: every save
        of the `preempted` requests, and any save reading one of the `reused` blocks."""
        blocks = set(reused)
        with self._lock:
            pending = [f for req in preempted for _, f in self.saves.get(req, [])]
            if blocks:
                pending += [f for jobs in self.saves.values() for job, f in jobs
                            if not f.done() and not blocks.isdisjoint(job.engine_blocks())]
            if pending and blocks:
                self._counters["save_reuse_waits"] += 1
        wait(pending)

    # -- completion ------------------------------------------------------------------------
    def get_finished(self) -> tuple[set[str], set[str]]:
        """(requests whose blocks may be freed, requests whose load finished)."""
        recving: set[str] = set()
        sending: set[str] = set()
        with self._lock:
            for req_id, (job, future) in list(self.loads.items()):
                if future.done():
                    del self.loads[req_id]
                    recving.add(req_id)
                    self._absorb(future, "load", job)
            for req_id, futures in list(self.saves.items()):
                remaining = [(j, f) for j, f in futures if not f.done()]
                for j, f in futures:
                    if f.done():
                        self._absorb(f, "save", j)
                if remaining:
                    self.saves[req_id] = remaining
                else:
                    del self.saves[req_id]
            for req_id in list(self._awaiting_free):
                if req_id not in self.saves and req_id not in self.loads:
                    self._awaiting_free.discard(req_id)
                    sending.add(req_id)
        return sending, recving

    def _absorb(self, future: Future[JobResult], kind: str, job: BlockJob) -> None:
        try:
            result = future.result()
        except BaseException:  # CopyJobs catches everything; this is the last line of defence
            logger.exception("symram %s job failed", kind)
            result = JobResult.failed(job, kind)
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
            self._counters["load_unreachable_misses"] += int(result.missed_unreachable)
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

    # -- outcomes, taken once per step -----------------------------------------------------
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

    def take_keys(self) -> tuple[list[bytes], list[bytes]]:
        """(keys the saves are done with, keys a load found no intact page for)."""
        with self._lock:
            processed, self._processed = self._processed, []
            failed, self._failed_keys = self._failed_keys, []
            return processed, failed

    def take_counters(self) -> dict[str, float]:
        with self._lock:
            counters, self._counters = dict(self._counters), defaultdict(float)
            return counters

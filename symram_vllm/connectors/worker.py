"""Worker-side half of the connector: moves pages between the engine's KV cache and
the TieredStore, off the forward path, and reports what happened.

This class wires the pieces and is vLLM's entry point on the worker:

* set-up: the KV layout, the page mover and the tiers (``worker_tiers``);
* each step: jobs go to the transfer thread (``TransferRunner``), which runs them
  (``CopyJobs``); ``JobTracker`` holds them until they return and turns their
  outcomes into what vLLM and the scheduler side are told;
* reporting: job counters, and tier totals as deltas since the last report.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING

import torch

from symram_vllm.config import SymramConfig
from symram_vllm.connectors.copy_jobs import CopyJobs, JobResult
from symram_vllm.connectors.job_tracker import JobTracker
from symram_vllm.connectors.metadata import SymramConnectorMetadata, SymramWorkerMetadata
from symram_vllm.connectors.page_mover import PageMover
from symram_vllm.connectors.transfer import TransferRunner
from symram_vllm.connectors.worker_tiers import (
    open_disk_tier,
    open_remote_tiers,
    start_control_server,
    tier_report,
)
from symram_vllm.layout import KVLayout, LayoutError
from symram_vllm.store import TieredStore

if TYPE_CHECKING:  # imported when the endpoint starts: FastAPI only where it is used
    from symram_vllm.control import ControlServer

logger = logging.getLogger(__name__)


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
        self.copies: CopyJobs | None = None
        self.runner: TransferRunner | None = None
        self.control: ControlServer | None = None
        self.jobs = JobTracker()
        self.disabled_reason: str | None = None
        # Last cumulative tier totals reported: counters are sent as deltas.
        self._seen: dict[str, float] = {}

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
        self.copies = CopyJobs(self.store, mover, self.rank)
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
        if meta.preempted or meta.allocated:
            self.jobs.fence(meta.preempted, meta.allocated)

    def start_loads(self, meta: SymramConnectorMetadata, *, idle_step: bool = False) -> None:
        """Start this step's loads. On a step with no forward pass nothing competes
        for the copy, so wait for it: the request is then reported loaded in this
        same step instead of the next one (one engine step less on every hit)."""
        submitted: list[Future[JobResult]] = []
        copies = self.copies
        for job in meta.loads:
            if not self.active or copies is None:
                self.jobs.fail_load(job)
                continue
            assert self.runner is not None
            try:
                future = self.runner.submit(lambda job=job: copies.run_load(job))
            except Exception:
                logger.exception("symram could not start a load for %s", job.req_id)
                self.jobs.fail_load(job)
                continue
            submitted.append(future)
            self.jobs.add_load(job, future)
        if idle_step and submitted:
            wait(submitted)

    def submit_saves(self, meta: SymramConnectorMetadata) -> None:
        self.jobs.free_when_done(meta.delayed_free)
        if not self.active:
            self.jobs.skip_saves(meta.saves)
            return
        assert self.runner is not None and self.copies is not None
        copies = self.copies
        for job in meta.saves:
            try:
                future = self.runner.submit(lambda job=job: copies.run_save(job))
            except Exception:  # no copy started: nothing holds the blocks
                logger.exception("symram could not start a save for %s", job.req_id)
                self.jobs.save_not_started(job)
                continue
            self.jobs.add_save(job, future)

    # -- completion ----------------------------------------------------------------------
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        # Finished requests are known through meta.delayed_free (the scheduler side
        # asks only for those with jobs), not through `finished_req_ids`.
        return self.jobs.get_finished()

    def take_failed_loads(self, finished: set[str]) -> set[str]:
        """Requests among `finished` (loads reported done) whose load failed."""
        return self.jobs.take_failed_loads(finished)

    def take_load_errors(self) -> set[int]:
        return self.jobs.take_load_errors()

    def build_worker_meta(self) -> SymramWorkerMetadata | None:
        processed, failed = self.jobs.take_keys()
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
        counters = self.jobs.take_counters()
        gauges: dict[str, float] = {}
        if self.store is not None:
            totals, gauges = tier_report(self.store.stats())
            for name, total in totals.items():
                counters[name] = self._delta(name, total)
        if self.control is not None:
            counters["control_restarts"] = self._delta(
                "control_restarts", float(self.control.restarts))
        return counters, gauges

    def _delta(self, name: str, total: float) -> float:
        delta = total - self._seen.get(name, 0.0)
        self._seen[name] = total
        return delta

    def shutdown(self) -> None:
        if self.control is not None:
            self.control.stop()
        if self.runner is not None:
            self.runner.shutdown()
        if self.copies is not None:
            self.copies.shutdown()
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

"""Turns the workers' per-step reports into directory updates and KV events.

Stores count once every tensor-parallel rank has reported its shard (``RankReports``);
any rank's removal counts at once. What goes where:

* this engine's DRAM and disk slot ("local"): registered under this engine's own
  locations, and published as KV events; a removal forgets only this engine's
  locations (a copy in Redis, or in a peer's disk slot, is still there);
* the Redis page tier: one copy fleet-wide, so an eviction forgets it for everyone;
* keys a load found no intact page for: the directory promised what no tier could
  deliver, so this engine's locations and the shared ones are forgotten, and nobody
  is misled again (the worker does not report a miss made while a remote tier could
  not be asked: ``CopyJobs``).
"""

from __future__ import annotations

from collections.abc import Callable

from symram_vllm.connectors.kv_events import TierEventLog
from symram_vllm.connectors.metadata import SymramWorkerMetadata
from symram_vllm.connectors.residency import RankReports
from symram_vllm.directory.async_directory import AsyncDirectory


class DirectoryFeed:
    def __init__(
        self,
        directory: AsyncDirectory,
        reports: RankReports,
        events: TierEventLog,
        count: Callable[[str, float], None],
        *,
        disk_tier: str,
        shared_tiers: frozenset[str],
    ) -> None:
        self.directory = directory
        self.reports = reports
        self.events = events
        self._count = count
        # The directory's name for this engine's disk tier ("disk.<store id>" when
        # engines share the disk_path) and the tiers other engines read too.
        self.disk_tier = disk_tier
        self.shared_tiers = shared_tiers

    def apply(self, worker_meta: SymramWorkerMetadata) -> None:
        directory = self.directory
        stored, removed = self.reports.apply(worker_meta.events)
        if removed["local"]:
            directory.unregister_own(removed["local"], "dram")
            directory.unregister_own(removed["local"], self.disk_tier)
            self.events.removed(removed["local"])
        if removed["disk"]:
            directory.unregister_own(removed["disk"], self.disk_tier)
        if removed["redis"]:
            directory.unregister(removed["redis"], "redis")
            self._count("redis_removed_blocks", len(removed["redis"]))
        if worker_meta.load_failed:
            failed = worker_meta.load_failed
            directory.unregister(failed)
            for tier in self.shared_tiers:
                directory.unregister(failed, tier)
            self._count("directory_stale_blocks", len(failed))
        if stored["local"]:
            directory.register(stored["local"], "dram")
            self.events.stored(stored["local"])
        if stored["disk"]:
            directory.register(stored["disk"], self.disk_tier)
        if stored["redis"]:
            directory.register(stored["redis"], "redis")
        # A save that ended without storing (skipped or failed) announces nothing; one
        # still waiting for other ranks' shards keeps its pending KV event.
        done = set(stored["local"])
        self.events.dropped([
            k for k in worker_meta.processed
            if k not in done and not self.reports.waiting("local", k)
        ])

"""Worker metadata for scheduler tests, written the short way (one rank unless said)."""

from __future__ import annotations

from symram_vllm.connectors.metadata import SymramWorkerMetadata
from symram_vllm.tiers.events import TierEvent

FIELDS = {
    "stored": ("local", "stored"), "removed": ("local", "removed"),
    "disk_stored": ("disk", "stored"), "disk_removed": ("disk", "removed"),
    "redis_stored": ("redis", "stored"), "redis_removed": ("redis", "removed"),
}


def worker_meta(*, rank: int = 0, processed=(), load_failed=(), pending=False, **lists):
    events = []
    for name, keys in lists.items():
        tier, op = FIELDS[name]
        events.append(TierEvent(tier, op, tuple(keys), rank))
    return SymramWorkerMetadata(events=events, processed=list(processed),
                                load_failed=list(load_failed), pending=pending)

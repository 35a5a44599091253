"""TierStack: host DRAM over NVMe, over optional remote tiers, driven by the policy.

The stack is inclusive: a page promoted from disk to DRAM stays on disk, so a
later DRAM eviction of it costs nothing. Eviction in either tier follows
``EvictionPolicy`` (recency x salience x recompute cost); what reaches disk follows
the write policy (``tiers/write_back.py``). Reads never wait for the write queue.

The stack is the one interface its owner uses; it composes one collaborator per job:

* ``SaveSlots`` (``tiers/save_slots.py``): the save path, DRAM slots filled in place;
* ``Promoter`` (``tiers/promotion.py``): brings pages up into DRAM from disk and
  from the remote tiers, in parallel on the prefetch pool;
* ``WriteBack`` (``tiers/write_back.py``): brings pages down to disk (write-through,
  write-back on eviction, the idle-time cleaner, flush) and applies back-pressure;
* ``StackCounters`` (``tiers/stack_counters.py``): what all of them did;
* ``tiers/stack_snapshot.py``: the warm-restart manifest.

The zero-copy protocol of ``DramTier`` is kept (reserve_many/commit/abort,
acquire_prefix/release_many) so the connector can fill and read DRAM slots in place.

Below the local tiers sit optional *remote* tiers, read on a local miss and
promoted into DRAM on a hit: other engines' slots of a shared disk_path
(``PeerDiskReader``) and the Redis page tier (``RedisPages``, which is also written
on save). ``on_event`` tells the owner which keys entered or left the tiers other
engines can reach ("disk_stored", "disk_removed"), so a shared directory can
advertise them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path

import torch

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.disk import DiskTier
from symram_vllm.tiers.dram import DramTier
from symram_vllm.tiers.policy import BlockLedger, EvictionPolicy, PlacementPolicy, PolicyConfig
from symram_vllm.tiers.promotion import Promoter, RemoteOrigins, RemoteTier
from symram_vllm.tiers.save_slots import RemoteWriter, SaveSlots
from symram_vllm.tiers.stack_counters import StackCounters
from symram_vllm.tiers.stack_snapshot import restorable_entries, write_stack_manifest
from symram_vllm.tiers.write_back import WriteBack

logger = logging.getLogger(__name__)

RemovedCallback = Callable[[BlockKey], None]
EventCallback = Callable[[str, list[BlockKey]], None]


class TierStack:
    def __init__(
        self,
        page_bytes: int,
        dram_bytes: int,
        disk: DiskTier | None = None,
        *,
        config: PolicyConfig | None = None,
        pin_memory: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_removed: RemovedCallback | None = None,
        remotes: Sequence[RemoteTier] = (),
        remote_writer: RemoteWriter | None = None,
        on_event: EventCallback | None = None,
        device_index: int | None = None,
    ) -> None:
        self.config = config or PolicyConfig()
        self.clock = clock
        self.ledger = BlockLedger()
        self.eviction = EvictionPolicy(
            self.config, self.ledger, clock, fallback_position=self._disk_position
        )
        self.placement = PlacementPolicy(self.config)
        self.on_removed = on_removed
        self.remotes = list(remotes)
        self.on_event = on_event
        self.dram = DramTier(
            page_bytes,
            dram_bytes,
            pin_memory=pin_memory,
            on_evict=self._on_dram_evict,
            clock=clock,
            victim_chooser=self.eviction.choose_victim,
            victim_window=self.config.victim_window,
            device_index=device_index,
        )
        self.disk = disk
        if disk is not None:
            disk.on_evict = self._on_disk_evict
            disk.victim_chooser = self.eviction.choose_victim
            disk.victim_window = max(1, self.config.victim_window)
        self.counters = StackCounters(remote.name for remote in self.remotes)
        self._origins = RemoteOrigins()
        self.promoter = Promoter(
            self.dram, disk, self.remotes, ledger=self.ledger, config=self.config,
            clock=clock, counters=self.counters, origins=self._origins, report=self._event,
        )
        # Its cleaner thread may start at once: what it calls must exist by now.
        self.write_back = WriteBack(
            self.dram, disk, ledger=self.ledger, config=self.config, clock=clock,
            placement=self.placement, counters=self.counters, origins=self._origins,
            report=self._event, removed=self._removed, contains=self.contains,
        )
        self.saves = SaveSlots(
            self.dram, ledger=self.ledger, clock=clock, counters=self.counters,
            write_back=self.write_back, remote_writer=remote_writer, contains=self.contains,
        )

    # -- lookups -------------------------------------------------------------------------
    def contains(self, key: BlockKey) -> bool:
        return self.dram.exists(key) or (self.disk is not None and self.disk.exists(key))

    def where(self, key: BlockKey) -> str | None:
        if self.dram.exists(key):
            return "dram"
        if self.disk is not None and self.disk.exists(key):
            return "disk"
        return None

    # -- write path (see SaveSlots) ------------------------------------------------------
    def reserve_many(
        self, keys: Sequence[BlockKey], positions: Sequence[int],
        parents: Sequence[BlockKey | None],
    ) -> list[int | None]:
        """Arena rows to fill for a save job (None: held already, or no room); then
        `commit` or `abort` each reserved key."""
        return self.saves.reserve_many(keys, positions, parents)

    def commit(self, key: BlockKey) -> None:
        self.saves.commit(key)

    def abort(self, key: BlockKey) -> None:
        self.saves.abort(key)

    def put(
        self,
        key: BlockKey,
        page: torch.Tensor,
        position: int = 0,
        parent: BlockKey | None = None,
    ) -> bool:
        """Store a page (copied). True if the stack holds it afterwards. `position` is
        the block's index in its prefix (its recompute cost); `parent` the block
        before it in the chain (keeps heads of chains from leaving before tails)."""
        return self.saves.put(key, page, position, parent)

    # -- eviction hooks --------------------------------------------------------------------
    def _on_dram_evict(self, key: BlockKey, page: torch.Tensor) -> None:
        # Runs under the DRAM lock. A method, not WriteBack's own: the DRAM tier takes
        # its eviction hook when made, before the WriteBack that needs the tier.
        self.write_back.on_dram_evict(key, page)

    def _on_disk_evict(self, key: BlockKey) -> None:
        self._event("disk_removed", key)
        if not self.dram.exists(key):
            self._removed(key)

    def _event(self, kind: str, key: BlockKey) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, [key])
            except Exception:  # reporting must never break a tier operation
                logger.exception("symram tier event callback failed")

    def _removed(self, key: BlockKey) -> None:
        self.ledger.forget(key)
        self._origins.forget(key)
        self.counters.count("removed")
        if self.on_removed is not None:
            self.on_removed(key)

    def _disk_position(self, key: BlockKey) -> int:
        entry = self.disk.entry(key) if self.disk is not None else None
        return entry.position if entry is not None else 0

    # -- read path -----------------------------------------------------------------------
    def acquire_prefix(self, keys: Sequence[BlockKey]) -> list[int]:
        """Arena rows of the longest prefix of `keys` this stack can serve, each held
        until `release_many`. Pages below DRAM (disk, remote tiers) are promoted
        first, in parallel on the prefetch pool, so a disk hit of n pages keeps
        several reads in flight instead of one."""
        origin = self.promoter.bring_up_prefix(keys)
        rows = self.dram.acquire_rows(keys)
        for key, row in zip(keys, rows, strict=False):
            tier = origin.get(key, "dram")
            if tier in ("dram", "disk"):  # remote hits are counted where they happen
                self._hit(key, tier, self.dram.arena[row])
        if len(rows) < len(keys):
            self.counters.count("misses")
        return rows

    def remotes_reachable(self) -> bool:
        """Every remote tier can answer now: a miss is then the tiers' answer, not an
        outage's (a load that missed while one could not must not make the directory
        forget locations that may well be right)."""
        return all(remote.reachable for remote in self.remotes)

    def release_many(self, keys: Sequence[BlockKey]) -> None:
        self.dram.release_many(keys)

    def get(self, key: BlockKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        view = self._dram_view(key)
        if view is not None:
            try:
                if out is None:
                    return view.clone()
                out.copy_(view)
                return out
            finally:
                self.dram.release(key)
        # Not promotable (odd size, DRAM pinned full, promotion off): serve from disk.
        page = self.disk.get(key, out) if self.disk is not None else None
        if page is None:
            self.counters.count("misses")
        else:
            self._hit(key, "disk", page)
        return page

    def _dram_view(self, key: BlockKey) -> torch.Tensor | None:
        """A held DRAM view of `key`, promoted from disk or a remote tier if needed."""
        view = self.dram.acquire(key)
        if view is not None:
            self._hit(key, "dram", view)
            return view
        if self.promoter.promote(key):
            view = self.dram.acquire(key)
            if view is not None:
                self._hit(key, "disk", view)
            return view
        if self.remotes:
            origin = self.promoter.promote_remote(key)
            if origin is not None:
                view = self.dram.acquire(key)
        return view

    def _hit(self, key: BlockKey, tier: str, page: torch.Tensor) -> None:
        self.counters.count(f"{tier}_hits")
        meta = self.ledger.hit(key, self.clock())
        if self.write_back.write_through_due(meta.hits):
            self.write_back.write_through(key, page, meta.position)

    # -- management ----------------------------------------------------------------------
    def pin(self, key: BlockKey, ttl_s: float | None = None) -> bool:
        """Keep `key` resident (in DRAM if it fits there, and on disk) for `ttl_s`."""
        if not self.dram.exists(key):
            self.promoter.promote(key)
        pinned = self.dram.pin(key, ttl_s)
        if self.disk is not None:
            pinned = self.disk.pin(key, ttl_s) or pinned
        return pinned

    def unpin(self, key: BlockKey) -> None:
        self.dram.unpin(key)
        if self.disk is not None:
            self.disk.unpin(key)

    def evict(self, key: BlockKey) -> bool:
        removed = self.dram.delete(key)
        if self.disk is not None and self.disk.delete(key):
            removed = True
            self._event("disk_removed", key)
        if removed:
            self._removed(key)
        return removed

    def prefetch(self, keys: Iterable[BlockKey]) -> Future[int]:
        """Promote `keys` from disk to DRAM ahead of need (see ``Promoter.prefetch``);
        the future resolves to how many of `keys` are DRAM-resident afterwards."""
        return self.promoter.prefetch(keys)

    def write_back_idle(self, limit: int | None = None) -> int:
        """Copy up to `limit` DRAM-only pages to disk while it is idle (the cleaner's
        round, see ``WriteBack.write_back_idle``); how many were written."""
        return self.write_back.write_back_idle(limit)

    def flush(self, timeout: float | None = None) -> None:
        """Copy every DRAM page that is not on disk yet to disk, and wait for it."""
        self.write_back.flush(timeout)

    # -- warm restart ----------------------------------------------------------------------
    def snapshot(self, path: str | Path, *, secret: bytes | None = None) -> Path:
        """Flush DRAM to disk and write a hash-chained manifest of what each tier holds
        (tier "dram" = resident in DRAM as well as on disk)."""
        if self.disk is None:
            raise ValueError("a snapshot needs a disk tier to hold the pages")
        self.flush()
        return write_stack_manifest(path, self.dram, self.disk, secret)

    def restore(self, path: str | Path, *, secret: bytes | None = None) -> int:
        """Verify a snapshot (raises ``ManifestError`` on a broken chain; with a snapshot
        key, default $SYMRAM_SNAPSHOT_KEY, on an unsigned one) and promote the pages it
        lists as DRAM-resident. Returns how many were promoted."""
        promoted = 0
        for key, item in restorable_entries(path, self.disk, secret):
            self.ledger.touch(key, self.clock(), item.position)
            if item.tier == "dram" and self.promoter.promote(key):
                promoted += 1
        return promoted

    # -- reporting -----------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        out = self.counters.as_stats()
        dram = self.dram.stats()
        out.update({f"dram_{k}": float(v) for k, v in dram.as_dict().items()})
        out["dram_holding_cost"] = self.placement.holding_cost("dram", dram.bytes_used)
        if self.disk is not None:
            disk = self.disk.stats()
            out.update({f"disk_{k}": float(v) for k, v in disk.as_dict().items()})
            out["disk_holding_cost"] = self.placement.holding_cost("disk", disk.bytes_used)
        out["stack_tracked_keys"] = float(len(self.ledger))
        for remote in self.remotes:
            out.update({f"{remote.name}_{k}": float(v) for k, v in remote.stats().items()})
        return out

    def close(self) -> None:
        self.write_back.close()
        self.promoter.close()
        if self.disk is not None:
            self.disk.close()
        for remote in self.remotes:
            try:
                remote.close()
            except Exception:
                logger.exception("symram: closing remote tier %s failed", remote.name)
        self.dram.close()

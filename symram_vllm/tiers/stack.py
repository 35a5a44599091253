"""TierStack: host DRAM over NVMe, driven by the placement/eviction policy.

The stack is inclusive: a page promoted from disk to DRAM stays on disk, so a
later DRAM eviction of it costs nothing. What reaches disk depends on the policy:

* ``write_back``: a page evicted from DRAM is written to disk, if the cost model
  says a disk hit beats recomputing it;
* ``write_through_selective``: a page is copied to disk once it has N hits (N = 0:
  at save); cold pages evicted from DRAM are dropped.

Eviction in either tier follows ``EvictionPolicy`` (recency x salience x recompute
cost). DRAM evictions run under the DRAM lock, so they hand pages to the disk
queue without blocking (``block=False``); the back-pressure happens earlier, in
``reserve``, where a saver waits for disk-queue room while DRAM is full. Reads
never wait for the write queue.

The zero-copy protocol of ``DramTier`` is kept (reserve/commit/abort,
acquire/release) so the connector can fill and read DRAM slots in place.

Below the local tiers sit optional *remote* tiers, read on a local miss and
promoted into DRAM on a hit: other engines' slots of a shared disk_path
(``PeerDiskReader``) and the Redis page tier (``RedisPages``, which is also written
on save). ``on_event`` tells the owner which keys entered or left the tiers other
engines can reach ("disk_stored", "disk_removed"), so a shared directory can
advertise them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.disk import DiskTier
from symram_vllm.tiers.disk_layout import relative_page_path
from symram_vllm.tiers.dram import DramTier, DramTierFull
from symram_vllm.tiers.policy import BlockLedger, EvictionPolicy, PlacementPolicy, PolicyConfig
from symram_vllm.tiers.snapshot import ManifestEntry, read_manifest, snapshot_secret, write_manifest

logger = logging.getLogger(__name__)

RemovedCallback = Callable[[BlockKey], None]
EventCallback = Callable[[str, list[BlockKey]], None]


class RemoteTier(Protocol):
    """A tier other engines fill: read into a DRAM slot on a local miss."""

    name: str

    def read_into(self, key: BlockKey, out: torch.Tensor) -> bool: ...

    def stats(self) -> dict[str, float]: ...

    def close(self) -> None: ...


class RemoteWriter(Protocol):
    def offer(self, key: BlockKey, page: torch.Tensor) -> bool: ...

_COUNTERS = (
    "dram_hits", "disk_hits", "misses", "promotions", "promotion_failures",
    "writebacks", "writeback_dropped", "writeback_skipped_cost", "cold_dropped",
    "write_through", "put_rejected_full", "put_to_disk_direct", "save_waits",
    "save_wait_timeouts", "prefetched", "removed", "background_writebacks",
    "remote_hits", "remote_misses", "remote_promotion_failures", "remote_offered",
)
# Pages brought in from a remote tier remember where from (bounded).
MAX_REMOTE_ORIGINS = 1 << 18


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
        self.remote_writer = remote_writer
        self.on_event = on_event
        self._remote_origin: dict[BlockKey, str] = {}
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
        self._lock = threading.Lock()
        self._reserved: dict[BlockKey, torch.Tensor] = {}
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        for remote in self.remotes:
            self.counters[f"{remote.name}_hits"] = 0
        self._prefetcher = ThreadPoolExecutor(self.config.prefetch_workers, "symram-prefetch")
        self._stop = threading.Event()
        self._cleaner: threading.Thread | None = None
        if (
            disk is not None
            and self.config.write_policy == "write_back"
            and self.config.background_writeback_s > 0
        ):
            self._cleaner = threading.Thread(
                target=self._clean_loop, name="symram-writeback", daemon=True
            )
            self._cleaner.start()

    @property
    def page_bytes(self) -> int:
        return self.dram.page_bytes

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    # -- lookups -------------------------------------------------------------------------
    def contains(self, key: BlockKey) -> bool:
        return self.dram.exists(key) or (self.disk is not None and self.disk.exists(key))

    def where(self, key: BlockKey) -> str | None:
        if self.dram.exists(key):
            return "dram"
        if self.disk is not None and self.disk.exists(key):
            return "disk"
        return None

    # -- write path ----------------------------------------------------------------------
    def reserve(
        self, key: BlockKey, position: int = 0, parent: BlockKey | None = None
    ) -> torch.Tensor | None:
        """A DRAM slot to fill for `key` (then `commit` or `abort`); None if the key is
        already held or nothing can be evicted. `position` is the block's index in
        its prefix (its recompute cost); `parent` the block before it in the chain
        (keeps heads of cached chains from being evicted before their tails)."""
        if self.contains(key):
            return None
        self._wait_for_disk_room()
        try:
            slot = self.dram.reserve(key)
        except DramTierFull:
            self._count("put_rejected_full")
            return None
        if slot is not None:
            self.ledger.touch(key, self.clock(), position, parent)
            with self._lock:
                self._reserved[key] = slot
        return slot

    def commit(self, key: BlockKey) -> None:
        with self._lock:
            slot = self._reserved.pop(key)
        meta = self.ledger.touch(key, self.clock())
        if self.disk is not None and self.placement.write_through_due(meta.hits):
            # The slot is still reserved, hence not evictable, while set_async copies it.
            self._write_through(key, slot, meta.position)
        if self.remote_writer is not None and self.remote_writer.offer(key, slot):
            self._count("remote_offered")
        self.dram.commit(key)

    def reserve_many(
        self, keys: Sequence[BlockKey], positions: Sequence[int],
        parents: Sequence[BlockKey | None],
    ) -> list[int | None]:
        """`reserve` for a whole save job: arena rows (None: held already, or no room),
        taken in one DRAM lock round trip. Fill the rows, then `commit` or `abort`
        each reserved key."""
        fresh = [key for key in keys if not self.contains(key)]
        if not fresh:
            return [None] * len(keys)
        self._wait_for_disk_room()
        wanted = set(fresh)
        rows = self.dram.reserve_rows([k for k in keys if k in wanted])
        by_key = dict(zip([k for k in keys if k in wanted], rows, strict=True))
        out: list[int | None] = []
        now = self.clock()
        for key, position, parent in zip(keys, positions, parents, strict=True):
            row = by_key.pop(key, None)
            out.append(row)
            if row is None:
                continue
            self.ledger.touch(key, now, position, parent)
            with self._lock:
                self._reserved[key] = self.dram.arena[row]
        if any(r is None for r in rows):
            self._count("put_rejected_full", sum(r is None for r in rows))
        return out

    def abort(self, key: BlockKey) -> None:
        with self._lock:
            self._reserved.pop(key, None)
        self.dram.abort(key)
        if not self.contains(key):
            self.ledger.forget(key)

    def put(
        self,
        key: BlockKey,
        page: torch.Tensor,
        position: int = 0,
        parent: BlockKey | None = None,
    ) -> bool:
        """Store a page (copied). True if the stack holds it afterwards."""
        if self.contains(key):
            return True
        slot = self.reserve(key, position, parent)
        if slot is None:
            if self.contains(key):
                return True
            return self._put_disk_only(key, page, position, parent)
        try:
            slot.copy_(page.reshape(-1))
        except BaseException:
            self.abort(key)
            raise
        self.commit(key)
        return True

    def _put_disk_only(
        self, key: BlockKey, page: torch.Tensor, position: int, parent: BlockKey | None
    ) -> bool:
        """DRAM is full of pinned pages: place the page on disk if it is worth it."""
        if self.disk is None or not self.placement.worth_storing("disk", page.numel(), position):
            return False
        self._count("put_to_disk_direct")
        stored = self.disk.set(key, page, position=position)
        if stored:
            self.ledger.touch(key, self.clock(), position, parent)
            self._event("disk_stored", key)
        return stored

    def _wait_for_disk_room(self) -> None:
        """Back-pressure: with DRAM full, the saver (not the DRAM lock) waits for disk."""
        if (
            self.disk is None
            or self.config.write_policy != "write_back"
            or self.dram.free_slots() > 0
        ):
            return
        self._count("save_waits")
        if not self.disk.wait_for_room(self.config.save_wait_s):
            self._count("save_wait_timeouts")

    def _write_through(self, key: BlockKey, page: torch.Tensor, position: int) -> None:
        assert self.disk is not None
        if self.disk.exists(key):
            return
        fut = self._disk_write(key, page, position, block=False)
        self._count("write_through")
        if fut.done() and not fut.result():
            self._count("writeback_dropped")

    # -- eviction hooks --------------------------------------------------------------------
    def _on_dram_evict(self, key: BlockKey, page: torch.Tensor) -> None:
        # Runs under the DRAM lock: never block here.
        disk = self.disk
        if disk is not None and disk.exists(key):
            return  # inclusive hierarchy: the disk copy remains
        meta = self.ledger.get(key)
        position = meta.position if meta else 0
        with self._lock:
            origin = self._remote_origin.pop(key, None)
        if origin == "peer_disk":
            # Another engine's slot of the shared disk holds it: no second copy.
            self._count("cold_dropped")
        elif disk is None or self.config.write_policy != "write_back":
            self._count("cold_dropped")
        elif not self.placement.worth_storing("disk", page.numel(), position):
            self._count("writeback_skipped_cost")
        else:
            fut = self._disk_write(key, page, position, block=False)
            if not (fut.done() and not fut.result()):
                self._count("writebacks")
                fut.add_done_callback(lambda f: f.result() or self._lost(key))
                return
            self._count("writeback_dropped")
        self._removed(key)

    def _on_disk_evict(self, key: BlockKey) -> None:
        self._event("disk_removed", key)
        if not self.dram.exists(key):
            self._removed(key)

    def _disk_write(
        self, key: BlockKey, page: torch.Tensor, position: int, block: bool | None
    ) -> Future[bool]:
        """`disk.set_async`, reporting the page to `on_event` once it is on disk."""
        assert self.disk is not None
        fut = self.disk.set_async(key, page, position=position, block=block)
        if self.on_event is not None:
            fut.add_done_callback(
                lambda f: f.exception() is None and f.result() and self._event("disk_stored", key)
            )
        return fut

    def _event(self, kind: str, key: BlockKey) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, [key])
            except Exception:  # reporting must never break a tier operation
                logger.exception("symram tier event callback failed")

    def _lost(self, key: BlockKey) -> None:
        self._count("writeback_dropped")
        if not self.contains(key):
            self._removed(key)

    def _removed(self, key: BlockKey) -> None:
        self.ledger.forget(key)
        with self._lock:
            self._remote_origin.pop(key, None)
        self._count("removed")
        if self.on_removed is not None:
            self.on_removed(key)

    def _disk_position(self, key: BlockKey) -> int:
        entry = self.disk.entry(key) if self.disk is not None else None
        return entry.position if entry is not None else 0

    # -- read path -----------------------------------------------------------------------
    def acquire(self, key: BlockKey) -> torch.Tensor | None:
        """A DRAM view of the page (promoted from disk if needed), held until
        `release`; None on a miss or when the page cannot be brought into DRAM."""
        view = self._dram_view(key)
        if view is None:
            self._count("misses")
        return view

    def release(self, key: BlockKey) -> None:
        self.dram.release(key)

    def acquire_prefix(self, keys: Sequence[BlockKey]) -> list[int]:
        """Arena rows of the longest prefix of `keys` this stack can serve, each held
        until `release_many`. Pages below DRAM (disk, remote tiers) are promoted
        first, in parallel on the prefetch pool, so a disk hit of n pages keeps
        several reads in flight instead of one."""
        missing = [key for key in keys if not self.dram.exists(key)]
        origin: dict[BlockKey, str] = {}
        if missing:
            futures = [self._prefetcher.submit(self._bring_up, key) for key in missing]
            for key, fut in zip(missing, futures, strict=True):
                tier = fut.result()
                if tier is None:
                    break  # later pages are useless without this one
                origin[key] = tier
        rows = self.dram.acquire_rows(keys)
        for key, row in zip(keys, rows, strict=False):
            tier = origin.get(key, "dram")
            if tier in ("dram", "disk"):  # remote hits are counted where they happen
                self._hit(key, tier, self.dram.arena[row])
        if len(rows) < len(keys):
            self._count("misses")
        return rows

    def _bring_up(self, key: BlockKey) -> str | None:
        """Promote one page into DRAM; the tier it came from, None if none had it."""
        if self.dram.exists(key):
            return "dram"
        if self._promote(key):
            return "disk"
        return self._promote_remote(key) if self.remotes else None

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
                self.release(key)
        # Not promotable (odd size, DRAM pinned full, promotion off): serve from disk.
        page = self.disk.get(key, out) if self.disk is not None else None
        if page is None:
            self._count("misses")
        else:
            self._hit(key, "disk", page)
        return page

    def _dram_view(self, key: BlockKey) -> torch.Tensor | None:
        view = self.dram.acquire(key)
        if view is not None:
            self._hit(key, "dram", view)
            return view
        if self._promote(key):
            view = self.dram.acquire(key)
            if view is not None:
                self._hit(key, "disk", view)
            return view
        if self.remotes:
            origin = self._promote_remote(key)
            if origin is not None:
                view = self.dram.acquire(key)
        return view

    def _promote_remote(self, key: BlockKey) -> str | None:
        """Copy `key`'s page from the first remote tier that has it into a DRAM slot.
        Returns that tier's name, or None (a miss everywhere, or no DRAM room)."""
        try:
            slot = self.dram.reserve(key)
        except DramTierFull:
            self._count("remote_promotion_failures")
            return None
        if slot is None:
            return "dram" if self.dram.exists(key) else None  # promoted concurrently
        for remote in self.remotes:
            try:
                found = remote.read_into(key, slot)
            except Exception:  # a remote tier is best effort: a failure is a miss
                logger.exception("symram: reading %s from %s failed", key, remote.name)
                found = False
            if found:
                self.ledger.touch(key, self.clock())
                with self._lock:
                    if len(self._remote_origin) >= MAX_REMOTE_ORIGINS:
                        self._remote_origin.pop(next(iter(self._remote_origin)))
                    self._remote_origin[key] = remote.name
                    self.counters["remote_hits"] += 1
                    self.counters[f"{remote.name}_hits"] += 1
                self.dram.commit(key)
                self._event("remote_loaded", key)
                return remote.name
        self.dram.abort(key)
        self._count("remote_misses")
        return None

    def _hit(self, key: BlockKey, tier: str, page: torch.Tensor) -> None:
        self._count(f"{tier}_hits")
        meta = self.ledger.hit(key, self.clock())
        if self.disk is not None and self.placement.write_through_due(meta.hits):
            self._write_through(key, page, meta.position)

    def _promote(self, key: BlockKey) -> bool:
        """Copy a disk page into a DRAM slot. True if the key is in DRAM afterwards."""
        if self.disk is None or not self.config.promote_on_hit:
            return False
        entry = self.disk.entry(key)
        if entry is None or entry.payload_len != self.dram.page_bytes:
            return False
        try:
            slot = self.dram.reserve(key)
        except DramTierFull:
            self._count("promotion_failures")
            return False
        if slot is None:
            return self.dram.exists(key)  # promoted concurrently
        if self.disk.get(key, out=slot) is None:
            self.dram.abort(key)
            self._count("promotion_failures")
            return False
        self.ledger.touch(key, self.clock(), entry.position)
        self.dram.commit(key)
        self._count("promotions")
        return True

    # -- management ----------------------------------------------------------------------
    def pin(self, key: BlockKey, ttl_s: float | None = None) -> bool:
        """Keep `key` resident (in DRAM if it fits there, and on disk) for `ttl_s`."""
        if not self.dram.exists(key):
            self._promote(key)
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
        """Promote `keys` from disk to DRAM ahead of need, in parallel on the prefetch
        pool (reads of several pages overlap one page's I/O with another's checksum).
        The future resolves to how many of `keys` are DRAM-resident afterwards."""
        wanted = list(dict.fromkeys(keys))
        result: Future[int] = Future()
        if not wanted:
            result.set_result(0)
            return result
        lock = threading.Lock()
        tally = {"left": len(wanted), "resident": 0}

        def bring_up(key: BlockKey) -> bool:
            if self.dram.exists(key):
                return True
            promoted = self._promote(key)
            if promoted:
                self._count("prefetched")
            return promoted

        def finished(fut: Future[bool]) -> None:
            ok = fut.exception() is None and fut.result()
            with lock:
                tally["left"] -= 1
                tally["resident"] += int(ok)
                last = tally["left"] == 0
            if last:
                result.set_result(tally["resident"])

        for key in wanted:
            self._prefetcher.submit(bring_up, key).add_done_callback(finished)
        return result

    def _clean_loop(self) -> None:
        while not self._stop.wait(self.config.background_writeback_s):
            try:
                self.write_back_idle()
            except Exception:  # the cleaner must outlive one bad page
                logger.exception("symram background write-back failed")

    def write_back_idle(self, limit: int | None = None) -> int:
        """Copy DRAM-only pages to disk while the disk has nothing else to write
        (oldest first, one write at a time, each waited for, so saves and evictions
        always find the queue free). Returns how many were written."""
        disk = self.disk
        if disk is None:
            return 0
        queued = 0
        for key in list(self.dram.keys()):
            if self._stop.is_set() or (limit is not None and queued >= limit):
                break
            with self._lock:
                from_peer = self._remote_origin.get(key) == "peer_disk"
            if from_peer or disk.exists(key):
                continue
            if not disk.write_queue_idle():
                break  # saves and evictions come first
            view = self.dram.acquire(key)
            if view is None:
                continue
            try:
                meta = self.ledger.get(key)
                # The page is copied into a staging buffer before set_async returns.
                written = self._disk_write(
                    key, view, meta.position if meta else 0, block=False
                )
            finally:
                self.dram.release(key)
            if not written.result():
                break  # queue taken meanwhile, or the disk refused: try next round
            queued += 1
        if queued:
            self._count("background_writebacks", queued)
        return queued

    def flush(self, timeout: float | None = None) -> None:
        """Copy every DRAM page that is not on disk yet to disk, and wait for it."""
        if self.disk is None:
            return
        for key in list(self.dram.keys()):
            with self._lock:
                from_peer = self._remote_origin.get(key) == "peer_disk"
            if from_peer:
                continue  # another engine's slot of the shared disk has it already
            view = self.dram.acquire(key)  # counts a DRAM hit: flushes are rare
            if view is None:
                continue
            try:
                meta = self.ledger.get(key)
                self._disk_write(key, view, meta.position if meta else 0, block=None)
            finally:
                self.dram.release(key)
        self.disk.flush(timeout)

    # -- warm restart ----------------------------------------------------------------------
    def snapshot(self, path: str | Path, *, secret: bytes | None = None) -> Path:
        """Flush DRAM to disk and write a hash-chained manifest of what each tier holds
        (tier "dram" = resident in DRAM as well as on disk)."""
        if self.disk is None:
            raise ValueError("a snapshot needs a disk tier to hold the pages")
        self.flush()
        entries = (
            ManifestEntry(
                key=key.hex,
                tier="dram" if self.dram.exists(key) else "disk",
                file=relative_page_path(key),
                length=entry.payload_len,
                checksum=f"crc32:{entry.checksum:08x}",
                codec=entry.codec,
                position=entry.position,
                file_bytes=entry.file_bytes,
            )
            for key, entry in self.disk.index_snapshot()
        )
        path = Path(path)
        write_manifest(path, entries, meta={"kind": "tier-stack"},
                       secret=secret or snapshot_secret())
        return path

    def restore(self, path: str | Path, *, secret: bytes | None = None) -> int:
        """Verify a snapshot (raises ``ManifestError`` on a broken chain; with a snapshot
        key, default $SYMRAM_SNAPSHOT_KEY, on an unsigned one) and promote the pages it
        lists as DRAM-resident. Returns how many were promoted."""
        manifest = read_manifest(path, secret=secret or snapshot_secret())
        promoted = 0
        for item in manifest.entries:
            key = BlockKey.from_hex(item.key)
            entry = self.disk.entry(key) if self.disk is not None else None
            if entry is None or f"crc32:{entry.checksum:08x}" != item.checksum:
                continue  # gone or rewritten since the snapshot
            self.ledger.touch(key, self.clock(), item.position)
            if item.tier == "dram" and self._promote(key):
                promoted += 1
        return promoted

    # -- reporting -----------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        with self._lock:
            out = {f"stack_{k}": float(v) for k, v in self.counters.items()}
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
        self._stop.set()
        if self._cleaner is not None:
            self._cleaner.join(timeout=10)
        self._prefetcher.shutdown(wait=True)
        if self.disk is not None:
            self.disk.close()
        for remote in self.remotes:
            try:
                remote.close()
            except Exception:
                logger.exception("symram: closing remote tier %s failed", remote.name)
        self.dram.close()

"""NVMe tier: one verified file per page, a byte budget, async bounded writes.

Reads run in the caller's thread (or the read pool for ``get_async``) and never
queue behind writes, so a slow disk slows saves, not loads. Every read is checked
against the page header (magic, key, length, CRC32); a page that fails is a miss,
counted in ``TierStats.integrity_failures`` and moved to ``quarantine/``.

With ``compress: zstd`` the writer threads compress each page (lossless; kept only
when it saves a 4 KiB block) and reads decompress it; the header records the stored
length and a ``+zstd`` codec (``page_format``), and a frame that fails zstd's own
checks is a corrupt page like any other.

With a ``cipher`` (encryption at rest, ``crypto.py``) the writer threads seal each
page with AES-256-GCM after compressing it, and reads open it straight from the
bounce buffer into the caller's page; the GCM tag replaces the CRC32 check. A page
that fails to authenticate, a plaintext page when encryption is required, or a page
sealed under another key is a miss like a corrupt one: counted and quarantined.
Files are created 0600 in 0700 directories, with or without a cipher.

Writes go to a temp file, are fsynced, then renamed into place: a writer killed
mid-write leaves only a temp file, which the next start deletes. An I/O error
(ENOSPC, EROFS, EIO...) closes the write gate: writes are declined with a logged
warning while reads continue, and one write is retried after a back-off.

``DiskTier`` is the Tier interface over small parts, each with one job: the book of
pages, bytes, pins and counters under one lock (``disk_index``), the write queue and
commit (``disk_writer``), a page into its file bytes (``page_packer``), one file read
and verified (``disk_reader``), the index on open (``disk_recovery``), and the files'
names and chores (``disk_housekeeping``, ``disk_layout``). The tier wires them and
decides what a failed read costs (a miss; the file forgotten, a corrupt one quarantined).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from symram_vllm.codecs.zstd import ZstdCodec
from symram_vllm.keys import BlockKey
from symram_vllm.tiers.aligned_io import FileIO, PosixFileIO, ThreadBuffers, open_file_io
from symram_vllm.tiers.base import Tier, TierStats
from symram_vllm.tiers.crypto import PageCipher
from symram_vllm.tiers.disk_config import DiskTierConfig
from symram_vllm.tiers.disk_housekeeping import (
    DirectoryLock,
    DiskTierLocked,
    PageFiles,
    Quarantine,
    empty_trash,
    private_dir,
)
from symram_vllm.tiers.disk_index import DiskIndex, VictimChooser
from symram_vllm.tiers.disk_layout import MANIFEST_NAME, DiskEntry, manifest_entries
from symram_vllm.tiers.disk_reader import PageReader, deliver
from symram_vllm.tiers.disk_recovery import restore_index
from symram_vllm.tiers.disk_writer import DiskWriter
from symram_vllm.tiers.page_format import HEADER_BYTES, PageCorrupt
from symram_vllm.tiers.page_packer import PagePacker
from symram_vllm.tiers.snapshot import snapshot_secret, write_manifest
from symram_vllm.tiers.write_gate import WriteGate

__all__ = ["DiskEntry", "DiskTier", "DiskTierConfig", "DiskTierLocked"]

logger = logging.getLogger(__name__)

DiskEvictCallback = Callable[[BlockKey], None]


class DiskTier(Tier):
    name = "disk"

    def __init__(
        self,
        directory: str | Path,
        budget_bytes: int,
        *,
        config: DiskTierConfig | None = None,
        codec: str = "none",
        clock: Callable[[], float] = time.monotonic,
        on_evict: DiskEvictCallback | None = None,
        victim_chooser: VictimChooser | None = None,
        victim_window: int = 16,
        file_io: FileIO | None = None,
        cipher: PageCipher | None = None,
    ) -> None:
        if budget_bytes < HEADER_BYTES * 2:
            raise ValueError(f"disk budget of {budget_bytes} bytes holds no page")
        self.root = Path(directory)
        self.pages_dir = self.root / "pages"
        self.quarantine_dir = self.root / "quarantine"
        self.budget_bytes = budget_bytes
        self.config = config or DiskTierConfig()
        # The page codec's name, recorded in the header of a page whose writer names
        # none: the engine's top-level `codec`, not a disk setting (peer readers check it).
        self.codec = codec
        # Called outside the tier's lock when a page leaves by eviction or quarantine.
        self.on_evict = on_evict
        # Seals pages written and opens pages read; None = plaintext pages.
        self.cipher = cipher
        self._files = PageFiles(self.pages_dir)
        # victim_window: LRU candidates the chooser sees; the tier stack sets it, with the
        # chooser, from policy.victim_window (one sample size for DRAM and disk eviction).
        self._index = DiskIndex(
            budget_bytes, self._files, clock, victim_chooser, max(1, victim_window)
        )
        self._lock = self._index.lock
        self.gate = WriteGate(
            f"disk tier {self.root}",
            self.config.retry_backoff_s,
            self.config.retry_backoff_max_s,
            clock,
        )
        writable = self._prepare_dirs()
        # Taken before anything else touches the directory (raises DiskTierLocked).
        self._dir_lock = DirectoryLock(self.root) if self.root.is_dir() else None
        bounce = ThreadBuffers()
        zstd = ZstdCodec(self.config.zstd_level) if self.config.compress == "zstd" else None
        self._quarantine = Quarantine(self.quarantine_dir, self.config.quarantine_max_files)
        self._reader = ThreadPoolExecutor(self.config.read_workers, "symram-disk-read")
        self._closed = False
        self.io, self.io_reason = _choose_io(file_io, self.pages_dir, writable, self.config)
        logger.info("disk tier %s: %s", self.root, self.io_reason)
        self._pages = PageReader(self.io, cipher, zstd or ZstdCodec(), bounce)
        self._writes = DiskWriter(
            self._index, self._files, PagePacker(self._index, codec, cipher, zstd),
            self.io, self.gate, self.config, bounce, self._notify_evicted,
        )
        restore_index(
            self._index, self.root, self.io, self.config, cipher, self._condemn,
            self._notify_evicted,
        )

    # The tier stack sets these after construction; the index uses them.
    @property
    def victim_chooser(self) -> VictimChooser | None:
        return self._index.victim_chooser

    @victim_chooser.setter
    def victim_chooser(self, chooser: VictimChooser | None) -> None:
        self._index.victim_chooser = chooser

    @property
    def victim_window(self) -> int:
        return self._index.victim_window

    @victim_window.setter
    def victim_window(self, window: int) -> None:
        self._index.victim_window = window

    # -- setup ---------------------------------------------------------------------------
    def _prepare_dirs(self) -> bool:
        """Create (or tighten to) 0700: the tier's root, its pages and its quarantine."""
        try:
            for directory in (self.root, self.pages_dir, self.quarantine_dir):
                if private_dir(directory):
                    self._index.counters["modes_tightened"] += 1
        except OSError as exc:
            self.gate.failed(exc)
        return not self.gate.disabled

    # -- the three verbs -----------------------------------------------------------------
    def exists(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._index.entries or key in self._writes.pending

    def entry(self, key: BlockKey) -> DiskEntry | None:
        with self._lock:
            entry = self._index.entries.get(key)
            if entry is None and key in self._writes.pending:
                entry = self._writes.pending[key].entry()
            return entry

    def path_of(self, key: BlockKey) -> Path:
        return self._files.path_of(key)

    def get(self, key: BlockKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The verified page, or None. With `out`, a page that fails verification may
        have partly overwritten `out` before being rejected: treat None as garbage."""
        stats = self._index.stats
        with self._lock:
            staged = self._writes.pending.get(key)
            if staged is not None:  # not on disk yet: serve the staged copy
                stats.hits += 1
                return deliver(staged.payload(), out)
            entry = self._index.entries.get(key)
            if entry is None:
                stats.misses += 1
                return None
        page = self._read(key, entry, out)
        with self._lock:
            if page is None:
                stats.misses += 1
            else:
                stats.hits += 1
                self._index.counters["bytes_read"] += entry.file_bytes
                self._index.touch(key)
        return page

    def get_async(self, key: BlockKey, out: torch.Tensor | None = None) -> Future:
        """`get` on the read pool (separate from the write pool, so never behind writes)."""
        return self._reader.submit(self.get, key, out)

    def set(
        self,
        key: BlockKey,
        page: torch.Tensor,
        *,
        codec: str | None = None,
        position: int = 0,
    ) -> bool:
        """Write synchronously in the caller's thread. True if stored (or already there)."""
        if self.exists(key):
            return True
        return self._writes.write_now(key, page, codec, position)

    def set_async(
        self,
        key: BlockKey,
        page: torch.Tensor,
        *,
        codec: str | None = None,
        position: int = 0,
        block: bool | None = None,
        timeout: float | None = None,
    ) -> Future[bool]:
        """Queue a write; `page` is copied before returning, so the caller may reuse it.

        When the queue is full, blocks (back-pressure) or returns a future already
        resolved to False (dropped), per `block` or the configured ``when_queue_full``.
        """
        return self._writes.submit(key, page, codec, position, block, timeout)

    def write_queue_idle(self) -> bool:
        """No write staged or running, and writes are not stopped by an error."""
        return self._writes.idle()

    def wait_for_room(self, timeout: float | None = None) -> bool:
        """Block until the write queue has room (back-pressure for savers)."""
        return self._writes.staging.wait_for_room(timeout)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every queued write to finish."""
        self._writes.flush(timeout)

    def delete(self, key: BlockKey) -> bool:
        trash: list[Path] = []
        with self._lock:
            cancelled = self._writes.cancel_locked(key)
            removed = self._index.remove_locked(key, trash) or cancelled
        empty_trash(trash)
        return removed

    def keys(self) -> Iterator[BlockKey]:
        with self._lock:
            indexed = self._index.entries
            return iter([*indexed, *(k for k in self._writes.pending if k not in indexed)])

    def stats(self) -> TierStats:
        with self._lock:
            index = self._index
            out = TierStats(**{**index.stats.__dict__, "extra": {}})
            out.pages = len(index.entries)
            out.bytes_used = index.bytes_used
            out.extra = {k: float(v) for k, v in index.counters.items()}
            out.extra.update(
                writes_disabled=float(self.gate.disabled),
                write_failures=float(self.gate.failures),
                write_retry_in_s=self.gate.retry_in(),
                write_queue_depth=float(self._writes.staging.in_use()),
                write_queue_capacity=float(self._writes.staging.capacity),
                direct_io=float(self.io.direct),
                direct_io_fallbacks=float(getattr(self.io, "direct_fallbacks", 0)),
                kvikio=float(self.io.name == "kvikio"),
                encrypted=float(self.cipher is not None),
            )
            return out

    # -- pinning -------------------------------------------------------------------------
    def pin(self, key: BlockKey, ttl_s: float | None = None) -> bool:
        with self._lock:
            if not self.exists(key):
                return False
            self._index.pin(key, ttl_s)
            return True

    def unpin(self, key: BlockKey) -> None:
        self._index.unpin(key)

    def is_pinned(self, key: BlockKey) -> bool:
        return self._index.is_pinned(key)

    # -- what a read costs ---------------------------------------------------------------
    def _read(
        self, key: BlockKey, entry: DiskEntry, out: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The verified page, or None: a vanished file is forgotten, a corrupt one is
        forgotten and quarantined, another I/O error is only counted (maybe transient)."""
        path = self.path_of(key)
        try:
            return self._pages.read(key, path, entry, out)
        except FileNotFoundError:
            self._index.count("vanished_files")
            self._forget(key, entry)
        except PageCorrupt as exc:
            self._count_failure(exc)
            if self._forget(key, entry):
                self._quarantine_page(path, exc)
        except OSError as exc:
            self._index.count("read_errors")
            logger.warning("disk tier: reading %s failed: %s", path, exc)
        return None

    def _condemn(self, path: Path, problem: PageCorrupt) -> None:
        """A page file that failed its checks before it was indexed."""
        self._count_failure(problem)
        self._quarantine_page(path, problem)

    def _count_failure(self, problem: PageCorrupt) -> None:
        counter = {
            "auth": "auth_failures", "plaintext": "plaintext_rejected",
            "key-id": "other_key_pages", "no-key": "other_key_pages",
        }.get(problem.reason)
        with self._lock:
            self._index.stats.integrity_failures += 1
            if counter is not None:
                self._index.counters[counter] += 1

    def _forget(self, key: BlockKey, entry: DiskEntry) -> bool:
        """Drop `key` if the index still maps it to `entry` (not a newer write)."""
        if not self._index.forget(key, entry):
            return False
        self._notify_evicted([key])
        return True

    def _quarantine_page(self, path: Path, problem: PageCorrupt) -> None:
        if self._quarantine.admit(path, problem):
            self._index.count("quarantined")

    def _notify_evicted(self, victims: list[BlockKey]) -> None:
        if self.on_evict is not None:
            for victim in victims:
                self.on_evict(victim)

    # -- lifecycle -----------------------------------------------------------------------
    def index_snapshot(self) -> list[tuple[BlockKey, DiskEntry]]:
        """(key, entry) for every page on disk, least recently used first."""
        with self._lock:
            return list(self._index.entries.items())

    def write_manifest(self, path: Path | None = None) -> Path:
        path = path or self.root / MANIFEST_NAME
        write_manifest(
            path,
            manifest_entries(iter(self.index_snapshot())),
            meta={"tier": "disk", "root": str(self.root), "budget_bytes": self.budget_bytes},
            secret=snapshot_secret(),
        )
        return path

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writes.shutdown()
        self._reader.shutdown(wait=True)
        if self.config.manifest and not self.gate.disabled:
            try:
                self.write_manifest()
            except OSError as exc:
                logger.warning("disk tier: no manifest written (%s); next start rescans", exc)
        if self._dir_lock is not None:
            self._dir_lock.release()


def _choose_io(
    injected: FileIO | None, pages_dir: Path, writable: bool, config: DiskTierConfig
) -> tuple[FileIO, str]:
    """The file I/O a tier uses, and why. O_DIRECT and kvikio are chosen by a probe that
    writes into the directory, so one that cannot be written gets buffered reads."""
    if injected is not None:
        return injected, "injected"
    if pages_dir.is_dir() and writable:
        return open_file_io(pages_dir, config.io_backend, config.direct_io)
    return PosixFileIO(False), "directory not writable: buffered reads"

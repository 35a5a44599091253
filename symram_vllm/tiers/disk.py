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
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from symram_vllm.codecs.base import CorruptPageError
from symram_vllm.codecs.zstd import ZstdCodec
from symram_vllm.keys import BlockKey
from symram_vllm.tiers.aligned_io import (
    AlignedBuffer,
    FileIO,
    PosixFileIO,
    ThreadBuffers,
    align_up,
    is_aligned,
    open_file_io,
    tensor_memoryview,
)
from symram_vllm.tiers.base import Tier, TierStats
from symram_vllm.tiers.crypto import TAG_BYTES, PageCipher
from symram_vllm.tiers.disk_config import DiskTierConfig
from symram_vllm.tiers.disk_housekeeping import (
    DirectoryLock,
    DiskTierLocked,
    Quarantine,
    private_dir,
    unlink_quietly,
)
from symram_vllm.tiers.disk_layout import (
    MANIFEST_NAME,
    TMP_SUFFIX,
    DiskEntry,
    manifest_entries,
    rebuild_index,
    relative_page_path,
)
from symram_vllm.tiers.page_format import (
    HEADER_BYTES,
    PageCorrupt,
    PageHeader,
    check_readable,
    checksum,
    open_sealed,
    pack_header,
    seal_payload,
    unpack_header,
    verify,
    verify_payload,
    zstd_codec_name,
)
from symram_vllm.tiers.snapshot import ManifestError, read_manifest, snapshot_secret, write_manifest
from symram_vllm.tiers.staging import StagingPool
from symram_vllm.tiers.write_gate import WriteGate

__all__ = ["DiskEntry", "DiskTier", "DiskTierConfig", "DiskTierLocked"]

logger = logging.getLogger(__name__)

DiskEvictCallback = Callable[[BlockKey], None]
VictimChooser = Callable[[list[BlockKey]], BlockKey]


@dataclass(eq=False)
class _Staged:
    key: BlockKey
    header: PageHeader
    buf: AlignedBuffer
    future: Future[bool] = field(default_factory=Future)
    cancelled: bool = False


def _done(value: bool) -> Future[bool]:
    fut: Future[bool] = Future()
    fut.set_result(value)
    return fut


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
        self.victim_chooser = victim_chooser
        # LRU candidates the chooser sees; the tier stack sets it, with the chooser, from
        # policy.victim_window (one sample size for DRAM and disk eviction).
        self.victim_window = max(1, victim_window)
        # Seals pages written and opens pages read; None = plaintext pages.
        self.cipher = cipher
        self._clock = clock
        self._lock = threading.RLock()
        self._index: OrderedDict[BlockKey, DiskEntry] = OrderedDict()
        self._pending: dict[BlockKey, _Staged] = {}
        self._pinned_until: dict[BlockKey, float] = {}
        self._reserved = 0
        self._bytes_used = 0
        self._tmp_seq = itertools.count()
        self._stats = TierStats(bytes_capacity=budget_bytes)
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "dropped_writes", "write_errors", "read_errors", "quarantined",
                "temp_files_removed", "vanished_files", "pages_scanned",
                "pages_from_manifest", "manifest_rejected", "bytes_written", "bytes_read",
                "foreign_files", "zstd_pages", "zstd_raw_bytes", "zstd_stored_bytes",
                "zstd_incompressible", "auth_failures", "plaintext_rejected",
                "other_key_pages", "modes_tightened",
            ),
            0,
        )
        self.gate = WriteGate(
            f"disk tier {self.root}",
            self.config.retry_backoff_s,
            self.config.retry_backoff_max_s,
            clock,
        )
        writable = self._prepare_dirs()
        # Taken before anything else touches the directory (raises DiskTierLocked).
        self._dir_lock = DirectoryLock(self.root) if self.root.is_dir() else None
        self._bounce = ThreadBuffers()
        self._zstd = ZstdCodec(self.config.zstd_level) if self.config.compress == "zstd" else None
        # Pages written compressed stay readable after a restart with compression off.
        self._unzstd = self._zstd or ZstdCodec()
        self._packed = ThreadBuffers()  # writer threads: header + compressed/sealed payload
        self._opened = ThreadBuffers()  # readers: a sealed zstd frame, decrypted
        self._quarantine = Quarantine(self.quarantine_dir, self.config.quarantine_max_files)
        self._staging = StagingPool(self.config.write_workers + self.config.write_queue)
        self._writer = ThreadPoolExecutor(self.config.write_workers, "symram-disk-write")
        self._reader = ThreadPoolExecutor(self.config.read_workers, "symram-disk-read")
        self._closed = False
        if file_io is not None:
            self.io, self.io_reason = file_io, "injected"
        elif self.pages_dir.is_dir() and writable:
            self.io, self.io_reason = open_file_io(
                self.pages_dir, self.config.io_backend, self.config.direct_io
            )
        else:
            self.io, self.io_reason = PosixFileIO(False), "directory not writable: buffered reads"
        logger.info("disk tier %s: %s", self.root, self.io_reason)
        self._restore_index()

    # -- setup ---------------------------------------------------------------------------
    def _prepare_dirs(self) -> bool:
        """Create (or tighten to) 0700: the tier's root, its pages and its quarantine."""
        try:
            for directory in (self.root, self.pages_dir, self.quarantine_dir):
                if private_dir(directory):
                    self._counters["modes_tightened"] += 1
        except OSError as exc:
            self.gate.failed(exc)
        return not self.gate.disabled

    def _restore_index(self) -> None:
        start = time.perf_counter()
        listed = {}
        manifest_path = self.root / MANIFEST_NAME
        if self.config.manifest and manifest_path.exists():
            try:
                manifest = read_manifest(manifest_path, secret=snapshot_secret())
                listed = {e.file: e for e in manifest.entries if e.tier == "disk"}
            except ManifestError as exc:
                self._counters["manifest_rejected"] += 1
                logger.error("ignoring disk manifest, rescanning pages: %s", exc)
            # Consumed: if this process dies, the next start must not trust a stale list.
            with contextlib.suppress(OSError):
                manifest_path.unlink()
        report = rebuild_index(
            self.pages_dir, self.io, listed, self.config.progress_min_files, self.cipher
        )
        self._counters["modes_tightened"] += report.modes_tightened
        for path, problem in report.corrupt:
            self._count_failure(problem)
            self._quarantine_page(path, problem)
        with self._lock:
            for key, entry in report.entries:
                self._index[key] = entry
                self._bytes_used += entry.file_bytes
            trash: list[Path] = []
            victims = self._make_room_locked(0, trash)
        self._empty_trash(trash)
        self._notify_evicted(victims or [])
        self._counters["temp_files_removed"] += report.temp_removed
        self._counters["pages_scanned"] += report.scanned
        self._counters["pages_from_manifest"] += report.from_manifest
        self._counters["foreign_files"] += report.foreign
        if report.entries or report.corrupt or report.temp_removed:
            logger.info(
                "disk tier %s: %d pages indexed (%d from manifest) in %.2fs; %d quarantined, "
                "%d temp files removed", self.root, len(report.entries), report.from_manifest,
                time.perf_counter() - start, len(report.corrupt), report.temp_removed,
            )

    # -- the three verbs -----------------------------------------------------------------
    def exists(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._index or key in self._pending

    def entry(self, key: BlockKey) -> DiskEntry | None:
        with self._lock:
            entry = self._index.get(key)
            if entry is None and key in self._pending:
                h = self._pending[key].header
                entry = DiskEntry(h.file_bytes, h.payload_len, h.payload_crc, h.codec, h.position)
            return entry

    def path_of(self, key: BlockKey) -> Path:
        return self.pages_dir / relative_page_path(key)

    def get(self, key: BlockKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The verified page, or None. With `out`, a page that fails verification may
        have partly overwritten `out` before being rejected: treat None as garbage."""
        with self._lock:
            staged = self._pending.get(key)
            if staged is not None:  # not on disk yet: serve the staged copy
                self._stats.hits += 1
                view = staged.buf.tensor[HEADER_BYTES : HEADER_BYTES + staged.header.payload_len]
                return _deliver(view, out)
            entry = self._index.get(key)
            if entry is None:
                self._stats.misses += 1
                return None
        page = self._read_verified(key, entry, out)
        with self._lock:
            if page is None:
                self._stats.misses += 1
            else:
                self._stats.hits += 1
                self._counters["bytes_read"] += entry.file_bytes
                if key in self._index:
                    self._index.move_to_end(key)
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
        if self.gate.retry_in() > 0:
            return self._declined()
        buf = self._bounce.get(HEADER_BYTES + align_up(page.numel()))
        staged = _Staged(key, self._stage(key, page, codec, position, buf), buf)
        return self._write(staged)

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
        with self._lock:
            if key in self._index:
                return _done(True)
            if key in self._pending:
                return self._pending[key].future
        if self.gate.retry_in() > 0:
            return _done(self._declined())
        if block is None:
            block = self.config.when_queue_full == "block"
        if timeout is None:
            timeout = self.config.block_timeout_s
        buf = self._staging.acquire(HEADER_BYTES + align_up(page.numel()), block, timeout)
        if buf is None:
            with self._lock:
                self._counters["dropped_writes"] += 1
            return _done(False)
        staged = _Staged(key, self._stage(key, page, codec, position, buf), buf)
        with self._lock:
            if key in self._index or key in self._pending:  # raced with another writer
                self._staging.release(buf)
                return _done(True) if key in self._index else self._pending[key].future
            self._pending[key] = staged
        self._writer.submit(self._run_staged, staged)
        return staged.future

    def write_queue_idle(self) -> bool:
        """No write staged or running, and writes are not stopped by an error."""
        return self._staging.in_use() == 0 and self.gate.retry_in() <= 0

    def wait_for_room(self, timeout: float | None = None) -> bool:
        """Block until the write queue has room (back-pressure for savers)."""
        return self._staging.wait_for_room(timeout)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every queued write to finish."""
        with self._lock:
            futures = [s.future for s in self._pending.values()]
        for fut in futures:
            fut.result(timeout)

    def delete(self, key: BlockKey) -> bool:
        trash: list[Path] = []
        with self._lock:
            removed = False
            staged = self._pending.get(key)
            if staged is not None:
                staged.cancelled = True
                removed = True
            entry = self._index.pop(key, None)
            self._pinned_until.pop(key, None)
            if entry is not None:
                self._bytes_used -= entry.file_bytes
                self._detach_locked(key, trash)
                removed = True
        self._empty_trash(trash)
        return removed

    def keys(self) -> Iterator[BlockKey]:
        with self._lock:
            return iter([*self._index, *(k for k in self._pending if k not in self._index)])

    def stats(self) -> TierStats:
        with self._lock:
            out = TierStats(**{**self._stats.__dict__, "extra": {}})
            out.pages = len(self._index)
            out.bytes_used = self._bytes_used
            out.extra = {k: float(v) for k, v in self._counters.items()}
            out.extra.update(
                writes_disabled=float(self.gate.disabled),
                write_failures=float(self.gate.failures),
                write_retry_in_s=self.gate.retry_in(),
                write_queue_depth=float(self._staging.in_use()),
                write_queue_capacity=float(self._staging.capacity),
                direct_io=float(self.io.direct),
                direct_io_fallbacks=float(getattr(self.io, "direct_fallbacks", 0)),
                kvikio=float(self.io.name == "kvikio"),
                encrypted=float(self.cipher is not None),
            )
            return out

    # -- pinning -------------------------------------------------------------------------
    def pin(self, key: BlockKey, ttl_s: float | None = None) -> bool:
        with self._lock:
            if key not in self._index and key not in self._pending:
                return False
            self._pinned_until[key] = float("inf") if ttl_s is None else self._clock() + ttl_s
            return True

    def unpin(self, key: BlockKey) -> None:
        with self._lock:
            self._pinned_until.pop(key, None)

    def is_pinned(self, key: BlockKey) -> bool:
        with self._lock:
            return self._pin_active(key)

    def _pin_active(self, key: BlockKey) -> bool:
        until = self._pinned_until.get(key)
        if until is None:
            return False
        if until <= self._clock():
            del self._pinned_until[key]
            return False
        return True

    # -- write path ----------------------------------------------------------------------
    def _stage(
        self,
        key: BlockKey,
        page: torch.Tensor,
        codec: str | None,
        position: int,
        buf: AlignedBuffer,
    ) -> PageHeader:
        if page.dtype != torch.uint8 or page.device.type != "cpu":
            raise ValueError(f"pages are CPU uint8 tensors, got {page.dtype} on {page.device}")
        length = page.numel()
        buf.tensor[HEADER_BYTES : HEADER_BYTES + length].copy_(page.reshape(-1))
        # A sealed page is checked by its GCM tag: no CRC32 pass in the saver's thread.
        crc = 0 if self.cipher is not None else checksum(buf.view(length, HEADER_BYTES))
        header = PageHeader(key, codec or self.codec, length, crc, position)
        pack_header(header, buf.view(HEADER_BYTES))
        # Zero the tail so a reused buffer never leaks an older page into the padding.
        buf.array[HEADER_BYTES + length : header.file_bytes] = 0
        return header

    def _run_staged(self, staged: _Staged) -> None:
        ok = False
        try:
            ok = self._write(staged)
        except Exception:
            logger.exception("disk tier: unexpected error writing %s", staged.key)
        finally:
            with self._lock:
                if self._pending.get(staged.key) is staged:
                    del self._pending[staged.key]
            self._staging.release(staged.buf)
            staged.future.set_result(ok)

    def _declined(self) -> bool:
        with self._lock:
            self._stats.rejected_puts += 1
        return False

    def _write(self, staged: _Staged) -> bool:
        if staged.cancelled:
            return False
        header, data = self._pack(staged)
        if not self.gate.allow():
            return self._declined()
        key, need = staged.key, header.file_bytes
        if need > self.budget_bytes:
            self.gate.abandon()
            return self._declined()
        trash: list[Path] = []
        with self._lock:
            if key in self._index:
                self.gate.abandon()
                return True
            victims = self._make_room_locked(need, trash)
            if victims is None:
                self.gate.abandon()
                self._stats.rejected_puts += 1
                self._empty_trash(trash)
                return False
            self._reserved += need
        self._empty_trash(trash)
        self._notify_evicted(victims)
        path = self.path_of(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(self._tmp_seq)}{TMP_SUFFIX}")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.io.write_new(tmp, data, self.config.fsync)
            with self._lock:
                if staged.cancelled:  # deleted while in flight
                    unlink_quietly(tmp)
                    self.gate.abandon()
                    return False
                os.replace(tmp, path)
                h = header
                entry = DiskEntry(need, h.payload_len, h.payload_crc, h.codec, h.position)
                self._index[key] = entry
                self._bytes_used += need
                self._stats.puts += 1
                self._counters["bytes_written"] += need
        except OSError as exc:
            unlink_quietly(tmp)
            with self._lock:
                self._counters["write_errors"] += 1
            self.gate.failed(exc)
            return False
        finally:
            with self._lock:
                self._reserved -= need
        self.gate.succeeded()
        return True

    def _pack(self, staged: _Staged) -> tuple[PageHeader, memoryview]:
        """The header and file bytes to write: the staged page as is, or zstd-compressed
        and/or sealed into this writer thread's own aligned buffer (the staged buffer
        stays raw, as reads of a pending page serve it)."""
        raw = staged.header
        frame = self._compress(staged)
        if frame is None and self.cipher is None:
            return raw, staged.buf.view(raw.file_bytes)
        header = raw
        if frame is not None:
            header = dataclasses.replace(
                raw, codec=zstd_codec_name(raw.codec), payload_crc=checksum(frame),
                stored_len=len(frame),
            )
        stored = header.stored_bytes
        # TAG_BYTES of room: AES-GCM writes ciphertext || tag, the tag then moves up.
        buf = self._packed.get(header.file_bytes + TAG_BYTES)
        if self.cipher is not None:
            src = frame if frame is not None else staged.buf.view(stored, HEADER_BYTES)
            header = seal_payload(
                header, self.cipher, memoryview(src), buf.view(stored + TAG_BYTES, HEADER_BYTES)
            )
        else:
            buf.view(stored, HEADER_BYTES)[:] = frame
        pack_header(header, buf.view(HEADER_BYTES))
        buf.array[HEADER_BYTES + stored : header.file_bytes] = 0
        return header, buf.view(header.file_bytes)

    def _compress(self, staged: _Staged) -> bytes | None:
        """The page's zstd frame, or None: compression off, the caller's codec already
        ends in zstd (a chain codec's page), or it would not save a 4 KiB block."""
        raw = staged.header
        if self._zstd is None or raw.codec.split("+")[-1].split(":")[0] == "zstd":
            return None
        frame = self._zstd.encode_buffer(staged.buf.view(raw.payload_len, HEADER_BYTES))
        with self._lock:
            self._counters["zstd_raw_bytes"] += raw.payload_len
            if align_up(len(frame)) >= align_up(raw.payload_len):
                self._counters["zstd_incompressible"] += 1
                self._counters["zstd_stored_bytes"] += raw.payload_len
                return None
            self._counters["zstd_pages"] += 1
            self._counters["zstd_stored_bytes"] += len(frame)
        return frame

    def _make_room_locked(self, need: int, trash: list[Path]) -> list[BlockKey] | None:
        """Evict until `need` more bytes fit; the victims, or None if pins prevent it.
        Victim files are moved to `trash` for the caller to unlink after the lock."""
        victims: list[BlockKey] = []
        while self._bytes_used + self._reserved + need > self.budget_bytes:
            victim = self._pick_victim()
            if victim is None:
                return None if need else victims
            entry = self._index.pop(victim)
            self._bytes_used -= entry.file_bytes
            self._stats.evictions += 1
            self._detach_locked(victim, trash)
            victims.append(victim)
        return victims

    def _detach_locked(self, key: BlockKey, trash: list[Path]) -> None:
        """Take `key`'s file out of the namespace, cheaply, under the lock.

        Unlinking frees blocks, which can take milliseconds (``discard`` mounts
        issue a TRIM): that happens after the lock is released. A rename first,
        so a new write of the same key cannot be the file that gets unlinked; a
        crash in between leaves a temp file, which the next start deletes.
        """
        path = self.path_of(key)
        doomed = path.with_name(f".{path.name}.{os.getpid()}.{next(self._tmp_seq)}{TMP_SUFFIX}")
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        except OSError:
            unlink_quietly(path)  # read-only or odd filesystem: best effort, in place
            return
        trash.append(doomed)

    def _empty_trash(self, trash: list[Path]) -> None:
        for path in trash:
            unlink_quietly(path)

    def _pick_victim(self) -> BlockKey | None:
        eligible = (k for k in self._index if not self._pin_active(k))
        if self.victim_chooser is None:
            return next(eligible, None)
        window = list(itertools.islice(eligible, self.victim_window))
        return self.victim_chooser(window) if window else None

    def _notify_evicted(self, victims: list[BlockKey]) -> None:
        if self.on_evict is not None:
            for victim in victims:
                self.on_evict(victim)

    # -- read path -----------------------------------------------------------------------
    def _read_verified(
        self, key: BlockKey, entry: DiskEntry, out: torch.Tensor | None
    ) -> torch.Tensor | None:
        length = entry.payload_len
        if out is not None and (out.numel() < length or out.dtype != torch.uint8):
            raise ValueError(f"out holds {out.numel()} {out.dtype}, page is {length} uint8")
        # Straight into `out` when the kernel accepts it (saves a copy); else bounce.
        span = align_up(length) if self.io.direct else length
        # A page stored zstd-compressed is smaller on disk than its length needs.
        packed = entry.file_bytes < HEADER_BYTES + align_up(length)
        into_out = (
            not packed
            and self.cipher is None  # sealed pages are opened from the bounce buffer
            and out is not None
            and out.device.type == "cpu"
            and out.numel() >= span
            and (is_aligned(out) if self.io.direct else out.is_contiguous())
        )
        bounce = self._bounce.get(HEADER_BYTES if into_out else entry.file_bytes + TAG_BYTES)
        path = self.path_of(key)
        try:
            if into_out:
                assert out is not None
                dst = tensor_memoryview(out)[:span]
                n = self.io.read_into(path, [bounce.view(HEADER_BYTES), dst])
                payload = dst[:length]
            else:
                n = self.io.read_into(path, [bounce.view(entry.file_bytes)])
                payload = bounce.view(min(length, entry.file_bytes - HEADER_BYTES), HEADER_BYTES)
            if n < HEADER_BYTES:
                raise PageCorrupt("truncated", f"{n} bytes, shorter than a header")
            header = unpack_header(bounce.view(HEADER_BYTES))
            verify(header, key, n)
            if header.payload_len != length:
                raise PageCorrupt("length", f"header says {header.payload_len}, index {length}")
            if header.compressed != packed:
                raise PageCorrupt("length", f"{header.stored_bytes} bytes stored, index "
                                  f"expects {entry.file_bytes - HEADER_BYTES} on disk")
            check_readable(header, self.cipher)
            if header.sealed:
                return self._open(header, bounce, out)
            if packed:
                payload = bounce.view(header.stored_bytes, HEADER_BYTES)
            verify_payload(header, payload)
            if packed:
                return self._unpack(payload, length, out)
        except FileNotFoundError:
            self._forget(key, entry, "vanished_files")
            return None
        except PageCorrupt as exc:
            self._count_failure(exc)
            if self._forget(key, entry, None):
                self._quarantine_page(path, exc)
            return None
        except OSError as exc:
            with self._lock:
                self._counters["read_errors"] += 1
            logger.warning("disk tier: reading %s failed: %s", path, exc)
            return None
        if into_out:
            assert out is not None
            return out if out.numel() == length else out[:length]
        return _deliver(bounce.tensor[HEADER_BYTES : HEADER_BYTES + length], out)

    def _open(
        self, header: PageHeader, bounce: AlignedBuffer, out: torch.Tensor | None
    ) -> torch.Tensor:
        """Decrypt a sealed page read into `bounce` (which has TAG_BYTES of room past the
        stored bytes) into `out` or a new tensor; decompress it if it is a zstd frame.
        Raises PageCorrupt("auth") when it does not authenticate."""
        assert self.cipher is not None
        stored, length = header.stored_bytes, header.payload_len
        sealed = bounce.view(stored + TAG_BYTES, HEADER_BYTES)
        if header.compressed:
            frame = self._opened.get(stored)
            open_sealed(header, self.cipher, sealed, frame.view(stored))
            return self._unpack(frame.view(stored), length, out)
        target = torch.empty(length, dtype=torch.uint8) if out is None else out[:length]
        direct = target.is_contiguous() and target.device.type == "cpu"
        dst = target if direct else torch.empty(length, dtype=torch.uint8)
        open_sealed(header, self.cipher, sealed, tensor_memoryview(dst))
        if dst is not target:
            target.copy_(dst)
        return target

    def _count_failure(self, problem: PageCorrupt) -> None:
        counter = {
            "auth": "auth_failures", "plaintext": "plaintext_rejected",
            "key-id": "other_key_pages", "no-key": "other_key_pages",
        }.get(problem.reason)
        with self._lock:
            self._stats.integrity_failures += 1
            if counter is not None:
                self._counters[counter] += 1

    def _unpack(self, frame: memoryview, length: int, out: torch.Tensor | None) -> torch.Tensor:
        """Decompress a verified zstd payload into `out` (or a new tensor). A frame that
        passed its CRC but fails zstd's own checks raises PageCorrupt (a miss)."""
        target = torch.empty(length, dtype=torch.uint8) if out is None else out[:length]
        direct = target.is_contiguous() and target.device.type == "cpu"
        dst = target if direct else torch.empty(length, dtype=torch.uint8)
        try:
            self._unzstd.decode_into(frame, tensor_memoryview(dst))
        except CorruptPageError as exc:
            raise PageCorrupt("zstd", str(exc)) from exc
        if dst is not target:
            target.copy_(dst)
        return target

    def _forget(self, key: BlockKey, entry: DiskEntry, counter: str | None) -> bool:
        """Drop `key` if the index still maps it to `entry` (not a newer write)."""
        with self._lock:
            if counter is not None:
                self._counters[counter] += 1
            if self._index.get(key) is not entry:
                return False
            del self._index[key]
            self._bytes_used -= entry.file_bytes
            self._pinned_until.pop(key, None)
        self._notify_evicted([key])
        return True

    def _quarantine_page(self, path: Path, problem: PageCorrupt) -> None:
        if self._quarantine.admit(path, problem):
            with self._lock:
                self._counters["quarantined"] += 1

    # -- lifecycle -----------------------------------------------------------------------
    def index_snapshot(self) -> list[tuple[BlockKey, DiskEntry]]:
        """(key, entry) for every page on disk, least recently used first."""
        with self._lock:
            return list(self._index.items())

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
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        if self.config.manifest and not self.gate.disabled:
            try:
                self.write_manifest()
            except OSError as exc:
                logger.warning("disk tier: no manifest written (%s); next start rescans", exc)
        if self._dir_lock is not None:
            self._dir_lock.release()


def _deliver(view: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return view.clone()
    if out.numel() < view.numel():
        raise ValueError(f"out holds {out.numel()} bytes, page is {view.numel()}")
    target = out if out.numel() == view.numel() else out[: view.numel()]
    target.copy_(view)
    return target


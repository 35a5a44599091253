"""The disk tier's write path: a bounded queue of staged pages, writer threads, and the
commit of each page into the index.

Writes go to a temp file, are fsynced, then renamed into place: a writer killed
mid-write leaves only a temp file, which the next start deletes. Room is reserved in
the budget (evicting if needed) before the file is written, and the page enters the
index only after the rename, under the book's lock, so a reader finds a page either
pending (served from its staging buffer) or indexed, never half-written. An I/O error
(ENOSPC, EROFS, EIO...) closes the write gate: writes are declined while reads
continue, and one write is retried after a back-off (``write_gate``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.aligned_io import AlignedBuffer, FileIO, ThreadBuffers, align_up
from symram_vllm.tiers.disk_config import DiskTierConfig
from symram_vllm.tiers.disk_housekeeping import PageFiles, empty_trash, unlink_quietly
from symram_vllm.tiers.disk_index import DiskIndex
from symram_vllm.tiers.disk_layout import DiskEntry, entry_of
from symram_vllm.tiers.page_format import HEADER_BYTES, PageHeader
from symram_vllm.tiers.page_packer import PagePacker
from symram_vllm.tiers.staging import StagingPool
from symram_vllm.tiers.write_gate import WriteGate

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Staged:
    """A page copied in for writing; readers are served from `buf` until it is on disk."""

    key: BlockKey
    header: PageHeader
    buf: AlignedBuffer
    future: Future[bool] = field(default_factory=Future)
    cancelled: bool = False

    def entry(self) -> DiskEntry:
        return entry_of(self.header)

    def payload(self) -> torch.Tensor:
        return self.buf.tensor[HEADER_BYTES : HEADER_BYTES + self.header.payload_len]


def done(value: bool) -> Future[bool]:
    fut: Future[bool] = Future()
    fut.set_result(value)
    return fut


class DiskWriter:
    def __init__(
        self,
        index: DiskIndex,
        files: PageFiles,
        packer: PagePacker,
        io: FileIO,
        gate: WriteGate,
        config: DiskTierConfig,
        bounce: ThreadBuffers,
        notify_evicted: Callable[[list[BlockKey]], None],
    ) -> None:
        self._index = index
        self._files = files
        self._packer = packer
        self.io = io
        self.gate = gate
        self._config = config
        self._bounce = bounce  # synchronous writes stage here (shared with reads)
        self._notify_evicted = notify_evicted
        # Queued and running writes, guarded by the index's lock.
        self.pending: dict[BlockKey, Staged] = {}
        self.staging = StagingPool(config.write_workers + config.write_queue)
        self._pool = ThreadPoolExecutor(config.write_workers, "symram-disk-write")

    def write_now(
        self, key: BlockKey, page: torch.Tensor, codec: str | None, position: int
    ) -> bool:
        """Write in the caller's thread (the caller checked `key` is not held yet)."""
        if self.gate.retry_in() > 0:
            return self._declined()
        buf = self._bounce.get(HEADER_BYTES + align_up(page.numel()))
        staged = Staged(key, self._packer.stage(key, page, codec, position, buf), buf)
        return self._write(staged)

    def submit(
        self,
        key: BlockKey,
        page: torch.Tensor,
        codec: str | None,
        position: int,
        block: bool | None,
        timeout: float | None,
    ) -> Future[bool]:
        """Queue a write (see ``DiskTier.set_async``)."""
        index = self._index
        with index.lock:
            if key in index.entries:
                return done(True)
            if key in self.pending:
                return self.pending[key].future
        if self.gate.retry_in() > 0:
            return done(self._declined())
        if block is None:
            block = self._config.when_queue_full == "block"
        if timeout is None:
            timeout = self._config.block_timeout_s
        buf = self.staging.acquire(HEADER_BYTES + align_up(page.numel()), block, timeout)
        if buf is None:
            index.count("dropped_writes")
            return done(False)
        staged = Staged(key, self._packer.stage(key, page, codec, position, buf), buf)
        with index.lock:
            if key in index.entries or key in self.pending:  # raced with another writer
                self.staging.release(buf)
                return done(True) if key in index.entries else self.pending[key].future
            self.pending[key] = staged
        self._pool.submit(self._run, staged)
        return staged.future

    def idle(self) -> bool:
        """No write staged or running, and writes are not stopped by an error."""
        return self.staging.in_use() == 0 and self.gate.retry_in() <= 0

    def flush(self, timeout: float | None) -> None:
        with self._index.lock:
            futures = [s.future for s in self.pending.values()]
        for fut in futures:
            fut.result(timeout)

    def cancel_locked(self, key: BlockKey) -> bool:
        """Cancel `key`'s queued write, if any: it will not be committed."""
        staged = self.pending.get(key)
        if staged is None:
            return False
        staged.cancelled = True
        return True

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

    def _run(self, staged: Staged) -> None:
        ok = False
        try:
            ok = self._write(staged)
        except Exception:
            logger.exception("disk tier: unexpected error writing %s", staged.key)
        finally:
            with self._index.lock:
                if self.pending.get(staged.key) is staged:
                    del self.pending[staged.key]
            self.staging.release(staged.buf)
            staged.future.set_result(ok)

    def _declined(self) -> bool:
        with self._index.lock:
            self._index.stats.rejected_puts += 1
        return False

    def _write(self, staged: Staged) -> bool:
        if staged.cancelled:
            return False
        header, data = self._packer.pack(staged.header, staged.buf)
        if not self.gate.allow():
            return self._declined()
        index, key, need = self._index, staged.key, header.file_bytes
        if need > index.budget_bytes:
            self.gate.abandon()
            return self._declined()
        trash: list[Path] = []
        with index.lock:
            if key in index.entries:
                self.gate.abandon()
                return True
            victims = index.make_room_locked(need, trash)
            if victims is None:
                self.gate.abandon()
                index.stats.rejected_puts += 1
                empty_trash(trash)
                return False
            index.reserved += need
        empty_trash(trash)
        self._notify_evicted(victims)
        path = self._files.path_of(key)
        tmp = self._files.temp_beside(path)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.io.write_new(tmp, data, self._config.fsync)
            with index.lock:
                if staged.cancelled:  # deleted while in flight
                    unlink_quietly(tmp)
                    self.gate.abandon()
                    return False
                os.replace(tmp, path)
                index.add_locked(key, entry_of(header))
                index.stats.puts += 1
                index.counters["bytes_written"] += need
        except OSError as exc:
            unlink_quietly(tmp)
            index.count("write_errors")
            self.gate.failed(exc)
            return False
        finally:
            with index.lock:
                index.reserved -= need
        self.gate.succeeded()
        return True

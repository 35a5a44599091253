"""Aligned host buffers and whole-file I/O for the disk tier (POSIX O_DIRECT or kvikio).

O_DIRECT skips the page cache, so a disk tier of hundreds of GB does not evict the
engine's own memory and reads measure the drive, not RAM. It demands that buffer
addresses, file offsets and lengths are multiples of the logical block size; 4096
covers every NVMe and 512e drive. Anonymous ``mmap`` memory is page aligned, which
is why buffers come from there rather than from numpy/torch (64-byte aligned).

Some filesystems refuse O_DIRECT (older tmpfs, some FUSE and network mounts) with
EINVAL, so support is probed once per directory and the buffered path is used
there instead; the same file format works both ways.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import mmap
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from symram_vllm import capability
from symram_vllm.capability import Capability

logger = logging.getLogger(__name__)

ALIGN = 4096
O_DIRECT: int = getattr(os, "O_DIRECT", 0)


def align_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


class AlignedBuffer:
    """Page-aligned host memory, viewable as memoryview / numpy / torch without copies."""

    def __init__(self, nbytes: int) -> None:
        self.capacity = align_up(max(nbytes, ALIGN))
        # Never closed explicitly: numpy and torch views export its buffer; the
        # mapping goes away with the last of them.
        self._map = mmap.mmap(-1, self.capacity)
        self.array = np.frombuffer(self._map, dtype=np.uint8)
        self.tensor = torch.from_numpy(self.array)

    def view(self, nbytes: int, offset: int = 0) -> memoryview:
        return memoryview(self._map)[offset : offset + nbytes]


class ThreadBuffers:
    """One growable aligned bounce buffer per thread, so readers never contend."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, nbytes: int) -> AlignedBuffer:
        buf: AlignedBuffer | None = getattr(self._local, "buf", None)
        if buf is None or buf.capacity < nbytes:
            buf = AlignedBuffer(nbytes)
            self._local.buf = buf
        return buf


def is_aligned(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() and tensor.data_ptr() % ALIGN == 0


def tensor_memoryview(tensor: torch.Tensor) -> memoryview:
    """Writable byte view of a contiguous CPU uint8 tensor (no copy)."""
    return memoryview(tensor.numpy()).cast("B")


# -- O_DIRECT probe ----------------------------------------------------------------------
_probe_lock = threading.Lock()
_probe_cache: dict[tuple[int, int], Capability] = {}


def probe_direct_io(directory: str | Path) -> Capability:
    """Can files in `directory` be written and read with O_DIRECT? Probed once per
    directory (keyed by device and inode, so symlinked paths share the answer)."""
    path = Path(directory)
    st = path.stat()
    cache_key = (st.st_dev, st.st_ino)
    with _probe_lock:
        cached = _probe_cache.get(cache_key)
        if cached is not None:
            return cached
        result = _probe_uncached(path)
        if result.available or "refused O_DIRECT" in result.reason:
            # An unwritable directory says nothing about O_DIRECT: ask again later.
            _probe_cache[cache_key] = result
        return result


def _probe_uncached(directory: Path) -> Capability:
    if not O_DIRECT:
        return Capability(False, "this platform has no O_DIRECT")
    probe = directory / f".odirect-probe-{os.getpid()}-{threading.get_ident()}"
    buf = AlignedBuffer(ALIGN)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | O_DIRECT, 0o600)
        try:
            os.pwritev(fd, [buf.view(ALIGN)], 0)
            os.preadv(fd, [buf.view(ALIGN)], 0)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return Capability(False, f"{directory}: filesystem refused O_DIRECT ({exc})")
        return Capability(False, f"{directory}: cannot probe O_DIRECT ({exc})")
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return Capability(True, f"{directory}: O_DIRECT works")


def forget_probes() -> None:
    with _probe_lock:
        _probe_cache.clear()


# -- file I/O backends -------------------------------------------------------------------
class FileIO(Protocol):
    """Whole-file I/O used by the disk tier. Buffers passed with `direct` are aligned."""

    name: str
    direct: bool

    def read_into(self, path: Path, bufs: list[memoryview]) -> int:
        """Fill `bufs` in order from offset 0; returns bytes read (short at EOF)."""
        ...

    def write_new(self, path: Path, buf: memoryview, fsync: bool) -> None:
        """Create `path` (must not exist) holding `buf`; durable on return if `fsync`."""
        ...


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    out: list[memoryview] = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        n = 0
    return out


class PosixFileIO:
    """os.preadv / os.pwritev, with O_DIRECT where the directory allows it."""

    name = "posix"

    def __init__(self, direct: bool) -> None:
        self.direct = direct and bool(O_DIRECT)
        self.direct_fallbacks = 0

    def _flags(self, base: int, direct: bool) -> int:
        return base | (O_DIRECT if direct else 0)

    def read_into(self, path: Path, bufs: list[memoryview]) -> int:
        try:
            return self._read(path, bufs, self.direct)
        except OSError as exc:
            if not (self.direct and exc.errno == errno.EINVAL):
                raise
            # A file or buffer the kernel will not take directly: serve it buffered.
            self.direct_fallbacks += 1
            return self._read(path, bufs, False)

    def _read(self, path: Path, bufs: list[memoryview], direct: bool) -> int:
        fd = os.open(path, self._flags(os.O_RDONLY, direct))
        try:
            total, pending = 0, bufs
            while pending:
                n = os.preadv(fd, pending, total)
                if n == 0:
                    break
                total += n
                pending = _advance(pending, n)
            return total
        finally:
            os.close(fd)

    def write_new(self, path: Path, buf: memoryview, fsync: bool) -> None:
        try:
            self._write(path, buf, fsync, self.direct)
        except OSError as exc:
            if not (self.direct and exc.errno == errno.EINVAL):
                raise
            self.direct_fallbacks += 1
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._write(path, buf, fsync, False)

    def _write(self, path: Path, buf: memoryview, fsync: bool, direct: bool) -> None:
        # 0600: a page is the prompt in another encoding (the tier's dirs are 0700 too).
        fd = os.open(path, self._flags(os.O_WRONLY | os.O_CREAT | os.O_EXCL, direct), 0o600)
        try:
            done, pending = 0, [buf]
            while pending:
                n = os.pwritev(fd, pending, done)
                done += n
                pending = _advance(pending, n)
            if fsync:
                # fdatasync also persists the size, which is all a reader needs.
                os.fdatasync(fd)
        finally:
            os.close(fd)


class KvikioFileIO:
    """GPUDirect Storage through kvikio (CUDA hosts only; chosen by the capability probe).

    Untested here: no machine in this project has CUDA. kvikio is imported on
    construction so CPU hosts never pay for (or fail on) the import.
    """

    name = "kvikio"
    direct = True

    def __init__(self) -> None:
        import kvikio  # optional GPU extra: imported only when chosen

        self._kvikio = kvikio

    def read_into(self, path: Path, bufs: list[memoryview]) -> int:
        total = 0
        with self._kvikio.CuFile(str(path), "r") as f:
            for b in bufs:
                arr = np.frombuffer(b, dtype=np.uint8)
                n = int(f.pread(arr, len(b), file_offset=total).get())
                total += n
                if n < len(b):
                    break
        return total

    def write_new(self, path: Path, buf: memoryview, fsync: bool) -> None:
        # Created here (O_EXCL, 0600) so the mode is set before any byte is written.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        with self._kvikio.CuFile(str(path), "w") as f:
            f.pwrite(np.frombuffer(buf, dtype=np.uint8), len(buf)).get()
        if fsync:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)


def probe_kvikio_io(directory: Path) -> Capability:
    """kvikio can import yet fail on a file system (no O_DIRECT, no cuFile driver, a
    missing libcufile): one small write and read back in `directory` decides."""
    path = directory / f".kvikio-probe-{os.getpid()}-{threading.get_ident()}"
    data = bytes(range(256)) * 16
    try:
        io = KvikioFileIO()
        try:
            io.write_new(path, memoryview(data), fsync=False)
            out = bytearray(len(data))
            got = io.read_into(path, [memoryview(out)])
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
    except Exception as exc:  # any failure means: not here
        return Capability(False, f"{type(exc).__name__}: {exc}")
    if got != len(data) or bytes(out) != data:
        return Capability(False, f"a {len(data)}-byte round trip read back {got} other bytes")
    return Capability(True, f"{len(data)}-byte round trip in {directory}")


def choose_backend(requested: str, kvikio: Capability) -> tuple[str, str]:
    """Pick "posix" or "kvikio" for `requested` in {"auto", "posix", "kvikio"}."""
    if requested == "posix":
        return "posix", "posix requested"
    if requested not in ("auto", "kvikio"):
        raise ValueError(f"io_backend must be auto, posix or kvikio, got {requested!r}")
    if kvikio.available:
        return "kvikio", kvikio.reason
    if requested == "kvikio":
        logger.warning("kvikio requested but unavailable (%s); using POSIX I/O", kvikio.reason)
    return "posix", f"kvikio unavailable: {kvikio.reason}"


@functools.cache
def _warn_buffered(directory: str, reason: str) -> None:
    logger.warning("disk tier at %s uses buffered I/O: %s", directory, reason)


def open_file_io(directory: Path, backend: str, direct_io: str) -> tuple[FileIO, str]:
    """The FileIO for `directory`: backend in {auto, posix, kvikio}, direct_io in
    {auto, on, off}. Returns the backend and a one-line reason for the logs."""
    name, reason = choose_backend(backend, capability.kvikio_capability())
    if name == "kvikio":
        probe = probe_kvikio_io(directory)
        if probe.available:
            return KvikioFileIO(), reason
        logger.warning("kvikio imports but cannot do I/O in %s (%s); using POSIX I/O",
                       directory, probe.reason)
        reason = f"kvikio unusable here: {probe.reason}"
    if direct_io == "off":
        return PosixFileIO(False), f"{reason}; O_DIRECT off by config"
    probe = probe_direct_io(directory)
    if not probe.available:
        if direct_io == "on":
            raise OSError(errno.EINVAL, f"direct_io='on' but {probe.reason}")
        _warn_buffered(str(directory), probe.reason)
    return PosixFileIO(probe.available), f"{reason}; {probe.reason}"

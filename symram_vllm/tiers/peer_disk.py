"""Read-only access to the disk-tier pages of other engines sharing one disk_path.

Each engine owns one slot directory per rank (``disk_layout.slot_directory``) and is
its only writer; this reads the *other* slots' page files. Writers publish pages by
rename and retire them by rename-then-unlink, so an open file is always a whole page:
a reader sees a complete page or no file, never a torn one. Every read is verified
anyway (header CRC, key, codec, length, payload CRC32) before its bytes count, and a
page that fails is a miss, counted, and left alone: the file belongs to its owner,
which quarantines it on its own next read.

With a ``cipher`` the same policy as the owner's applies: a sealed page must
authenticate under this engine's key (and AAD binds it to its key), and with
encryption required a plaintext peer page is refused.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

from symram_vllm.codecs.base import CorruptPageError
from symram_vllm.codecs.zstd import ZstdCodec
from symram_vllm.keys import BlockKey
from symram_vllm.tiers.aligned_io import tensor_memoryview
from symram_vllm.tiers.crypto import TAG_BYTES, PageCipher
from symram_vllm.tiers.disk_layout import rank_slot_directories, relative_page_path
from symram_vllm.tiers.page_format import (
    HEADER_BYTES,
    PageCorrupt,
    PageHeader,
    check_readable,
    open_sealed,
    unpack_header,
    verify,
    verify_payload,
    zstd_codec_name,
)

logger = logging.getLogger(__name__)


class PeerDiskReader:
    """The pages of every other slot of one rank under one disk_path (read-only)."""

    name = "peer_disk"
    reachable = True  # local files: a miss is an answer

    def __init__(
        self,
        base: str | Path,
        namespace: bytes,
        rank: int,
        *,
        own_root: Path | None,
        codec: str = "none",
        rescan_s: float = 2.0,
        cipher: PageCipher | None = None,
    ) -> None:
        self.base = Path(base)
        self.namespace = namespace
        self.rank = rank
        self.own_root = Path(own_root).resolve() if own_root is not None else None
        self.codec = codec
        self.rescan_s = rescan_s
        self.cipher = cipher
        self._lock = threading.Lock()
        self._roots: list[Path] = []
        self._scanned_at = float("-inf")
        self._local = threading.local()
        self._zstd: ZstdCodec | None = None  # built on the first compressed page
        self.counters: dict[str, int] = dict.fromkeys(
            ("hits", "misses", "integrity_failures", "unsupported", "read_errors", "bytes_read",
             "auth_failures"),
            0,
        )

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def roots(self) -> list[Path]:
        """Peer slot directories (not ours), rescanned at most every `rescan_s`."""
        now = time.monotonic()
        with self._lock:
            if now - self._scanned_at < self.rescan_s:
                return self._roots
        found = [
            p for p in rank_slot_directories(self.base, self.namespace, self.rank)
            if self.own_root is None or p.resolve() != self.own_root
        ]
        with self._lock:
            self._roots, self._scanned_at = found, now
        return found

    def _paths(self, key: BlockKey) -> list[Path]:
        rel = relative_page_path(key)
        return [root / "pages" / rel for root in self.roots()]

    def exists(self, key: BlockKey) -> bool:
        return any(p.is_file() for p in self._paths(key))

    def read_into(self, key: BlockKey, out: torch.Tensor) -> bool:
        """Fill `out` (a flat CPU uint8 page) with `key`'s page from any peer slot.
        False on a miss or when no peer copy verifies; `out` is then garbage."""
        if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("peer reads go into contiguous CPU uint8 pages")
        for path in self._paths(key):
            if self._read_one(path, key, out):
                self._count("hits")
                self._count("bytes_read", HEADER_BYTES + out.numel())
                return True
        self._count("misses")
        return False

    def _buffer(self, name: str, nbytes: int) -> bytearray:
        """This thread's scratch buffer `name`, at least `nbytes` long."""
        buf: bytearray | None = getattr(self._local, name, None)
        if buf is None or len(buf) < nbytes:
            buf = bytearray(nbytes)
            setattr(self._local, name, buf)
        return buf

    def _read_one(self, path: Path, key: BlockKey, out: torch.Tensor) -> bool:
        length = out.numel()
        header_buf = self._buffer("header", HEADER_BYTES)
        dst = tensor_memoryview(out)[:length]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._count("read_errors")
            logger.debug("peer page %s unreadable: %s", path, exc)
            return False
        try:
            size = os.fstat(fd).st_size
            # Without a cipher, pages are plaintext: the payload lands in `out` at once.
            head = memoryview(header_buf)[:HEADER_BYTES]
            n = os.preadv(fd, [head] if self.cipher is not None else [head, dst], 0)
            header = unpack_header(memoryview(header_buf)[:HEADER_BYTES])
            verify(header, key, size)
            if header.payload_len != length:
                self._count("unsupported")
                return False
            expected = self.codec if header.stored_len is None else zstd_codec_name(self.codec)
            if header.codec != expected:
                # Another page format: not ours to decode.
                self._count("unsupported")
                return False
            check_readable(header, self.cipher)
            if header.sealed or header.compressed:
                return self._read_stored(fd, header, dst)
            if self.cipher is not None:  # a plaintext page with encryption optional
                n += os.preadv(fd, [dst], HEADER_BYTES)
            if n < HEADER_BYTES + length:
                need = HEADER_BYTES + length
                raise PageCorrupt("truncated", f"{n} bytes read, page needs {need}")
            verify_payload(header, dst)
        except PageCorrupt as exc:
            self._count("integrity_failures")
            if exc.reason == "auth":
                self._count("auth_failures")
            logger.warning("symram: peer page %s failed verification (%s); not used", path, exc)
            return False
        except OSError as exc:
            self._count("read_errors")
            logger.debug("peer page %s unreadable: %s", path, exc)
            return False
        finally:
            os.close(fd)
        return True

    def _read_stored(self, fd: int, header: PageHeader, dst: memoryview) -> bool:
        """A sealed and/or zstd page: read its stored bytes, open (AES-GCM) or check
        (CRC32) them, decompress a zstd frame into `dst`."""
        stored = header.stored_bytes
        raw = memoryview(self._buffer("stored", stored + TAG_BYTES))
        if os.preadv(fd, [raw[:stored]], HEADER_BYTES) < stored:
            raise PageCorrupt("truncated", f"{stored} stored bytes cut short")
        if header.sealed:
            assert self.cipher is not None  # check_readable refused it otherwise
            target = dst if not header.compressed else memoryview(
                self._buffer("opened", stored))[:stored]
            open_sealed(header, self.cipher, raw[: stored + TAG_BYTES], target)
            frame = target
        else:
            frame = raw[:stored]
            verify_payload(header, frame)
        if not header.compressed:
            return True
        if self._zstd is None:
            self._zstd = ZstdCodec()
        try:
            self._zstd.decode_into(frame, dst)
        except CorruptPageError as exc:
            raise PageCorrupt("zstd", str(exc)) from exc
        return True

    def stats(self) -> dict[str, float]:
        with self._lock:
            out = {k: float(v) for k, v in self.counters.items()}
            out["peers"] = float(len(self._roots))
        return out

    def close(self) -> None:
        return

"""Reading one page file and proving it is the page asked for.

Every read is checked against the page header (magic, key, length, and the index's
idea of the stored size), then the payload against its CRC32, its GCM tag (a sealed
page) or zstd's own frame checks. Anything that does not hold raises ``PageCorrupt``;
the tier turns that into a miss and a quarantined file. The reader keeps no state
about pages: the index entry comes from the caller, and so do the consequences.

A plain page goes straight into the caller's ``out`` when the kernel accepts that
buffer (saves a copy); a compressed or sealed one is read into this thread's bounce
buffer and decoded from there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from symram_vllm.codecs.base import CorruptPageError
from symram_vllm.codecs.zstd import ZstdCodec
from symram_vllm.keys import BlockKey
from symram_vllm.tiers.aligned_io import (
    AlignedBuffer,
    FileIO,
    ThreadBuffers,
    align_up,
    is_aligned,
    tensor_memoryview,
)
from symram_vllm.tiers.crypto import TAG_BYTES, PageCipher
from symram_vllm.tiers.disk_layout import DiskEntry
from symram_vllm.tiers.page_format import (
    HEADER_BYTES,
    PageCorrupt,
    PageHeader,
    check_readable,
    open_sealed,
    unpack_header,
    verify,
    verify_payload,
)


class PageReader:
    def __init__(
        self,
        io: FileIO,
        cipher: PageCipher | None,
        unzstd: ZstdCodec,
        bounce: ThreadBuffers,
    ) -> None:
        self.io = io
        self.cipher = cipher
        # Pages written compressed stay readable after a restart with compression off.
        self._unzstd = unzstd
        self._bounce = bounce  # shared with the tier's synchronous writes (one per thread)
        self._opened = ThreadBuffers()  # a sealed zstd frame, decrypted

    def read(
        self, key: BlockKey, path: Path, entry: DiskEntry, out: torch.Tensor | None
    ) -> torch.Tensor:
        """The verified page at `path`, in `out` or a new tensor. Raises PageCorrupt,
        FileNotFoundError or another OSError; a page that fails may have partly
        overwritten `out` first. ValueError if `out` cannot hold the page."""
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
        if into_out:
            assert out is not None
            return out if out.numel() == length else out[:length]
        return deliver(bounce.tensor[HEADER_BYTES : HEADER_BYTES + length], out)

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


def deliver(view: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`view` copied into `out` (trimmed to its length), or cloned when there is none."""
    if out is None:
        return view.clone()
    if out.numel() < view.numel():
        raise ValueError(f"out holds {out.numel()} bytes, page is {view.numel()}")
    target = out if out.numel() == view.numel() else out[: view.numel()]
    target.copy_(view)
    return target

"""A page into the bytes of its file: staged behind its header, then maybe compressed
and sealed, in the disk tier's writer threads.

Staging copies the caller's page into an aligned buffer at submit time (the caller may
reuse its memory at once) with a plain header, so a page still queued can be served
from there. Packing happens in the writer thread, into that thread's own buffer: the
staged buffer stays raw for those reads. zstd is kept only when it saves a 4 KiB block;
a sealed page (AES-256-GCM, ``crypto.py``) is checked by its tag, so staging skips the
CRC32 pass in the saver's thread.
"""

from __future__ import annotations

import dataclasses

import torch

from symram_vllm.codecs.zstd import ZstdCodec
from symram_vllm.keys import BlockKey
from symram_vllm.tiers.aligned_io import AlignedBuffer, ThreadBuffers, align_up
from symram_vllm.tiers.crypto import TAG_BYTES, PageCipher
from symram_vllm.tiers.disk_index import DiskIndex
from symram_vllm.tiers.page_format import (
    HEADER_BYTES,
    PageHeader,
    checksum,
    pack_header,
    seal_payload,
    zstd_codec_name,
)


class PagePacker:
    def __init__(
        self,
        index: DiskIndex,
        codec: str,
        cipher: PageCipher | None,
        zstd: ZstdCodec | None,
    ) -> None:
        self._index = index  # counts the zstd figures
        # Recorded in the header of a page whose writer names no codec.
        self.codec = codec
        self.cipher = cipher
        self.zstd = zstd
        self._packed = ThreadBuffers()  # writer threads: header + compressed/sealed payload

    def stage(
        self,
        key: BlockKey,
        page: torch.Tensor,
        codec: str | None,
        position: int,
        buf: AlignedBuffer,
    ) -> PageHeader:
        """Copy `page` into `buf` behind its plain header; the header."""
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

    def pack(self, raw: PageHeader, staged: AlignedBuffer) -> tuple[PageHeader, memoryview]:
        """The header and file bytes to write: the staged page as is, or zstd-compressed
        and/or sealed into this writer thread's own aligned buffer."""
        frame = self._compress(raw, staged)
        if frame is None and self.cipher is None:
            return raw, staged.view(raw.file_bytes)
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
            src = frame if frame is not None else staged.view(stored, HEADER_BYTES)
            header = seal_payload(
                header, self.cipher, memoryview(src), buf.view(stored + TAG_BYTES, HEADER_BYTES)
            )
        else:
            buf.view(stored, HEADER_BYTES)[:] = frame
        pack_header(header, buf.view(HEADER_BYTES))
        buf.array[HEADER_BYTES + stored : header.file_bytes] = 0
        return header, buf.view(header.file_bytes)

    def _compress(self, raw: PageHeader, staged: AlignedBuffer) -> bytes | None:
        """The page's zstd frame, or None: compression off, the caller's codec already
        ends in zstd (a chain codec's page), or it would not save a 4 KiB block."""
        if self.zstd is None or raw.codec.split("+")[-1].split(":")[0] == "zstd":
            return None
        frame = self.zstd.encode_buffer(staged.view(raw.payload_len, HEADER_BYTES))
        with self._index.lock:
            counters = self._index.counters
            counters["zstd_raw_bytes"] += raw.payload_len
            if align_up(len(frame)) >= align_up(raw.payload_len):
                counters["zstd_incompressible"] += 1
                counters["zstd_stored_bytes"] += raw.payload_len
                return None
            counters["zstd_pages"] += 1
            counters["zstd_stored_bytes"] += len(frame)
        return frame

"""Codec stage "zstd": lossless, level configurable ("zstd:9"), default 3.

Frames carry their content size and an xxhash64 checksum, so a truncated or flipped
page raises CorruptPageError instead of decoding to garbage KV.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import zstandard

from symram_vllm.codecs.base import ByteTransform, CorruptPageError

DEFAULT_LEVEL = 3
MIN_LEVEL = -7  # zstd's "fast" levels trade ratio for speed
MAX_LEVEL = 22


def check_level(level: int) -> int:
    if not MIN_LEVEL <= level <= MAX_LEVEL or level == 0:
        raise ValueError(
            f"zstd level must be in [{MIN_LEVEL}, -1] or [1, {MAX_LEVEL}], got {level}"
        )
    return level


class ZstdCodec(ByteTransform):
    name = "zstd"

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = check_level(level)
        # zstandard (de)compressor objects must not be shared between threads.
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level, write_checksum=True)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def encode(self, page: torch.Tensor) -> torch.Tensor:
        src = page.reshape(-1).cpu().contiguous().numpy()
        return torch.frombuffer(bytearray(self._compressor().compress(src)), dtype=torch.uint8)

    def decode(self, data: torch.Tensor, expected_nbytes: int) -> torch.Tensor:
        out = torch.empty(expected_nbytes, dtype=torch.uint8)
        self.decode_into(data.reshape(-1).cpu().contiguous().numpy(), out.numpy())
        return out

    def encode_buffer(self, src: memoryview | bytes) -> bytes:
        """One frame of any bytes-like object (the disk tier compresses staged pages)."""
        return self._compressor().compress(src)

    def decode_into(self, frame: Any, out: Any) -> None:
        """Decode the frame `frame` (bytes-like) into all of the writable buffer `out`,
        which must be exactly the frame's content size. Raises CorruptPageError."""
        dst = memoryview(out).cast("B")
        expected_nbytes = len(dst)
        try:
            size = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise CorruptPageError(f"not a zstd frame: {exc}") from exc
        if size != expected_nbytes:
            raise CorruptPageError(f"zstd frame holds {size} bytes, expected {expected_nbytes}")
        # decompressobj, not stream_reader: it reports whether the whole frame, checksum
        # included, was consumed (a frame cut inside its checksum must not pass) and
        # whether bytes follow it.
        obj = self._decompressor().decompressobj()
        try:
            data = obj.decompress(frame)
        except zstandard.ZstdError as exc:
            raise CorruptPageError(f"zstd frame is corrupt: {exc}") from exc
        if not obj.eof or obj.unused_data or len(data) != expected_nbytes:
            raise CorruptPageError(
                f"zstd frame is truncated or followed by {len(obj.unused_data)} extra bytes "
                f"({len(data)} of {expected_nbytes} bytes decoded)")
        dst[:] = data

    def max_encoded_size(self, nbytes: int) -> int:
        # ZSTD_COMPRESSBOUND plus the frame header and checksum.
        bound = nbytes + (nbytes >> 8)
        if nbytes < 128 << 10:
            bound += ((128 << 10) - nbytes) >> 11
        return bound + 18

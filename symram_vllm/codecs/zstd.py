"""Codec stage "zstd": lossless, level configurable ("zstd:9"), default 3.

Frames carry their content size and an xxhash64 checksum, so a truncated or flipped
page raises CorruptPageError instead of decoding to garbage KV.
"""

from __future__ import annotations

import threading

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
        frame = data.reshape(-1).cpu().contiguous().numpy()
        try:
            size = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise CorruptPageError(f"not a zstd frame: {exc}") from exc
        if size != expected_nbytes:
            raise CorruptPageError(f"zstd frame holds {size} bytes, expected {expected_nbytes}")
        out = torch.empty(expected_nbytes, dtype=torch.uint8)
        buf = out.numpy()
        filled = 0
        try:
            with self._decompressor().stream_reader(frame) as reader:
                while filled < expected_nbytes:
                    n = reader.readinto(buf[filled:])
                    if n == 0:
                        break
                    filled += n
                # Reading past the content makes zstd check the frame checksum.
                trailing = reader.read(1)
        except zstandard.ZstdError as exc:
            raise CorruptPageError(f"zstd frame is corrupt: {exc}") from exc
        if filled != expected_nbytes or trailing:
            raise CorruptPageError(f"zstd frame decoded to {filled} bytes, expected "
                                   f"{expected_nbytes}")
        return out

    def max_encoded_size(self, nbytes: int) -> int:
        # ZSTD_COMPRESSBOUND plus the frame header and checksum.
        bound = nbytes + (nbytes >> 8)
        if nbytes < 128 << 10:
            bound += ((128 << 10) - nbytes) >> 11
        return bound + 18

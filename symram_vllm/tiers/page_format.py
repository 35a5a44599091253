"""On-disk page format: one 4 KiB header block, then the payload, padded to 4 KiB.

The header is a whole block so the payload starts block-aligned: O_DIRECT can read
it straight into an aligned destination, and pages whose size is a multiple of
4 KiB (every fixed-size codec page here) waste nothing on padding.

Integrity: the header carries its own CRC32 and the payload's CRC32. CRC32 (zlib)
runs at about 3.9 GB/s on this CPU against 0.9 GB/s for BLAKE2b, i.e. faster than
the drive, and it detects every burst error up to 32 bits and any torn or
truncated write with probability 1 - 2^-32. It is not a MAC: tamper evidence for
whole stores is the hash-chained manifest's job (``snapshot.py``).

A header also names its key (chain + rank), so a file copied or renamed to
another key's name is caught, and the block's prefix position, so the eviction
policy still knows a page's recompute cost after a restart.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from symram_vllm.keys import KEY_BYTES, BlockKey
from symram_vllm.tiers.aligned_io import align_up

MAGIC = b"SYMRAMPG"
VERSION = 1
HEADER_BYTES = 4096
CODEC_BYTES = 32

# magic, version, header block size, flags, chain, rank, position, payload length,
# payload crc32, codec name; then the header's own crc32 over those bytes.
_FIELDS = struct.Struct(f"<8sHHI{KEY_BYTES}sIIQI{CODEC_BYTES}s")
_CRC = struct.Struct("<I")
HEADER_USED = _FIELDS.size + _CRC.size


class PageCorrupt(ValueError):
    """A page failed verification; `reason` is a short slug used in quarantine names."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class PageHeader:
    key: BlockKey
    codec: str
    payload_len: int
    payload_crc: int
    position: int = 0

    @property
    def file_bytes(self) -> int:
        return HEADER_BYTES + align_up(self.payload_len)


def checksum(data: memoryview | bytes) -> int:
    return zlib.crc32(data)


def pack_header(header: PageHeader, out: memoryview) -> None:
    """Write `header` into the first HEADER_BYTES of `out` (the rest zeroed)."""
    codec = header.codec.encode()
    if len(codec) > CODEC_BYTES:
        raise ValueError(f"codec name longer than {CODEC_BYTES} bytes: {header.codec!r}")
    fields = _FIELDS.pack(
        MAGIC,
        VERSION,
        HEADER_BYTES,
        0,
        header.key.chain,
        header.key.rank,
        header.position,
        header.payload_len,
        header.payload_crc,
        codec,
    )
    out[:HEADER_BYTES] = bytes(HEADER_BYTES)
    out[: _FIELDS.size] = fields
    out[_FIELDS.size : HEADER_USED] = _CRC.pack(zlib.crc32(fields))


def unpack_header(block: memoryview | bytes) -> PageHeader:
    """Parse and check a header block. Raises PageCorrupt."""
    if len(block) < HEADER_USED:
        raise PageCorrupt("truncated", f"header needs {HEADER_USED} bytes, file has {len(block)}")
    fields = bytes(block[: _FIELDS.size])
    magic, version, hdr_size, _flags, chain, rank, position, length, crc, codec = _FIELDS.unpack(
        fields
    )
    if magic != MAGIC:
        raise PageCorrupt("bad-magic", f"not a symram page (magic {magic!r})")
    (stored_crc,) = _CRC.unpack(bytes(block[_FIELDS.size : HEADER_USED]))
    if zlib.crc32(fields) != stored_crc:
        raise PageCorrupt("header-checksum", "header bytes do not match their checksum")
    if version != VERSION or hdr_size != HEADER_BYTES:
        raise PageCorrupt("version", f"page format v{version}/{hdr_size}, expected v{VERSION}")
    return PageHeader(BlockKey(chain, rank), codec.rstrip(b"\0").decode(), length, crc, position)


def verify(header: PageHeader, expected: BlockKey, file_bytes: int) -> None:
    """Check that a parsed header belongs to `expected` and the file is long enough."""
    if header.key != expected:
        raise PageCorrupt("wrong-key", f"file holds {header.key.hex}, expected {expected.hex}")
    need = HEADER_BYTES + header.payload_len
    if file_bytes < need:
        raise PageCorrupt("truncated", f"need {need} bytes, file has {file_bytes}")


def verify_payload(header: PageHeader, payload: memoryview) -> None:
    if checksum(payload) != header.payload_crc:
        raise PageCorrupt("payload-checksum", f"payload of {header.key.hex} fails its CRC32")

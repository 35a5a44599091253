"""The disk tier's lossless zstd stage (``DiskTierConfig.compress = "zstd"``): pages are
compressed in the writer threads and decompressed on read; the header (version 2)
records the stored length and a ``+zstd`` codec; a page that does not shrink by at least
one 4 KiB block is stored raw (version 1, as with compression off). Corrupt compressed
pages are counted, quarantined misses, like any other corrupt page."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_disk_tier import FILE, PAGE, GatedIO, key, page

from symram_vllm.config import ConfigError, load_config
from symram_vllm.keys import BlockKey
from symram_vllm.tiers.aligned_io import ALIGN, AlignedBuffer, align_up
from symram_vllm.tiers.disk import DiskTier, DiskTierConfig
from symram_vllm.tiers.page_format import (
    HEADER_BYTES,
    VERSION,
    VERSION_STORED,
    PageCorrupt,
    PageHeader,
    checksum,
    pack_header,
    unpack_header,
    zstd_codec_name,
)

smooth = page  # compressible: a short period, like the exponent bytes of KV


def noise(i: int, size: int = PAGE) -> torch.Tensor:
    return torch.randint(0, 256, (size,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(i))


def make(path: Path, pages: int = 8, codec: str = "none", **cfg) -> DiskTier:
    cfg.setdefault("compress", "zstd")
    return DiskTier(path, pages * FILE, config=DiskTierConfig(**cfg), codec=codec)


def header_of(tier: DiskTier, k: BlockKey) -> PageHeader:
    return unpack_header(tier.path_of(k).read_bytes()[:HEADER_BYTES])


def test_compressed_page_roundtrip_and_header(tmp_path):
    tier = make(tmp_path, codec="int8")
    assert tier.set(key(1), smooth(1), position=7)
    path = tier.path_of(key(1))
    size = path.stat().st_size
    assert size % ALIGN == 0 and size < FILE  # still whole 4 KiB blocks: O_DIRECT reads
    header = header_of(tier, key(1))
    assert header.compressed and header.codec == "int8+zstd" and header.position == 7
    assert header.payload_len == PAGE  # the page the tiers above see
    raw = path.read_bytes()
    assert header.payload_crc == checksum(raw[HEADER_BYTES : HEADER_BYTES + header.stored_len])
    assert set(raw[HEADER_BYTES + header.stored_len :]) <= {0}
    entry = tier.entry(key(1))
    assert (entry.payload_len, entry.file_bytes, entry.codec) == (PAGE, size, "int8+zstd")
    assert torch.equal(tier.get(key(1)), smooth(1))
    stats = tier.stats()
    # Aligned writes and reads: O_DIRECT (where the filesystem has it) never fell back.
    assert stats.extra["direct_io_fallbacks"] == 0
    assert stats.bytes_used == size and stats.extra["zstd_pages"] == 1
    assert stats.extra["zstd_raw_bytes"] == PAGE
    assert stats.extra["zstd_stored_bytes"] == header.stored_len
    tier.close()


@pytest.mark.parametrize("aligned", [True, False])
def test_compressed_page_into_caller_buffer(tmp_path, aligned):
    tier = make(tmp_path)
    tier.set(key(0), smooth(0))
    out = (AlignedBuffer(PAGE + ALIGN).tensor[: PAGE + 10] if aligned
           else torch.empty(PAGE + 1, dtype=torch.uint8)[1:])
    got = tier.get(key(0), out=out)
    assert got.data_ptr() == out.data_ptr() and got.numel() == PAGE
    assert torch.equal(got, smooth(0))
    strided = torch.empty(2 * PAGE, dtype=torch.uint8)[::2]  # not contiguous: via a copy
    assert torch.equal(tier.get(key(0), out=strided), smooth(0))
    tier.close()


def test_incompressible_page_is_stored_raw(tmp_path):
    tier = make(tmp_path)
    tier.set(key(2), noise(2))
    header = header_of(tier, key(2))
    assert not header.compressed and header.codec == "none"
    assert tier.path_of(key(2)).read_bytes()[8:10] == VERSION.to_bytes(2, "little")
    assert tier.path_of(key(2)).stat().st_size == FILE
    assert torch.equal(tier.get(key(2)), noise(2))
    assert tier.stats().extra["zstd_incompressible"] == 1
    tier.close()


def test_pages_of_a_zstd_codec_are_not_compressed_twice(tmp_path):
    tier = make(tmp_path)
    tier.set(key(3), smooth(3, 10_000), codec="fp8+zstd:3")
    assert header_of(tier, key(3)).codec == "fp8+zstd:3"
    assert not header_of(tier, key(3)).compressed
    assert tier.stats().extra["zstd_pages"] == 0
    tier.close()


def test_compression_off_and_on_read_each_others_pages(tmp_path):
    plain = make(tmp_path, compress="none")
    plain.set(key(1), smooth(1))
    plain.close()
    packed = make(tmp_path)  # restart with compression: old raw pages still load
    packed.set(key(2), smooth(2))
    assert torch.equal(packed.get(key(1)), smooth(1))
    packed.close()
    for manifest in (True, False):  # index from the manifest, or from a header scan
        again = make(tmp_path, compress="none", manifest=manifest)
        assert again.stats().extra["quarantined"] == 0
        assert torch.equal(again.get(key(2)), smooth(2))
        assert torch.equal(again.get(key(1)), smooth(1))
        assert again.entry(key(2)).payload_len == PAGE
        again.close()


def test_flipped_byte_in_compressed_payload_is_a_quarantined_miss(tmp_path):
    tier = make(tmp_path)
    tier.set(key(4), smooth(4))
    path = tier.path_of(key(4))
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 100] ^= 0x10
    path.write_bytes(bytes(data))
    assert tier.get(key(4)) is None and not tier.exists(key(4))
    stats = tier.stats()
    assert stats.integrity_failures == 1 and stats.extra["quarantined"] == 1
    assert ".payload-checksum." in next((tmp_path / "quarantine").iterdir()).name
    tier.close()


def test_bad_frame_with_a_valid_crc_is_caught_by_zstd(tmp_path):
    """A page whose CRC matches garbage (a writer bug, not bit rot) still never decodes
    to wrong KV: zstd's own frame checks reject it."""
    tier = make(tmp_path)
    tier.set(key(5), smooth(5))
    path = tier.path_of(key(5))
    header = header_of(tier, key(5))
    frame = bytearray(path.read_bytes()[HEADER_BYTES : HEADER_BYTES + header.stored_len])
    frame[-2] ^= 0xFF  # inside zstd's content checksum
    forged = PageHeader(header.key, header.codec, header.payload_len, checksum(frame),
                        header.position, header.stored_len)
    buf = bytearray(header.file_bytes)
    pack_header(forged, memoryview(buf))
    buf[HEADER_BYTES : HEADER_BYTES + len(frame)] = frame
    path.write_bytes(bytes(buf))
    out = torch.zeros(PAGE, dtype=torch.uint8)
    assert tier.get(key(5), out=out) is None
    assert tier.stats().integrity_failures == 1
    assert ".zstd." in next((tmp_path / "quarantine").iterdir()).name
    tier.close()


def test_truncated_compressed_page_is_a_miss(tmp_path):
    tier = make(tmp_path)
    tier.set(key(6), smooth(6))
    path = tier.path_of(key(6))
    path.write_bytes(path.read_bytes()[: HEADER_BYTES + 20])
    assert tier.get(key(6)) is None
    assert tier.stats().integrity_failures == 1
    tier.close()


def test_raw_page_swapped_in_for_a_compressed_one_is_caught(tmp_path):
    """The index expects a compressed (shorter) file; a raw page of the same key put in
    its place (e.g. restored from an old copy) is rejected, not misread."""
    tier = make(tmp_path)
    tier.set(key(7), smooth(7))
    other = make(tmp_path / "other", compress="none")
    other.set(key(7), smooth(7))
    tier.path_of(key(7)).write_bytes(other.path_of(key(7)).read_bytes())
    other.close()
    assert tier.get(key(7)) is None and tier.stats().integrity_failures == 1
    tier.close()


def test_pending_page_reads_raw_bytes_while_compressed_write_is_in_flight(tmp_path):
    io = GatedIO()
    tier = DiskTier(tmp_path, 8 * FILE, config=DiskTierConfig(compress="zstd"), file_io=io)
    fut = tier.set_async(key(8), smooth(8))
    assert torch.equal(tier.get(key(8)), smooth(8))
    io.gate.set()
    assert fut.result(10)
    assert header_of(tier, key(8)).compressed
    assert torch.equal(tier.get(key(8)), smooth(8))
    tier.close()


def test_budget_counts_compressed_file_sizes(tmp_path):
    tier = make(tmp_path, pages=2)  # two raw pages' worth
    for i in range(6):
        assert tier.set(key(i), smooth(i))
    assert len(list(tier.keys())) == 6  # compressed pages fit where raw ones would not
    assert tier.stats().bytes_used <= 2 * FILE
    tier.close()


def test_header_versions():
    k = key(9)
    raw = PageHeader(k, "fp8", PAGE, 123, 4)
    buf = bytearray(HEADER_BYTES)
    pack_header(raw, memoryview(buf))
    assert buf[8:10] == VERSION.to_bytes(2, "little") and unpack_header(buf) == raw
    packed = PageHeader(k, zstd_codec_name("fp8"), PAGE, 456, 4, stored_len=5000)
    pack_header(packed, memoryview(buf))
    assert buf[8:10] == VERSION_STORED.to_bytes(2, "little")
    assert unpack_header(buf) == packed and packed.file_bytes == HEADER_BYTES + align_up(5000)
    assert zstd_codec_name("none") == "zstd"
    bigger = PageHeader(k, "fp8+zstd", PAGE, 1, 0, stored_len=PAGE)  # never written so
    pack_header(bigger, memoryview(buf))
    with pytest.raises(PageCorrupt):
        unpack_header(buf)


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("SYMRAM_DISK__COMPRESS", "zstd")
    monkeypatch.setenv("SYMRAM_DISK__ZSTD_LEVEL", "3")
    config = load_config()
    assert (config.disk.compress, config.disk.zstd_level) == ("zstd", 3)
    assert DiskTierConfig().compress == "none"
    with pytest.raises(ConfigError):
        load_config({"disk": {"compress": "zstd", "zstd_level": 0}})
    with pytest.raises(ConfigError):
        load_config({"disk": {"compress": "lz4"}})

import json

import pytest

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.snapshot import (
    ManifestEntry,
    ManifestError,
    _digest,
    read_manifest,
    write_manifest,
)


def entry(i: int, tier: str = "disk") -> ManifestEntry:
    key = BlockKey(i.to_bytes(32, "big"), rank=i % 2)
    return ManifestEntry(
        key=key.hex, tier=tier, file=f"{i:02x}/{key.hex}.page", length=1000 + i,
        checksum=f"crc32:{i:08x}", codec="none", position=i, file_bytes=8192,
    )


ENTRIES = [entry(1), entry(2, "dram"), entry(3), entry(4)]


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, ENTRIES, meta={"kind": "test"})
    return path


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def save(path, recs):
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in recs))


def test_roundtrip_and_stable_head(tmp_path, manifest):
    m = read_manifest(manifest)
    assert m.entries == ENTRIES and m.meta == {"kind": "test"}
    again = tmp_path / "again.jsonl"
    assert write_manifest(again, ENTRIES, meta={"kind": "test"}) == m.head
    assert write_manifest(again, ENTRIES[:3], meta={"kind": "test"}) != m.head
    assert not list(tmp_path.glob(".*.tmp"))  # written via a temp file + rename


def test_edited_entry_is_named(manifest):
    recs = records(manifest)
    recs[2]["entry"]["length"] += 1
    save(manifest, recs)
    with pytest.raises(ManifestError, match=r"entry 2 \(key 0+2\.r0\).*does not match") as err:
        read_manifest(manifest)
    assert err.value.index == 2 and err.value.key == ENTRIES[1].key


def test_edit_with_rehashed_record_breaks_the_next_link(manifest):
    recs = records(manifest)
    recs[2]["entry"]["tier"] = "disk"
    body = {k: v for k, v in recs[2].items() if k not in ("prev", "hash")}
    recs[2]["hash"] = _digest(recs[2]["prev"], body, None)  # a careful forger
    save(manifest, recs)
    with pytest.raises(ManifestError, match=r"entry 3 .*chain link broken"):
        read_manifest(manifest)


def test_removed_entry_breaks_the_chain(manifest):
    recs = records(manifest)
    del recs[2]
    save(manifest, recs)
    with pytest.raises(ManifestError, match=r"entry 3 \(key 0+3\.r1\).*chain link broken"):
        read_manifest(manifest)


def test_reordered_entries_break_the_chain(manifest):
    recs = records(manifest)
    recs[1], recs[2] = recs[2], recs[1]
    save(manifest, recs)
    with pytest.raises(ManifestError, match=r"entry 2 .*chain link broken"):
        read_manifest(manifest)


def test_truncated_manifest_is_refused(manifest):
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:-1]))  # end record cut off
    with pytest.raises(ManifestError, match="truncated"):
        read_manifest(manifest)


def test_records_after_end_are_refused(manifest):
    manifest.write_text(manifest.read_text() + manifest.read_text().splitlines()[1] + "\n")
    with pytest.raises(ManifestError):
        read_manifest(manifest)


def test_garbage_and_missing_files(tmp_path, manifest):
    recs = manifest.read_text().splitlines()
    recs[1] = recs[1][:-5]
    manifest.write_text("\n".join(recs) + "\n")
    with pytest.raises(ManifestError, match="entry 1: not a manifest record"):
        read_manifest(manifest)
    with pytest.raises(ManifestError, match="cannot read"):
        read_manifest(tmp_path / "nope.jsonl")


def test_secret_keys_the_chain(tmp_path):
    path = tmp_path / "keyed.jsonl"
    write_manifest(path, ENTRIES, secret=b"s3cret")
    assert read_manifest(path, secret=b"s3cret").entries == ENTRIES
    with pytest.raises(ManifestError, match="header"):
        read_manifest(path, secret=b"other")
    with pytest.raises(ManifestError, match="header"):
        read_manifest(path)  # no secret: cannot verify a keyed chain
    # A forger who rewrites the whole chain without the key is still caught.
    forged = tmp_path / "forged.jsonl"
    write_manifest(forged, [*ENTRIES, entry(9)])
    with pytest.raises(ManifestError):
        read_manifest(forged, secret=b"s3cret")
    long_secret = b"x" * 100  # longer than a BLAKE2b key: hashed down, still works
    write_manifest(path, ENTRIES, secret=long_secret)
    assert read_manifest(path, secret=long_secret).entries == ENTRIES

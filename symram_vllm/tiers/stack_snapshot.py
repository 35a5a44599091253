"""Warm restart of a tier stack: what its manifest lists, and what a restore trusts.

The pages themselves stay in the disk tier (the stack flushes DRAM first); the
manifest (``tiers/snapshot.py``) names each one with its checksum and whether it was
also DRAM-resident. A restore uses only pages the disk still holds unchanged: a page
that is gone or was rewritten since the snapshot is skipped, never trusted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.disk import DiskTier
from symram_vllm.tiers.disk_layout import relative_page_path
from symram_vllm.tiers.dram import DramTier
from symram_vllm.tiers.snapshot import (
    ManifestEntry,
    read_manifest,
    snapshot_secret,
    write_manifest,
)


def write_stack_manifest(
    path: str | Path, dram: DramTier, disk: DiskTier, secret: bytes | None
) -> Path:
    """A hash-chained manifest of what each tier holds (tier "dram" = resident in
    DRAM as well as on disk), signed with `secret` (default $SYMRAM_SNAPSHOT_KEY)."""
    entries = (
        ManifestEntry(
            key=key.hex,
            tier="dram" if dram.exists(key) else "disk",
            file=relative_page_path(key),
            length=entry.payload_len,
            checksum=_checksum(entry.checksum),
            codec=entry.codec,
            position=entry.position,
            file_bytes=entry.file_bytes,
        )
        for key, entry in disk.index_snapshot()
    )
    path = Path(path)
    write_manifest(path, entries, meta={"kind": "tier-stack"}, secret=secret or snapshot_secret())
    return path


def restorable_entries(
    path: str | Path, disk: DiskTier | None, secret: bytes | None
) -> Iterator[tuple[BlockKey, ManifestEntry]]:
    """The manifest's pages the disk still holds as they were snapshotted. Raises
    ``ManifestError`` on a broken chain (with a key, on an unsigned manifest)."""
    manifest = read_manifest(path, secret=secret or snapshot_secret())
    for item in manifest.entries:
        key = BlockKey.from_hex(item.key)
        entry = disk.entry(key) if disk is not None else None
        if entry is None or _checksum(entry.checksum) != item.checksum:
            continue  # gone or rewritten since the snapshot
        yield key, item


def _checksum(crc32: int) -> str:
    return f"crc32:{crc32:08x}"

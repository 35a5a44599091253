"""`symram snapshot` and `symram restore`: a tamper-evident manifest of a disk tier.

A disk tier path holds one tier per model signature and rank
(``<disk_path>/<signature>/rank<r>/``). ``snapshot`` indexes every one of them
(verifying page headers it has no manifest for) and writes one BLAKE2-chained
manifest naming each page, its key, length and checksum. ``restore`` refuses a
manifest whose chain is broken, checks every listed page against its file, and
installs the verified list as each tier's start-up manifest, so the next engine
start trusts it instead of rescanning: a fast, verified warm start.

Both work on stopped engines; a running engine holds its tier's lock, and the
commands say so instead of reading pages under a live writer.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from symram_vllm.snapshot import ManifestEntry, ManifestError, read_manifest, write_manifest

# The tier modules import torch: loaded when a command runs, not when `symram --help`
# builds its parser.

SNAPSHOT_FORMAT = "symram-disk-snapshot"


class SnapshotError(RuntimeError):
    """Why a snapshot or restore could not be done; the message says what to do."""


def tier_roots(disk_path: Path) -> list[Path]:
    """Every ``<signature>/rank<r>`` tier directory under a disk path."""
    if not disk_path.is_dir():
        raise SnapshotError(f"{disk_path} is not a directory; pass the engine's disk_path")
    roots = sorted(p for p in disk_path.glob("*/rank*") if (p / "pages").is_dir())
    if not roots:
        raise SnapshotError(
            f"no symram disk tier under {disk_path} (expected <signature>/rank<r>/pages); "
            "is this the disk_path the engine was started with?"
        )
    return roots


def snapshot(disk_path: Path, out: Path | None = None) -> tuple[Path, int]:
    """Write a manifest of every page under `disk_path`. Returns (path, entries)."""
    from symram_vllm.tiers.disk import DiskTier, DiskTierConfig, DiskTierLocked
    from symram_vllm.tiers.disk_layout import PAGE_SUFFIX

    disk_path = Path(disk_path)
    entries: list[ManifestEntry] = []
    config = DiskTierConfig(manifest=False)  # read-only use: leave start-up manifests alone
    for root in tier_roots(disk_path):
        try:
            tier = DiskTier(root, _budget(root), config=config)
        except DiskTierLocked as exc:
            raise SnapshotError(
                f"{exc}. Stop the engine first (it flushes DRAM to disk on the way out)."
            ) from exc
        try:
            prefix = root.relative_to(disk_path) / "pages"
            for key, entry in tier.index_snapshot():
                rel = f"{key.chain[:1].hex()}/{key.hex}{PAGE_SUFFIX}"
                entries.append(
                    ManifestEntry(
                        key=key.hex, tier="disk", file=f"{prefix}/{rel}",
                        length=entry.payload_len, checksum=f"crc32:{entry.checksum:08x}",
                        codec=entry.codec, position=entry.position, file_bytes=entry.file_bytes,
                    )
                )
        finally:
            tier.close()
    out = Path(out) if out else disk_path / f"snapshot-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    write_manifest(
        out, entries,
        meta={"kind": SNAPSHOT_FORMAT, "disk_path": str(disk_path.resolve()),
              "created": time.time()},
    )
    return out, len(entries)


def _budget(root: Path) -> int:
    from symram_vllm.tiers.disk_layout import PAGE_SUFFIX

    # Large enough never to evict what is there: a snapshot must not delete pages.
    used = sum(p.stat().st_size for p in (root / "pages").rglob(f"*{PAGE_SUFFIX}"))
    return max(used * 2, 1 << 30)


def restore(manifest_path: Path, disk_path: Path) -> dict[str, int]:
    """Verify a snapshot and install it as the start-up manifest of each tier.

    Raises ManifestError (tampered or truncated chain) or SnapshotError."""
    from symram_vllm.tiers.disk import DiskTier, DiskTierConfig, DiskTierLocked
    from symram_vllm.tiers.disk_layout import MANIFEST_NAME

    manifest = read_manifest(manifest_path)
    if manifest.meta.get("kind") != SNAPSHOT_FORMAT:
        raise SnapshotError(
            f"{manifest_path} is a symram manifest but not a disk snapshot "
            f"(kind {manifest.meta.get('kind')!r}); make one with `symram snapshot`"
        )
    disk_path = Path(disk_path)
    counts = {"verified": 0, "missing": 0, "changed": 0}
    per_root: dict[Path, list[ManifestEntry]] = {}
    for entry in tqdm(manifest.entries, desc="verifying pages", unit="page",
                      disable=len(manifest.entries) < 2000):
        parts = Path(entry.file).parts
        if len(parts) < 5 or parts[2] != "pages" or ".." in parts:
            raise SnapshotError(f"entry for {entry.key} names an odd file {entry.file!r}")
        root = disk_path / parts[0] / parts[1]
        page = disk_path / entry.file
        status = _check_page(page, entry)
        counts[status] += 1
        if status == "verified":
            per_root.setdefault(root, []).append(
                replace(entry, file=str(Path(*parts[3:])))
            )
    for root, entries in per_root.items():
        try:
            # Holding the lock proves no engine is running on this tier right now.
            tier_lock = DiskTier(root, _budget(root), config=DiskTierConfig(manifest=False))
        except DiskTierLocked as exc:
            raise SnapshotError(f"{exc}. Stop the engine before restoring.") from exc
        try:
            write_manifest(root / MANIFEST_NAME, entries, meta={"tier": "disk", "root": str(root)})
        finally:
            tier_lock.close()
    return counts


def _check_page(page: Path, entry: ManifestEntry) -> str:
    from symram_vllm.tiers.page_format import HEADER_BYTES, PageCorrupt, unpack_header

    try:
        with open(page, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = page.stat().st_size
    except OSError:
        return "missing"
    try:
        header = unpack_header(memoryview(raw))
    except (PageCorrupt, ValueError):
        return "changed"
    same = (
        header.key.hex == entry.key
        and header.payload_len == entry.length
        and f"crc32:{header.payload_crc:08x}" == entry.checksum
        and size == entry.file_bytes
    )
    return "verified" if same else "changed"


def _cmd_snapshot(args: argparse.Namespace) -> int:
    try:
        path, count = snapshot(args.disk_path, args.out)
    except SnapshotError as exc:
        print(f"symram snapshot: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}: {count} pages")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    try:
        counts = restore(args.manifest, args.disk_path)
    except ManifestError as exc:
        print(f"symram restore: refusing {args.manifest}: {exc}", file=sys.stderr)
        return 1
    except SnapshotError as exc:
        print(f"symram restore: {exc}", file=sys.stderr)
        return 1
    print(
        f"restored {counts['verified']} pages; {counts['missing']} missing and "
        f"{counts['changed']} changed since the snapshot (those will be recomputed)"
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    snap = sub.add_parser(
        "snapshot",
        help="write a tamper-evident manifest of a (stopped) engine's disk tier",
        description="Index every page under DISK_PATH (all models and ranks) and write a "
        "BLAKE2 hash-chained manifest of them. Run it with the engine stopped.",
    )
    snap.add_argument("--disk-path", type=Path, required=True, help="the engine's disk_path")
    snap.add_argument("--out", type=Path, help="manifest file (default DISK_PATH/snapshot-*.jsonl)")
    snap.set_defaults(func=_cmd_snapshot)
    rest = sub.add_parser(
        "restore",
        help="verify a snapshot and make the next engine start use it",
        description="Refuse a manifest whose hash chain is broken (edited, reordered, "
        "truncated); check every page it lists against its file; install the verified "
        "list so the next engine start indexes its disk tier from it.",
    )
    rest.add_argument("manifest", type=Path, help="a file written by `symram snapshot`")
    rest.add_argument("--disk-path", type=Path, required=True, help="the engine's disk_path")
    rest.set_defaults(func=_cmd_restore)

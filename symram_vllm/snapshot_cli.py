"""`symram snapshot` and `symram restore`: a tamper-evident manifest of a disk tier.

A disk tier path holds one tier per model signature and rank
(``<disk_path>/<signature>/rank<r>/``). ``snapshot`` indexes every one of them
(reading and checking each page header, never the payload, so sealed pages need no
key) and writes one BLAKE2-chained manifest naming each page, its key, length and
checksum. ``restore`` refuses a manifest whose chain is broken, checks every listed
page against its file, and installs the verified list as each tier's start-up
manifest, so the next engine start trusts it instead of rescanning: a fast, verified
warm start.

A manifest is input from outside, so restore trusts nothing it names: every entry
must be a page path of the layout (``<signature>/rank<r>/pages/<xx>/<key>.page``, the
name matching its key) that resolves, symlinks included, inside the disk path, and
only existing tier directories are touched. With a snapshot key ($SYMRAM_SNAPSHOT_KEY
or ``--key-file``) ``snapshot`` signs the chain with it and ``restore`` accepts only
manifests signed with it: without the key, a rewritten manifest cannot verify.

Both work on stopped engines; a running engine holds its tier's lock, and the
commands say so instead of reading pages under a live writer.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.aligned_io import AlignedBuffer, PosixFileIO
from symram_vllm.tiers.disk_housekeeping import DirectoryLock, DiskTierLocked
from symram_vllm.tiers.disk_layout import (
    MANIFEST_NAME,
    entry_of,
    key_from_name,
    read_header,
    relative_page_path,
    walk_pages,
)
from symram_vllm.tiers.page_format import HEADER_BYTES, PageCorrupt
from symram_vllm.tiers.snapshot import (
    SNAPSHOT_KEY_ENV,
    Manifest,
    ManifestEntry,
    ManifestError,
    read_manifest,
    snapshot_secret,
    write_manifest,
)

SNAPSHOT_FORMAT = "symram-disk-snapshot"
_TIER_DIR = re.compile(r"^rank\d+(\.\d+)?$")
_SIGNATURE_DIR = re.compile(r"^[0-9a-f]{16}$")


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


def _locked(root: Path, doing: str) -> DirectoryLock:
    """Hold `root`'s tier lock: proof that no engine is using it right now."""
    try:
        return DirectoryLock(root)
    except DiskTierLocked as exc:
        raise SnapshotError(f"{exc}. Stop the engine first, before {doing} (it flushes "
                            "DRAM to disk on the way out).") from exc


def snapshot(
    disk_path: Path, out: Path | None = None, *, secret: bytes | None = None
) -> tuple[Path, int]:
    """Write a manifest of every page under `disk_path`, signed with `secret` (default:
    $SYMRAM_SNAPSHOT_KEY) when there is one. Returns (path, entries). Read-only: a page
    whose header does not check is left out, not moved."""
    disk_path = Path(disk_path)
    secret = secret if secret is not None else snapshot_secret()
    entries: list[ManifestEntry] = []
    io, header_buf = PosixFileIO(False), AlignedBuffer(HEADER_BYTES)
    for root in tier_roots(disk_path):
        lock = _locked(root, "taking a snapshot")
        try:
            prefix = root.relative_to(disk_path) / "pages"
            found, _temps, _foreign = walk_pages(root / "pages")
            for f in sorted(found, key=lambda f: f.mtime):  # least recently written first
                key = key_from_name(f.path.name)
                if key is None:
                    continue
                try:
                    entry = entry_of(read_header(f, key, io, header_buf))
                except (PageCorrupt, OSError):
                    continue
                entries.append(ManifestEntry(
                    key=key.hex, tier="disk", file=f"{prefix}/{f.rel}",
                    length=entry.payload_len, checksum=f"crc32:{entry.checksum:08x}",
                    codec=entry.codec, position=entry.position, file_bytes=entry.file_bytes,
                ))
        finally:
            lock.release()
    out = Path(out) if out else disk_path / f"snapshot-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    write_manifest(
        out, entries,
        meta={"kind": SNAPSHOT_FORMAT, "disk_path": str(disk_path.resolve()),
              "created": time.time(), "signed": secret is not None},
        secret=secret,
    )
    return out, len(entries)


def _read_snapshot(manifest_path: Path, secret: bytes | None) -> Manifest:
    try:
        return read_manifest(manifest_path, secret=secret)
    except ManifestError as exc:
        if exc.index == 0 and "does not match its hash" in exc.reason:
            hint = (
                "it is not signed with this snapshot key (unsigned, or signed with "
                "another key)" if secret is not None else
                f"it may be signed with a snapshot key: set ${SNAPSHOT_KEY_ENV} or pass "
                "--key-file"
            )
            raise ManifestError(exc.path, 0, "", f"{exc.reason}; {hint}") from exc
        raise


def _tier_of(entry: ManifestEntry, disk_root: Path) -> tuple[Path, Path]:
    """(tier root, page path) of an entry, both resolved and inside `disk_root`.
    Raises SnapshotError for anything else: an absolute or escaping path, a symlink
    out, a name that is not the entry's key."""
    parts = Path(entry.file).parts
    odd = SnapshotError(
        f"entry for {entry.key} names the file {entry.file!r}, which is not a page path "
        "inside the disk path (<signature>/rank<r>/pages/<xx>/<key>.page); refusing the "
        "whole manifest"
    )
    if (len(parts) != 5 or Path(entry.file).is_absolute() or parts[2] != "pages"
            or not _SIGNATURE_DIR.match(parts[0]) or not _TIER_DIR.match(parts[1])):
        raise odd
    try:
        key = BlockKey.from_hex(entry.key)
    except ValueError:
        raise odd from None
    if "/".join(parts[3:]) != relative_page_path(key):
        raise odd
    root = (disk_root / parts[0] / parts[1]).resolve()
    page = (disk_root / entry.file).resolve()
    if not (root.is_relative_to(disk_root) and page.is_relative_to(root / "pages")):
        raise odd
    return root, page


def restore(
    manifest_path: Path, disk_path: Path, *, secret: bytes | None = None
) -> dict[str, int]:
    """Verify a snapshot and install it as the start-up manifest of each tier.

    With a snapshot key (`secret`, default $SYMRAM_SNAPSHOT_KEY) only a manifest signed
    with it is accepted, and the installed manifests are signed with it (the engine
    reads them with the same key). Raises ManifestError (tampered, truncated or
    unsigned chain) or SnapshotError (a path outside the disk path, a running engine)."""
    secret = secret if secret is not None else snapshot_secret()
    manifest = _read_snapshot(manifest_path, secret)
    if manifest.meta.get("kind") != SNAPSHOT_FORMAT:
        raise SnapshotError(
            f"{manifest_path} is a symram manifest but not a disk snapshot "
            f"(kind {manifest.meta.get('kind')!r}); make one with `symram snapshot`"
        )
    disk_root = Path(disk_path).resolve()
    if not disk_root.is_dir():
        raise SnapshotError(f"{disk_path} is not a directory; pass the engine's disk_path")
    located = [(entry, *_tier_of(entry, disk_root)) for entry in manifest.entries]
    counts = {"verified": 0, "missing": 0, "changed": 0}
    per_root: dict[Path, list[ManifestEntry]] = {}
    for entry, root, page in tqdm(located, desc="verifying pages", unit="page",
                                  disable=len(located) < 2000):
        status = _check_page(page, entry) if (root / "pages").is_dir() else "missing"
        counts[status] += 1
        if status == "verified":
            rel = str(Path(*Path(entry.file).parts[3:]))
            per_root.setdefault(root, []).append(replace(entry, file=rel))
    for root, entries in per_root.items():
        lock = _locked(root, "restoring")
        try:
            write_manifest(root / MANIFEST_NAME, entries,
                           meta={"tier": "disk", "root": str(root)}, secret=secret)
        finally:
            lock.release()
    return counts


def _check_page(page: Path, entry: ManifestEntry) -> str:
    from symram_vllm.tiers.page_format import unpack_header

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


def _key_file(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise SnapshotError(f"cannot read the snapshot key file {path}: {exc}") from exc
    if not key:
        raise SnapshotError(f"the snapshot key file {path} is empty")
    return key


def _cmd_snapshot(args: argparse.Namespace) -> int:
    try:
        path, count = snapshot(args.disk_path, args.out, secret=_key_file(args.key_file))
    except SnapshotError as exc:
        print(f"symram snapshot: {exc}", file=sys.stderr)
        return 1
    signed = args.key_file is not None or snapshot_secret() is not None
    print(f"wrote {path}: {count} pages" + (" (signed with the snapshot key)" if signed else ""))
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    try:
        counts = restore(args.manifest, args.disk_path, secret=_key_file(args.key_file))
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
    snap.add_argument("--key-file", type=Path,
                      help=f"sign with the key in this file (default: ${SNAPSHOT_KEY_ENV})")
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
    rest.add_argument("--key-file", type=Path,
                      help="accept only manifests signed with the key in this file "
                      f"(default: ${SNAPSHOT_KEY_ENV})")
    rest.set_defaults(func=_cmd_restore)

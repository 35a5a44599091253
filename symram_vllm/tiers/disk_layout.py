"""Where the disk tier keeps things, and how it rebuilds its index on start.

    <root>/.lock                 flock: one live DiskTier per directory
    <root>/manifest.jsonl        written on clean close, consumed on start
    <root>/pages/ab/<key>.page   one file per page, fanned out by the key's first byte
    <root>/quarantine/           pages that failed verification, kept for post-mortems

One file per page (not slabs): crash consistency is a rename, eviction an unlink,
quarantine a move, variable-size (zstd) pages need no allocator, and a restart
is a directory walk. docs/tiers.md has the benchmark behind this choice.

Every directory here is 0700 and every file 0600 (pages are the prompt in another
encoding); a start-up scan tightens page files left more open by older versions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.aligned_io import AlignedBuffer, FileIO
from symram_vllm.tiers.crypto import PageCipher
from symram_vllm.tiers.page_format import (
    HEADER_BYTES,
    PageCorrupt,
    PageHeader,
    check_readable,
    unpack_header,
    verify,
)
from symram_vllm.tiers.snapshot import ManifestEntry

logger = logging.getLogger(__name__)

PAGE_SUFFIX = ".page"
FILE_MODE = 0o600
DIR_MODE = 0o700
TMP_SUFFIX = ".tmp"
MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True, slots=True)
class DiskEntry:
    file_bytes: int
    payload_len: int
    checksum: int
    codec: str = "none"
    position: int = 0


def relative_page_path(key: BlockKey) -> str:
    return f"{key.chain[:1].hex()}/{key.hex}{PAGE_SUFFIX}"


def key_from_name(name: str) -> BlockKey | None:
    if not name.endswith(PAGE_SUFFIX):
        return None
    try:
        return BlockKey.from_hex(name[: -len(PAGE_SUFFIX)])
    except ValueError:
        return None


@dataclass
class FoundFile:
    path: Path
    rel: str
    size: int
    mtime: float
    mode: int = FILE_MODE


@dataclass
class ScanReport:
    entries: list[tuple[BlockKey, DiskEntry]]  # least recently used first
    corrupt: list[tuple[Path, PageCorrupt]]
    temp_removed: int = 0
    foreign: int = 0
    from_manifest: int = 0
    scanned: int = 0
    modes_tightened: int = 0


def walk_pages(pages_dir: Path) -> tuple[list[FoundFile], list[Path], int]:
    """Page files, leftover temp files, and the count of files that are neither."""
    pages: list[FoundFile] = []
    temps: list[Path] = []
    foreign = 0
    if not pages_dir.is_dir():
        return pages, temps, foreign
    for sub in os.scandir(pages_dir):
        if not sub.is_dir(follow_symlinks=False):
            continue
        for item in os.scandir(sub.path):
            if item.name.endswith(TMP_SUFFIX):
                temps.append(Path(item.path))
            elif item.name.endswith(PAGE_SUFFIX) and item.is_file(follow_symlinks=False):
                st = item.stat(follow_symlinks=False)
                rel = f"{sub.name}/{item.name}"
                pages.append(
                    FoundFile(Path(item.path), rel, st.st_size, st.st_mtime, st.st_mode)
                )
            else:
                foreign += 1
    return pages, temps, foreign


def rebuild_index(
    pages_dir: Path,
    io: FileIO,
    manifest: dict[str, ManifestEntry],
    progress_min_files: int,
    cipher: PageCipher | None = None,
) -> ScanReport:
    """Index every page under `pages_dir`.

    A page listed in a verified manifest with the same size is trusted without
    reading it (its checksum is still verified on every read); any other page has
    its header read and checked against its file name. Temp files are debris from
    writers that died mid-write: the directory lock guarantees no live writer owns
    them, so they are deleted. A scanned page that `cipher`'s policy cannot read
    (plaintext when encryption is required, sealed with no key or another key) is
    reported corrupt, for the caller to quarantine.
    """
    found, temps, foreign = walk_pages(pages_dir)
    report = ScanReport(entries=[], corrupt=[], foreign=foreign)
    for tmp in temps:
        try:
            tmp.unlink()
            report.temp_removed += 1
        except OSError as exc:
            logger.warning("cannot remove stale temp file %s: %s", tmp, exc)
    listed: list[tuple[int, BlockKey, DiskEntry]] = []
    scanned: list[tuple[float, BlockKey, DiskEntry]] = []
    order = {rel: i for i, rel in enumerate(manifest)}
    header_buf = AlignedBuffer(HEADER_BYTES)
    progress = tqdm(
        found, desc="symram disk index", unit="page", disable=len(found) < progress_min_files
    )
    for f in progress:
        report.modes_tightened += _tighten(f)
        key = key_from_name(f.path.name)
        if key is None:
            report.corrupt.append((f.path, PageCorrupt("bad-name", f"{f.rel} is not a key")))
            continue
        listed_entry = manifest.get(f.rel)
        if listed_entry is not None and listed_entry.file_bytes == f.size:
            entry = DiskEntry(
                listed_entry.file_bytes,
                listed_entry.length,
                int(listed_entry.checksum.split(":", 1)[1], 16),
                listed_entry.codec,
                listed_entry.position,
            )
            listed.append((order[f.rel], key, entry))
            report.from_manifest += 1
            continue
        try:
            header = read_header(f, key, io, header_buf)
            check_readable(header, cipher)
            entry = entry_of(header)
        except PageCorrupt as exc:
            report.corrupt.append((f.path, exc))
            continue
        except OSError as exc:
            logger.warning("cannot read %s while indexing: %s", f.path, exc)
            continue
        scanned.append((f.mtime, key, entry))
        report.scanned += 1
    # Unknown recency (scanned) ranks as older than anything the manifest ordered.
    scanned.sort(key=lambda t: t[0])
    listed.sort(key=lambda t: t[0])
    report.entries = [(k, e) for _, k, e in scanned] + [(k, e) for _, k, e in listed]
    return report


def _tighten(f: FoundFile) -> int:
    """chmod 600 a page file that group or others could read (written by an older
    version); 1 if changed. Best effort: a file we do not own stays as it is."""
    if not f.mode & 0o077:
        return 0
    try:
        os.chmod(f.path, FILE_MODE)
    except OSError as exc:
        logger.warning("cannot make %s private (chmod 600): %s", f.path, exc)
        return 0
    return 1


def read_header(f: FoundFile, key: BlockKey, io: FileIO, header_buf: AlignedBuffer) -> PageHeader:
    """`f`'s header, checked against its name and size (not against any key policy:
    ``symram snapshot`` indexes sealed pages without holding the key). Raises
    PageCorrupt."""
    n = io.read_into(f.path, [header_buf.view(HEADER_BYTES)])
    if n < HEADER_BYTES:
        raise PageCorrupt("truncated", f"{f.rel}: {n} bytes, shorter than a header")
    header = unpack_header(header_buf.view(HEADER_BYTES))
    verify(header, key, f.size)
    return header


def entry_of(header: PageHeader) -> DiskEntry:
    return DiskEntry(
        header.file_bytes, header.payload_len, header.payload_crc, header.codec, header.position
    )


def manifest_entries(
    index: Iterator[tuple[BlockKey, DiskEntry]], tier: str = "disk"
) -> Iterator[ManifestEntry]:
    for key, entry in index:
        yield ManifestEntry(
            key=key.hex,
            tier=tier,
            file=relative_page_path(key),
            length=entry.payload_len,
            checksum=f"crc32:{entry.checksum:08x}",
            codec=entry.codec,
            position=entry.position,
            file_bytes=entry.file_bytes,
        )


def rank_directory(base: Path, namespace: bytes, rank: int) -> Path:
    """One disk tier per model signature and rank: ranks never share a directory (each
    holds its own lock), and pages of another model or codec are never in the way."""
    return Path(base) / namespace.hex()[:16] / f"rank{rank}"


def stored_keys(root: Path) -> list[BlockKey]:
    """Keys whose page files exist under a disk tier root, by name only (no reads).

    For a process that must not open the tier (it is locked by its owner) but wants to
    know what it holds, e.g. the scheduler at start-up. A page that later fails its
    checksum is a miss for the owner, which then reports the failure."""
    found, _temps, _foreign = walk_pages(Path(root) / "pages")
    return [key for f in found if (key := key_from_name(f.path.name)) is not None]


# -- several engines on one disk_path -------------------------------------------------------
# Engines that share a disk_path each own one *slot* per rank: ``rank<r>`` for the first,
# ``rank<r>.<n>`` for the others. An owner holds its slot's lock and is its only writer;
# the others read its pages read-only (``tiers/peer_disk.py``). A restarted engine takes
# the first free slot, so warm restarts still find their pages (in their own slot or a
# peer's).
MAX_SLOTS = 16
STORE_ID_NAME = ".symram-store-id"


def slot_directory(base: Path, namespace: bytes, rank: int, slot: int) -> Path:
    root = rank_directory(base, namespace, rank)
    return root if slot == 0 else root.with_name(f"{root.name}.{slot}")


def rank_slot_directories(base: Path, namespace: bytes, rank: int) -> list[Path]:
    """Every existing slot directory of `rank` (slot 0 first)."""
    first = rank_directory(base, namespace, rank)
    parent = first.parent
    if not parent.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for item in os.scandir(parent):
        name = item.name
        if name == first.name:
            slot = 0
        elif name.startswith(first.name + ".") and name[len(first.name) + 1 :].isdigit():
            slot = int(name[len(first.name) + 1 :])
        else:
            continue
        if item.is_dir(follow_symlinks=False):
            found.append((slot, Path(item.path)))
    return [p for _, p in sorted(found)]


def store_id(base: Path) -> str | None:
    """A random id naming the storage behind `base`, created by the first engine.

    Engines that see the same id see the same files (one shared filesystem), so they
    may read each other's disk pages; an engine on another machine with its own disk at
    the same path gets another id. None when the directory can be neither read nor
    created (the disk tier then stays private)."""
    path = Path(base) / STORE_ID_NAME
    for _ in range(2):
        try:
            text = path.read_text().strip()
            if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
                return text
            if text:
                return None  # not ours: do not guess
        except FileNotFoundError:
            pass
        except OSError:
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{STORE_ID_NAME}.{os.urandom(8).hex()}{TMP_SUFFIX}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(16).hex())
            try:
                os.link(tmp, path)  # atomic, and never replaces another engine's id
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        except OSError:
            return None
    return None

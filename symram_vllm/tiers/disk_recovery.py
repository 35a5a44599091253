"""The disk tier's index on open: from the manifest of a clean close, else a scan.

A manifest is trusted only if its hash chain verifies (``snapshot.py``), and it is
consumed: deleted before any page is served, so a process that dies later leaves no
stale list for the next start. Listed or not, every file is checked against its
header (``disk_layout.rebuild_index``); what fails is handed to the tier to count and
quarantine, and pages past a smaller budget than the last run's are evicted at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.aligned_io import FileIO
from symram_vllm.tiers.crypto import PageCipher
from symram_vllm.tiers.disk_config import DiskTierConfig
from symram_vllm.tiers.disk_housekeeping import empty_trash
from symram_vllm.tiers.disk_index import DiskIndex
from symram_vllm.tiers.disk_layout import MANIFEST_NAME, rebuild_index
from symram_vllm.tiers.page_format import PageCorrupt
from symram_vllm.tiers.snapshot import ManifestEntry, ManifestError, read_manifest, snapshot_secret

logger = logging.getLogger(__name__)


def take_manifest(root: Path, index: DiskIndex) -> dict[str, ManifestEntry]:
    """The disk pages a verified manifest lists, by file; the manifest is deleted."""
    listed: dict[str, ManifestEntry] = {}
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.exists():
        return listed
    try:
        manifest = read_manifest(manifest_path, secret=snapshot_secret())
        listed = {e.file: e for e in manifest.entries if e.tier == "disk"}
    except ManifestError as exc:
        index.count("manifest_rejected")
        logger.error("ignoring disk manifest, rescanning pages: %s", exc)
    # Consumed: if this process dies, the next start must not trust a stale list.
    with contextlib.suppress(OSError):
        manifest_path.unlink()
    return listed


def restore_index(
    index: DiskIndex,
    root: Path,
    io: FileIO,
    config: DiskTierConfig,
    cipher: PageCipher | None,
    condemn: Callable[[Path, PageCorrupt], None],
    evicted: Callable[[list[BlockKey]], None],
) -> None:
    """Fill `index` from what is on disk. `condemn` gets each page that fails its checks,
    `evicted` the pages evicted to fit the budget."""
    start = time.perf_counter()
    listed = take_manifest(root, index) if config.manifest else {}
    report = rebuild_index(index.files.pages_dir, io, listed, config.progress_min_files, cipher)
    index.count("modes_tightened", report.modes_tightened)
    for path, problem in report.corrupt:
        condemn(path, problem)
    with index.lock:
        for key, entry in report.entries:
            index.add_locked(key, entry)
        trash: list[Path] = []
        victims = index.make_room_locked(0, trash)
    empty_trash(trash)
    evicted(victims or [])
    index.count("temp_files_removed", report.temp_removed)
    index.count("pages_scanned", report.scanned)
    index.count("pages_from_manifest", report.from_manifest)
    index.count("foreign_files", report.foreign)
    if report.entries or report.corrupt or report.temp_removed:
        logger.info(
            "disk tier %s: %d pages indexed (%d from manifest) in %.2fs; %d quarantined, "
            "%d temp files removed", root, len(report.entries), report.from_manifest,
            time.perf_counter() - start, len(report.corrupt), report.temp_removed,
        )

"""Filesystem chores of the disk tier: the directory lock, the quarantine, quiet unlinks,
private directories, page file names and cheap detaching of doomed files."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import stat
import time
from pathlib import Path

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.disk_layout import TMP_SUFFIX, relative_page_path
from symram_vllm.tiers.page_format import PageCorrupt

logger = logging.getLogger(__name__)


class DiskTierLocked(RuntimeError):
    """Another live DiskTier (in this or another process) owns the directory."""


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES):
            logger.warning("cannot remove %s: %s", path, exc)


def private_dir(path: Path) -> bool:
    """``mkdir -p`` where every directory created is 0700, and `path` itself tightened
    to 0700 if it exists with group or other bits (a directory from an older version).
    True if `path`'s mode was tightened. Raises OSError if it cannot be created."""
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue  # another engine made it first
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return False
    try:
        os.chmod(path, mode & 0o700)
    except OSError as exc:
        logger.warning("disk tier: cannot make %s private (chmod 700): %s", path, exc)
        return False
    return True


class DirectoryLock:
    """An exclusive flock on ``<root>/.lock``, held for the tier's lifetime.

    One owner per directory is what lets a starting tier delete every temp file it
    finds (no live writer can own one) and trust its index. The kernel drops the
    lock when the holder dies, so a SIGKILLed engine never leaves it stale.
    """

    def __init__(self, root: Path) -> None:
        self._fd: int | None = None
        path = root / ".lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            try:  # read-only filesystem: lock the existing file if there is one
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return  # nothing to lock on: a tier here cannot write anyway
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DiskTierLocked(
                f"{root} is in use by another symram disk tier (pid {holder or '?'}); "
                "give each engine or TP rank its own directory"
            ) from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


class Quarantine:
    """Pages that failed verification, moved aside (never served, kept for post-mortems),
    at most `max_files` of them, newest kept."""

    def __init__(self, directory: Path, max_files: int) -> None:
        self.directory = directory
        self.max_files = max_files

    def admit(self, path: Path, problem: PageCorrupt) -> bool:
        """Move `path` in; if it cannot be moved, delete it. True if moved."""
        logger.warning("disk tier: quarantining %s (%s)", path, problem)
        target = self.directory / f"{path.name}.{problem.reason}.{time.time_ns()}"
        try:
            os.replace(path, target)
        except OSError as exc:
            # Missing dir, cross-device, read-only: the page must still leave the index's
            # namespace, so a later scan cannot pick it up again.
            logger.warning("cannot quarantine %s (%s); deleting it", path, exc)
            unlink_quietly(path)
            return False
        self._trim()
        return True

    def _trim(self) -> None:
        try:
            kept = sorted(self.directory.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        except OSError:
            return
        for old in kept[: max(0, len(kept) - self.max_files)]:
            unlink_quietly(old)


class PageFiles:
    """The names of page files under ``pages/``, and taking one out of the namespace.

    A temp name carries the pid and a per-tier sequence number, so no two writers (or
    a writer and an eviction) ever share one; the next start deletes any left behind.
    """

    def __init__(self, pages_dir: Path) -> None:
        self.pages_dir = pages_dir
        self._seq = itertools.count()

    def path_of(self, key: BlockKey) -> Path:
        return self.pages_dir / relative_page_path(key)

    def temp_beside(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.{os.getpid()}.{next(self._seq)}{TMP_SUFFIX}")

    def detach(self, key: BlockKey, trash: list[Path]) -> None:
        """Take `key`'s file out of the namespace, cheaply (callers hold the tier's lock).

        Unlinking frees blocks, which can take milliseconds (``discard`` mounts
        issue a TRIM): that happens after the lock is released (`empty_trash`). A
        rename first, so a new write of the same key cannot be the file that gets
        unlinked; a crash in between leaves a temp file, which the next start deletes.
        """
        path = self.path_of(key)
        doomed = self.temp_beside(path)
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        except OSError:
            unlink_quietly(path)  # read-only or odd filesystem: best effort, in place
            return
        trash.append(doomed)


def empty_trash(trash: list[Path]) -> None:
    for path in trash:
        unlink_quietly(path)

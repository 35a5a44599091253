"""Manifests of what the tiers hold, for warm restart; hash-chained with BLAKE2b.

A manifest is JSON lines: a header record, one record per page, an end record.
Every record carries ``prev`` (the previous record's hash) and ``hash`` =
BLAKE2b(prev || canonical JSON of the record's body). Editing, dropping,
inserting or reordering any record, or cutting the file short, breaks the chain at
the first record touched, and :func:`read_manifest` names that record.

Without a secret the chain is tamper-*evident* against partial edits and
corruption (anyone can recompute a whole new chain). With ``secret`` (keyed
BLAKE2b, e.g. from $SYMRAM_SNAPSHOT_KEY) it is a MAC chain: a forger without the
key cannot produce a manifest that verifies. ``snapshot_secret`` reads that key;
whoever holds it signs and accepts only manifests keyed with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SNAPSHOT_KEY_ENV = "SYMRAM_SNAPSHOT_KEY"
FORMAT = "symram-manifest"
VERSION = 1
_PERSON = b"symram-manifest"
_GENESIS = "0" * 64


@dataclass(frozen=True)
class ManifestEntry:
    key: str  # BlockKey.hex
    tier: str  # "dram" or "disk": where the page was resident
    file: str  # path relative to the disk tier root ("" when not on disk)
    length: int  # payload bytes
    checksum: str  # "crc32:xxxxxxxx" of the payload
    codec: str = "none"
    position: int = 0  # block index in its prefix (drives recompute cost)
    file_bytes: int = 0  # on-disk size including header and padding


@dataclass
class Manifest:
    meta: dict[str, Any]
    entries: list[ManifestEntry] = field(default_factory=list)
    head: str = _GENESIS  # hash of the end record: one value that pins the whole file


class ManifestError(ValueError):
    """The manifest is unreadable or its chain is broken; names the first bad record."""

    def __init__(self, path: Path, index: int, key: str, reason: str) -> None:
        where = "header" if index == 0 else f"entry {index}" + (f" (key {key})" if key else "")
        super().__init__(f"manifest {path} rejected at {where}: {reason}")
        self.path = path
        self.index = index
        self.key = key
        self.reason = reason


def snapshot_secret() -> bytes | None:
    """The snapshot key from $SYMRAM_SNAPSHOT_KEY, or None when it is not set."""
    value = os.environ.get(SNAPSHOT_KEY_ENV)
    return value.encode() if value else None


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _digest(prev: str, body: dict[str, Any], secret: bytes | None) -> str:
    key = b"" if secret is None else secret
    if len(key) > 64:  # BLAKE2b keys are at most 64 bytes
        key = hashlib.blake2b(key, digest_size=64).digest()
    h = hashlib.blake2b(digest_size=32, key=key, person=_PERSON)
    h.update(bytes.fromhex(prev))
    h.update(_canonical(body))
    return h.hexdigest()


def write_manifest(
    path: str | Path,
    entries: Iterable[ManifestEntry],
    *,
    meta: dict[str, Any] | None = None,
    secret: bytes | None = None,
) -> str:
    """Write atomically (temp file, fsync, rename). Returns the head hash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    prev = _GENESIS
    count = 0
    try:
        # 0600 like the pages it lists (their keys say which prefixes are cached).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            header = {"format": FORMAT, "version": VERSION, "meta": meta or {}}
            prev = _emit(f, {"header": header}, prev, secret)
            for entry in entries:
                count += 1
                prev = _emit(f, {"i": count, "entry": asdict(entry)}, prev, secret)
            prev = _emit(f, {"end": {"count": count}}, prev, secret)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return prev


def _emit(f: Any, body: dict[str, Any], prev: str, secret: bytes | None) -> str:
    digest = _digest(prev, body, secret)
    f.write(json.dumps({**body, "prev": prev, "hash": digest}, separators=(",", ":")) + "\n")
    return digest


def read_manifest(path: str | Path, *, secret: bytes | None = None) -> Manifest:
    """Read and verify a manifest. Raises ManifestError naming the first bad record."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, 0, "", f"cannot read: {exc}") from exc
    prev = _GENESIS
    manifest: Manifest | None = None
    for index, line in enumerate(lines):
        key, number = "", index
        try:
            record = json.loads(line)
            body = {k: v for k, v in record.items() if k not in ("prev", "hash")}
            key = str(body.get("entry", {}).get("key", ""))
            # Name a record by its own number, so a removed entry is reported at the
            # entry that lost its predecessor, not at a shifted line count.
            number = body["i"] if isinstance(body.get("i"), int) else index
            stored_prev, stored_hash = record["prev"], record["hash"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(path, number, key, f"not a manifest record ({exc})") from exc
        if stored_prev != prev:
            raise ManifestError(
                path, number, key,
                "chain link broken: a record before it was removed, inserted or reordered",
            )
        if _digest(prev, body, secret) != stored_hash:
            raise ManifestError(
                path, number, key, "record does not match its hash (edited, or wrong secret)"
            )
        prev = stored_hash
        manifest = _apply(path, manifest, index, key, body)
        if "end" in body:
            if index != len(lines) - 1:
                raise ManifestError(path, index + 1, "", "records after the end record")
            manifest.head = prev
            return manifest
    raise ManifestError(
        path, len(lines), "", "no end record: the manifest was cut short (truncated)"
    )


def _apply(
    path: Path, manifest: Manifest | None, index: int, key: str, body: dict[str, Any]
) -> Manifest:
    if manifest is None:
        header = body.get("header")
        if index != 0 or not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ManifestError(path, 0, "", "missing symram manifest header")
        if header.get("version") != VERSION:
            version = header.get("version")
            raise ManifestError(path, 0, "", f"unsupported manifest version {version}")
        return Manifest(meta=dict(header.get("meta", {})))
    if "entry" in body:
        if body.get("i") != len(manifest.entries) + 1:
            raise ManifestError(path, index, key, f"entry number {body.get('i')} out of sequence")
        try:
            manifest.entries.append(ManifestEntry(**body["entry"]))
        except TypeError as exc:
            raise ManifestError(path, index, key, f"malformed entry ({exc})") from exc
        return manifest
    if "end" in body:
        count = body["end"].get("count")
        if count != len(manifest.entries):
            raise ManifestError(
                path, index, "", f"end record counts {count} entries, found {len(manifest.entries)}"
            )
        return manifest
    raise ManifestError(path, index, key, "unknown record type")

"""symram snapshot / restore on real disk-tier files, through the CLI, including the
audit's attacks on restore (paths outside the disk path, rewritten manifests)."""

from __future__ import annotations

import json

import pytest
import torch

from symram_vllm.cli import main
from symram_vllm.keys import BlockKey
from symram_vllm.snapshot_cli import SNAPSHOT_FORMAT
from symram_vllm.tiers.crypto import PageCipher
from symram_vllm.tiers.disk import DiskTier
from symram_vllm.tiers.disk_layout import MANIFEST_NAME, rank_directory, relative_page_path
from symram_vllm.tiers.snapshot import ManifestEntry, ManifestError, read_manifest, write_manifest


def fill(disk_path, namespace: bytes, rank: int, n: int) -> dict[BlockKey, torch.Tensor]:
    tier = DiskTier(rank_directory(disk_path, namespace, rank), 1 << 24)
    pages = {}
    for i in range(n):
        key = BlockKey(bytes([i + 1]) * 32, rank)
        pages[key] = torch.full((8192,), i, dtype=torch.uint8)
        assert tier.set(key, pages[key])
    tier.close()
    return pages


def test_snapshot_then_restore_installs_verified_manifests(tmp_path, capsys):
    disk = tmp_path / "disk"
    pages = fill(disk, b"\x01" * 32, 0, 5)
    fill(disk, b"\x01" * 32, 1, 3)
    out = tmp_path / "snap.jsonl"
    assert main(["snapshot", "--disk-path", str(disk), "--out", str(out)]) == 0
    assert "8 pages" in capsys.readouterr().out
    # After the snapshot one page is rewritten with other bytes and one disappears.
    root0 = rank_directory(disk, b"\x01" * 32, 0)
    rewritten, gone = list(pages)[:2]
    tier = DiskTier(root0, 1 << 24)
    assert tier.delete(rewritten)
    assert tier.set(rewritten, torch.full((8192,), 99, dtype=torch.uint8))
    tier.close()
    (root0 / "pages" / gone.chain[:1].hex() / f"{gone.hex}.page").unlink()
    for root in (root0, rank_directory(disk, b"\x01" * 32, 1)):
        (root / MANIFEST_NAME).unlink(missing_ok=True)
    assert main(["restore", str(out), "--disk-path", str(disk)]) == 0
    text = capsys.readouterr().out
    assert "restored 6 pages; 1 missing and 1 changed" in text
    installed = (root0 / MANIFEST_NAME).read_text().splitlines()
    assert len(installed) == 2 + 3  # header, end, and the three pages that still verify
    restarted = DiskTier(root0, 1 << 24)
    try:
        assert restarted.stats().extra["pages_from_manifest"] == 3
    finally:
        restarted.close()


def test_restore_refuses_a_tampered_manifest(tmp_path, capsys):
    disk = tmp_path / "disk"
    fill(disk, b"\x02" * 32, 0, 4)
    out = tmp_path / "snap.jsonl"
    assert main(["snapshot", "--disk-path", str(disk), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    record = json.loads(lines[2])
    record["entry"]["length"] += 1
    lines[2] = json.dumps(record, separators=(",", ":"))
    out.write_text("\n".join(lines) + "\n")
    assert main(["restore", str(out), "--disk-path", str(disk)]) == 1
    err = capsys.readouterr().err
    assert "refusing" in err and "entry 2" in err and "does not match its hash" in err


def test_snapshot_names_a_locked_tier_and_a_wrong_path(tmp_path, capsys):
    disk = tmp_path / "disk"
    fill(disk, b"\x03" * 32, 0, 1)
    live = DiskTier(rank_directory(disk, b"\x03" * 32, 0), 1 << 24)
    try:
        assert main(["snapshot", "--disk-path", str(disk)]) == 1
        assert "Stop the engine first" in capsys.readouterr().err
    finally:
        live.close()
    assert main(["snapshot", "--disk-path", str(tmp_path / "nowhere")]) == 1
    assert "not a directory" in capsys.readouterr().err


# -- the audit's attacks on restore --------------------------------------------------------------
def forged_snapshot(path, files: list[str], key: BlockKey, secret: bytes | None = None) -> None:
    """A manifest an attacker wrote from scratch (the format is public)."""
    entries = [
        ManifestEntry(key=key.hex, tier="disk", file=f, length=8192, checksum="crc32:00000000",
                      file_bytes=4096 + 8192)
        for f in files
    ]
    write_manifest(path, entries, meta={"kind": SNAPSHOT_FORMAT}, secret=secret)


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink", "other-name"])
def test_restore_refuses_paths_outside_the_disk_path(tmp_path, capsys, where):
    """The audit's manifest entry `/mnt/pages/<xx>/<key>.page` made restore create
    `.lock`, `manifest.jsonl` and `quarantine/` in /mnt. Now the whole manifest is
    refused and nothing is created outside the disk path."""
    disk, outside = tmp_path / "disk", tmp_path / "mnt"
    pages = fill(disk, b"\x04" * 32, 0, 1)
    key = next(iter(pages))
    sig = rank_directory(disk, b"\x04" * 32, 0).parent.name
    rel = relative_page_path(key)
    (outside / "pages" / rel).parent.mkdir(parents=True)
    (outside / "pages" / rel).write_bytes(b"x")
    before = sorted(outside.rglob("*"))
    files = {
        "absolute": f"{outside}/pages/{rel}",
        "dotdot": f"{sig}/rank0/pages/../../../mnt/pages/{rel}",
        "symlink": f"{sig}/rank1/pages/{rel}",
        "other-name": f"{sig}/rank0/pages/{rel.split('/')[0]}/other.page",
    }
    if where == "symlink":
        (disk / sig / "rank1").symlink_to(outside)
    manifest = tmp_path / "evil.jsonl"
    forged_snapshot(manifest, [files[where]], key)
    assert main(["restore", str(manifest), "--disk-path", str(disk)]) == 1
    err = capsys.readouterr().err
    assert "not a page path inside the disk path" in err and key.hex in err
    assert sorted(outside.rglob("*")) == before


def test_with_a_snapshot_key_only_signed_manifests_are_accepted(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SYMRAM_SNAPSHOT_KEY", "operator secret")
    disk = tmp_path / "disk"
    pages = fill(disk, b"\x05" * 32, 0, 3)
    out = tmp_path / "snap.jsonl"
    assert main(["snapshot", "--disk-path", str(disk), "--out", str(out)]) == 0
    assert "signed with the snapshot key" in capsys.readouterr().out
    with pytest.raises(ManifestError):
        read_manifest(out)  # keyed: nobody without the key can verify or rewrite it
    # A completely rewritten manifest (valid chain, no key) is refused...
    root = rank_directory(disk, b"\x05" * 32, 0)
    (root / MANIFEST_NAME).unlink()  # the tier's own, from its last close
    sig = root.parent.name
    forged = tmp_path / "rewritten.jsonl"
    forged_snapshot(forged, [f"{sig}/rank0/pages/{relative_page_path(k)}" for k in pages],
                    next(iter(pages)))
    assert main(["restore", str(forged), "--disk-path", str(disk)]) == 1
    assert "not signed with this snapshot key" in capsys.readouterr().err
    assert not (root / MANIFEST_NAME).exists()
    # ...the signed one is installed, signed, and the engine (same key) starts from it.
    assert main(["restore", str(out), "--disk-path", str(disk)]) == 0
    assert "restored 3 pages" in capsys.readouterr().out
    assert len(read_manifest(root / MANIFEST_NAME, secret=b"operator secret").entries) == 3
    restarted = DiskTier(root, 1 << 24)
    try:
        assert restarted.stats().extra["pages_from_manifest"] == 3
    finally:
        restarted.close()


def test_key_file_signs_and_restore_without_the_key_says_so(tmp_path, capsys):
    disk = tmp_path / "disk"
    fill(disk, b"\x06" * 32, 0, 2)
    key_file = tmp_path / "snapshot.key"
    key_file.write_text("another secret\n")
    out = tmp_path / "snap.jsonl"
    assert main(["snapshot", "--disk-path", str(disk), "--out", str(out),
                 "--key-file", str(key_file)]) == 0
    assert read_manifest(out, secret=b"another secret").meta["signed"] is True
    capsys.readouterr()
    assert main(["restore", str(out), "--disk-path", str(disk)]) == 1
    assert "SYMRAM_SNAPSHOT_KEY" in capsys.readouterr().err
    assert main(["restore", str(out), "--disk-path", str(disk), "--key-file",
                 str(key_file)]) == 0
    assert main(["restore", str(out), "--disk-path", str(disk), "--key-file",
                 str(tmp_path / "none")]) == 1
    assert "cannot read the snapshot key file" in capsys.readouterr().err


def test_snapshot_indexes_sealed_pages_without_the_encryption_key(tmp_path, capsys):
    disk = tmp_path / "disk"
    root = rank_directory(disk, b"\x07" * 32, 0)
    cipher = PageCipher(bytes(range(32)), b"\x07" * 32, required=True)
    tier = DiskTier(root, 1 << 24, cipher=cipher)
    for i in range(2):
        tier.set(BlockKey(bytes([i + 1]) * 32), torch.full((8192,), i, dtype=torch.uint8))
    tier.close()
    (root / MANIFEST_NAME).unlink()
    out = tmp_path / "snap.jsonl"
    assert main(["snapshot", "--disk-path", str(disk), "--out", str(out)]) == 0
    assert "2 pages" in capsys.readouterr().out
    assert not list((root / "quarantine").iterdir())  # read-only: nothing moved
    assert main(["restore", str(out), "--disk-path", str(disk)]) == 0
    tier = DiskTier(root, 1 << 24, cipher=cipher)
    try:
        assert tier.stats().extra["pages_from_manifest"] == 2
        assert torch.equal(tier.get(BlockKey(b"\x02" * 32)), torch.full((8192,), 1,
                                                                          dtype=torch.uint8))
    finally:
        tier.close()

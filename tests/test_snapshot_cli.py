"""symram snapshot / restore on real disk-tier files, through the CLI."""

from __future__ import annotations

import json

import torch

from symram_vllm.cli import main
from symram_vllm.keys import BlockKey
from symram_vllm.tiers.disk import DiskTier
from symram_vllm.tiers.disk_layout import MANIFEST_NAME, rank_directory


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

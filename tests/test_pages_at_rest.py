"""Pages at rest: the audit's attacks rerun against the disk tier, peer-disk reads and
the Redis page tier, plus the key settings and the file modes.

The audit recovered a tenant's prompt from one page by matching layer-0 V against the
public weights: V = W_v · embedding(token) does not depend on the position (RoPE touches
Q and K only), so every token's V row is a fixed, public byte string. `recover` is that
attack on a synthetic table: it finds each row of the table in a blob of bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import stat
from pathlib import Path

import pytest
import redis
import torch
from at_rest import MASTER_KEY, NAMESPACE, OTHER_KEY
from test_connector_halves import SIG, kv_caches
from test_peer_sharing import KEYS, disk_config, load, save, worker

from symram_vllm.connectors.worker_tiers import open_disk_tier
from symram_vllm.keys import BlockKey
from symram_vllm.tiers.crypto import EncryptionConfigError, PageCipher, page_cipher
from symram_vllm.tiers.disk import DiskTier, DiskTierConfig
from symram_vllm.tiers.disk_layout import MANIFEST_NAME
from symram_vllm.tiers.page_format import (
    HEADER_BYTES,
    PageHeader,
    checksum,
    pack_header,
    unpack_header,
)
from symram_vllm.tiers.peer_disk import PeerDiskReader
from symram_vllm.tiers.redis_tier import RedisPageTier, pack_page

pytestmark = pytest.mark.timeout(120)

VOCAB, DIM = 1024, 64  # a row is one token's layer-0 V for one head: 128 bytes of bf16
_gen = torch.Generator().manual_seed(1234)
WEIGHTS = torch.randn(VOCAB, DIM, generator=_gen).to(torch.bfloat16)  # public
PROMPT = torch.randint(0, VOCAB, (384,), generator=_gen)  # a tenant's secret prompt
OTHER_PROMPT = torch.randint(0, VOCAB, (384,), generator=_gen)


def kv_page(tokens: torch.Tensor) -> torch.Tensor:
    """The V rows of `tokens` as one flat uint8 page (what a tier stores)."""
    return WEIGHTS[tokens].contiguous().view(torch.uint8).reshape(-1)


def recover(blob: bytes) -> list[int]:
    """The audit's attack: every token whose V row appears in `blob`, in order."""
    rows = {WEIGHTS[t].contiguous().view(torch.uint8).numpy().tobytes(): t for t in range(VOCAB)}
    width = DIM * 2
    found, offset = [], 0
    while offset + width <= len(blob):
        token = rows.get(blob[offset : offset + width])
        if token is None:
            offset += 1
        else:
            found.append(token)
            offset += width
    return found


def bkey(i: int) -> BlockKey:
    return BlockKey(bytes([i]) * 32)


def sealed(required: bool = False, key: bytes = MASTER_KEY, ns: bytes = NAMESPACE) -> PageCipher:
    return PageCipher(key, ns, required=required)


def tier(path: Path, cipher: PageCipher | None, **cfg) -> DiskTier:
    return DiskTier(path, 1 << 24, config=DiskTierConfig(**cfg), cipher=cipher)


def quarantined(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "quarantine").iterdir())


# -- prompt recovery ---------------------------------------------------------------------------
def test_prompt_is_recovered_from_a_plaintext_page_file(tmp_path):
    """The attack itself works on this synthetic model (so a 0 below means something)."""
    plain = tier(tmp_path, None)
    plain.set(bkey(1), kv_page(PROMPT))
    assert recover(plain.path_of(bkey(1)).read_bytes()) == PROMPT.tolist()
    plain.close()


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_no_prompt_token_is_recovered_from_a_sealed_page_file(tmp_path, compress):
    disk = tier(tmp_path, sealed(), compress=compress)
    page = kv_page(PROMPT)
    assert disk.set(bkey(1), page)
    blob = disk.path_of(bkey(1)).read_bytes()
    assert recover(blob) == []
    plaintext = page.numpy().tobytes()
    assert all(plaintext[i : i + 16] not in blob for i in range(0, len(plaintext), 16))
    assert torch.equal(disk.get(bkey(1)), page)  # and the owner still reads it
    disk.close()


def test_no_prompt_token_is_recovered_from_a_sealed_redis_value(redis_server):
    raw = redis.Redis.from_url(redis_server.url)
    plain = RedisPageTier(redis_server.url, namespace=SIG, capacity_bytes=1 << 24)
    secure = RedisPageTier(redis_server.url, namespace=SIG + b"x", capacity_bytes=1 << 24,
                           cipher=sealed())
    try:
        page = kv_page(PROMPT).numpy()
        assert plain.set(bkey(1), page) and secure.set(bkey(1), page)
        assert recover(raw.get(plain.keys.page(bkey(1)))) == PROMPT.tolist()  # the audit
        value = raw.get(secure.keys.page(bkey(1)))
        assert recover(value) == []
        assert page.tobytes()[:64] not in value
        assert secure.get(bkey(1)) == page.tobytes()
    finally:
        plain.close()
        secure.close()
        raw.close()


# -- forged pages ------------------------------------------------------------------------------
def forge_disk(disk: DiskTier, victim: BlockKey, donor: BlockKey) -> None:
    """The audit's forgery: the donor's page re-headed as the victim's, checksums
    recomputed, written under the victim's name."""
    raw = bytearray(disk.path_of(donor).read_bytes())
    header = unpack_header(bytes(raw[:HEADER_BYTES]))
    forged = dataclasses.replace(header, key=victim)
    if header.seal is None:
        stored = raw[HEADER_BYTES : HEADER_BYTES + header.stored_bytes]
        forged = dataclasses.replace(forged, payload_crc=checksum(bytes(stored)))
    pack_header(forged, memoryview(raw))
    disk.path_of(victim).write_bytes(bytes(raw))


def test_forged_page_is_served_without_encryption(tmp_path):
    """Mode off, or optional without a key: the forgery works (docs/security.md)."""
    disk = tier(tmp_path, None)
    disk.set(bkey(1), kv_page(PROMPT))
    disk.set(bkey(2), kv_page(OTHER_PROMPT))
    forge_disk(disk, bkey(1), bkey(2))
    assert torch.equal(disk.get(bkey(1)), kv_page(OTHER_PROMPT))
    disk.close()


@pytest.mark.parametrize("required", [False, True])
def test_forged_sealed_page_is_a_counted_quarantined_miss(tmp_path, required):
    disk = tier(tmp_path, sealed(required))
    disk.set(bkey(1), kv_page(PROMPT))
    disk.set(bkey(2), kv_page(OTHER_PROMPT))
    forge_disk(disk, bkey(1), bkey(2))
    assert disk.get(bkey(1)) is None
    stats = disk.stats()
    assert stats.integrity_failures == 1 and stats.extra["auth_failures"] == 1
    assert stats.extra["quarantined"] == 1 and ".auth." in quarantined(tmp_path)[0]
    assert not disk.exists(bkey(1))
    assert torch.equal(disk.get(bkey(2)), kv_page(OTHER_PROMPT))
    assert disk.set(bkey(1), kv_page(PROMPT))  # recomputed and saved again
    assert torch.equal(disk.get(bkey(1)), kv_page(PROMPT))
    disk.close()


def test_sealed_page_with_an_edited_position_does_not_open(tmp_path):
    disk = tier(tmp_path, sealed())
    disk.set(bkey(1), kv_page(PROMPT), position=3)
    raw = bytearray(disk.path_of(bkey(1)).read_bytes())
    pack_header(dataclasses.replace(unpack_header(bytes(raw[:HEADER_BYTES])), position=0),
                memoryview(raw))
    disk.path_of(bkey(1)).write_bytes(bytes(raw))
    assert disk.get(bkey(1)) is None and disk.stats().extra["auth_failures"] == 1
    disk.close()


def plaintext_forgery(disk: DiskTier, victim: BlockKey, page: torch.Tensor) -> None:
    """A page an attacker writes from scratch: a valid plaintext (v1) page."""
    data = page.numpy().tobytes()
    header = PageHeader(victim, "none", len(data), checksum(data))
    buf = bytearray(HEADER_BYTES + len(data))
    pack_header(header, memoryview(buf))
    buf[HEADER_BYTES:] = data
    disk.path_of(victim).write_bytes(bytes(buf))


def test_plaintext_forgery_is_refused_when_encryption_is_required(tmp_path):
    disk = tier(tmp_path, sealed(required=True))
    disk.set(bkey(1), kv_page(PROMPT))
    plaintext_forgery(disk, bkey(1), kv_page(OTHER_PROMPT))
    assert disk.get(bkey(1)) is None
    extra = disk.stats().extra
    assert extra["plaintext_rejected"] == 1 and ".plaintext." in quarantined(tmp_path)[0]
    disk.close()
    # Planted while the engine was down: refused by the start-up scan as well.
    disk = tier(tmp_path, sealed(required=True), manifest=False)
    disk.set(bkey(1), kv_page(PROMPT))
    disk.close()
    plaintext_forgery(disk, bkey(1), kv_page(OTHER_PROMPT))
    disk = tier(tmp_path, sealed(required=True))
    assert not disk.exists(bkey(1)) and disk.stats().extra["plaintext_rejected"] == 1
    disk.close()


def test_forged_page_through_the_worker_is_a_load_error_not_a_hit(tmp_path):
    """End to end through the connector's worker half, encryption required: the forged
    page (another block's KV, re-headed) is reported as a load error, so vLLM
    recomputes, and the destination block is left untouched."""
    settings = {"encryption": "required", "encryption_key": MASTER_KEY.hex()}
    a = worker(disk_config(tmp_path, **settings), kv_caches(0))
    save(a, [1, 2], KEYS[:2])
    a.store.flush()
    disk = a.store.disk
    assert unpack_header(disk.path_of(BlockKey(KEYS[0])).read_bytes()[:HEADER_BYTES]).sealed
    a.shutdown()
    owner = tier(disk.root, sealed(True, ns=SIG))  # the attacker's edit, tier closed
    forge_disk(owner, BlockKey(KEYS[0]), BlockKey(KEYS[1]))
    owner.close()
    kv_b = kv_caches(1)
    b = worker(disk_config(tmp_path, **settings), kv_b)  # same slot: its own disk tier
    try:
        before = kv_b["layer0"][5].clone()
        assert load(b, "r", [5, 6], KEYS[:2]) == {5, 6}  # block 2 follows a failed block 1
        assert torch.equal(kv_b["layer0"][5], before)
        assert b.store.disk.stats().extra["auth_failures"] == 1
    finally:
        b.shutdown()


def test_forged_redis_values_are_rejected_and_deleted(redis_server):
    raw = redis.Redis.from_url(redis_server.url)
    secure = RedisPageTier(redis_server.url, namespace=SIG, capacity_bytes=1 << 24,
                           cipher=sealed(required=True))
    plain = RedisPageTier(redis_server.url, namespace=SIG, capacity_bytes=1 << 24)
    try:
        secure.set(bkey(1), kv_page(PROMPT).numpy())
        secure.set(bkey(2), kv_page(OTHER_PROMPT).numpy())
        # 1. the donor's sealed value re-headed as the victim's
        value = bytearray(raw.get(secure.keys.page(bkey(2))))
        value[12:44] = bkey(1).chain
        raw.set(secure.keys.page(bkey(1)), bytes(value))
        assert secure.get(bkey(1)) is None
        assert not raw.exists(secure.keys.page(bkey(1)))
        # 2. a plaintext value with a recomputed digest: what the audit served as a hit
        forged = pack_page(bkey(1), memoryview(kv_page(OTHER_PROMPT).numpy()))
        raw.set(secure.keys.page(bkey(1)), forged)
        assert plain.get(bkey(1)) == kv_page(OTHER_PROMPT).numpy().tobytes()  # no key: served
        assert secure.get(bkey(1)) is None
        extra = secure.stats().extra
        assert extra["auth_failures"] == 1 and extra["plaintext_rejected"] == 1
        assert secure.stats().integrity_failures == 2
        assert secure.counters()["integrity_failures"] == 2  # what the worker reports
        assert secure.get(bkey(2)) == kv_page(OTHER_PROMPT).numpy().tobytes()
    finally:
        secure.close()
        plain.close()
        raw.close()


def test_redis_value_under_another_key_is_a_miss_left_in_place(redis_server):
    a = RedisPageTier(redis_server.url, namespace=SIG, capacity_bytes=1 << 24, cipher=sealed())
    b = RedisPageTier(redis_server.url, namespace=SIG, capacity_bytes=1 << 24,
                      cipher=sealed(key=OTHER_KEY))
    try:
        a.set(bkey(1), kv_page(PROMPT).numpy())
        assert b.get(bkey(1)) is None and b.stats().extra["other_key_pages"] == 1
        assert a.get(bkey(1)) == kv_page(PROMPT).numpy().tobytes()
    finally:
        a.close()
        b.close()


# -- peer-disk reads ---------------------------------------------------------------------------
def test_peer_reads_sealed_pages_and_rejects_forged_ones(tmp_path):
    owner_root = tmp_path / NAMESPACE.hex()[:16] / "rank0"
    owner = tier(owner_root, sealed(), compress="zstd")
    page = torch.zeros(64 * 1024, dtype=torch.uint8)  # compressible: sealed zstd frame
    page[:384 * 128] = kv_page(PROMPT)
    owner.set(bkey(1), page)
    owner.set(bkey(2), kv_page(OTHER_PROMPT))
    reader = PeerDiskReader(tmp_path, NAMESPACE, 0, own_root=None, cipher=sealed(True))
    out = torch.empty(page.numel(), dtype=torch.uint8)
    assert reader.read_into(bkey(1), out) and torch.equal(out, page)
    forge_disk(owner, bkey(1), bkey(2))
    assert not reader.read_into(bkey(1), torch.empty(kv_page(PROMPT).numel(), dtype=torch.uint8))
    assert reader.stats()["auth_failures"] == 1
    keyless = PeerDiskReader(tmp_path, NAMESPACE, 0, own_root=None)
    assert not keyless.read_into(bkey(2), torch.empty(kv_page(PROMPT).numel(), dtype=torch.uint8))
    assert keyless.stats()["integrity_failures"] == 1  # sealed, and no key here
    owner.close()


# -- modes and keys ----------------------------------------------------------------------------
def test_optional_reads_old_plaintext_pages_and_seals_new_ones(tmp_path):
    before = tier(tmp_path, None)
    before.set(bkey(1), kv_page(PROMPT))
    before.close()
    disk = tier(tmp_path, sealed())
    assert torch.equal(disk.get(bkey(1)), kv_page(PROMPT))
    disk.set(bkey(2), kv_page(OTHER_PROMPT))
    assert unpack_header(disk.path_of(bkey(2)).read_bytes()[:HEADER_BYTES]).sealed
    disk.close()
    disk = tier(tmp_path, sealed(required=True))  # now required: the old page goes
    assert disk.get(bkey(1)) is None and torch.equal(disk.get(bkey(2)), kv_page(OTHER_PROMPT))
    disk.close()


@pytest.mark.parametrize(("cipher", "reason"), [
    (sealed(key=OTHER_KEY), "key-id"),
    (None, "no-key"),
    (sealed(ns=b"another model".ljust(32, b"\0")), "auth"),
])
def test_sealed_page_read_under_another_key_or_model_is_a_miss(tmp_path, cipher, reason):
    disk = tier(tmp_path, sealed())
    disk.set(bkey(1), kv_page(PROMPT))
    disk.close()
    disk = tier(tmp_path, cipher)
    assert disk.get(bkey(1)) is None
    assert f".{reason}." in quarantined(tmp_path)[0]
    disk.close()


def test_required_without_a_key_refuses_to_start(tmp_path):
    with pytest.raises(EncryptionConfigError, match="encryption_key_file"):
        page_cipher("required", None, None, NAMESPACE)
    config = disk_config(tmp_path, encryption="required")
    with pytest.raises(EncryptionConfigError, match="SYMRAM_ENCRYPTION_KEY"):
        open_disk_tier(config, SIG, 0)
    assert page_cipher("optional", None, None, NAMESPACE) is None
    assert page_cipher("off", None, MASTER_KEY.hex(), NAMESPACE) is None


def test_key_formats_and_bad_keys(tmp_path):
    want = sealed().key_id
    for text in (MASTER_KEY.hex(), base64.b64encode(MASTER_KEY).decode()):
        assert page_cipher("required", None, text, NAMESPACE).key_id == want
    key_file = tmp_path / "key"
    key_file.write_bytes(MASTER_KEY)
    key_file.chmod(0o600)
    assert page_cipher("required", key_file, "ignored", NAMESPACE).key_id == want
    key_file.write_text(MASTER_KEY.hex() + "\n")
    assert page_cipher("optional", key_file, None, NAMESPACE).key_id == want
    with pytest.raises(EncryptionConfigError, match="SYMRAM_ENCRYPTION_KEY"):
        page_cipher("optional", None, "too short", NAMESPACE)
    with pytest.raises(EncryptionConfigError, match=str(tmp_path / "missing")):
        page_cipher("optional", tmp_path / "missing", None, NAMESPACE)
    assert sealed().key_id != sealed(key=OTHER_KEY).key_id
    assert MASTER_KEY.hex() not in repr(disk_config(tmp_path, encryption_key=MASTER_KEY.hex()))


# -- file modes --------------------------------------------------------------------------------
def modes(root: Path) -> tuple[set[int], set[int]]:
    dirs, files = {stat.S_IMODE(root.stat().st_mode)}, set()
    for path in root.rglob("*"):
        (dirs if path.is_dir() else files).add(stat.S_IMODE(path.stat().st_mode))
    return dirs, files


@pytest.mark.parametrize("encrypted", [False, True])
def test_files_are_0600_in_0700_directories(tmp_path, encrypted):
    old = os.umask(0o022)
    try:
        config = disk_config(
            tmp_path / "base", **({"encryption_key": MASTER_KEY.hex()} if encrypted else {})
        )
        disk = open_disk_tier(config, SIG, 0)
        for i in range(3):
            disk.set(bkey(i), kv_page(PROMPT))
        disk.path_of(bkey(0)).write_bytes(b"junk")  # quarantined on read
        assert disk.get(bkey(0)) is None
        disk.close()
        assert (disk.root / MANIFEST_NAME).exists() and quarantined(disk.root)
        dirs, files = modes(disk.root.parent)  # <disk_path>/<signature>/rank0/...
        assert dirs == {0o700} and files == {0o600}
    finally:
        os.umask(old)


def test_modes_left_open_by_older_versions_are_tightened(tmp_path):
    disk = tier(tmp_path, None)
    disk.set(bkey(1), kv_page(PROMPT))
    disk.close()
    for path in [tmp_path, *tmp_path.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    disk = tier(tmp_path, None, manifest=False)
    for path in (tmp_path, tmp_path / "pages", tmp_path / "quarantine"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE(disk.path_of(bkey(1)).stat().st_mode) == 0o600
    assert disk.stats().extra["modes_tightened"] >= 4
    disk.close()

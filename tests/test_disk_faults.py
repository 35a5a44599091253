"""Fault tests on real files: corruption, truncation, renames, full and read-only
filesystems, and writers killed mid-write. Each asserts the counters that moved and
that the tier keeps serving its good pages. Every test runs with plaintext pages and
with pages sealed by AES-256-GCM (tests/at_rest.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from at_rest import MODES, cipher_for, set_mode_env

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.crypto import PageCipher
from symram_vllm.tiers.disk import DiskTier, DiskTierConfig
from symram_vllm.tiers.page_format import HEADER_BYTES

PAGE = 64 * 1024
FILE = HEADER_BYTES + PAGE
REPO = Path(__file__).resolve().parent.parent
CIPHER: PageCipher | None = None  # set per test by `at_rest`

# The same helpers as below, for the subprocess scripts.
HELPERS = """
import sys, torch
sys.path.insert(0, "tests")
from at_rest import script_cipher
from symram_vllm.keys import BlockKey
CIPHER = script_cipher()
PAGE = 64 * 1024
def key(i):
    return BlockKey(i.to_bytes(32, "big"))
def page(i, size=PAGE):
    return ((torch.arange(size, dtype=torch.int64) * (i + 3) + i) % 251).to(torch.uint8)
"""


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(32, "big"))


def page(i: int, size: int = PAGE) -> torch.Tensor:
    return ((torch.arange(size, dtype=torch.int64) * (i + 3) + i) % 251).to(torch.uint8)


@pytest.fixture(autouse=True, params=MODES)
def at_rest(request, monkeypatch) -> str:
    monkeypatch.setattr(sys.modules[__name__], "CIPHER", cipher_for(request.param))
    set_mode_env(monkeypatch, request.param)
    return request.param


def make(path: Path, pages: int = 16, clock=time.monotonic, **cfg) -> DiskTier:
    return DiskTier(
        path, pages * FILE, clock=clock, config=DiskTierConfig(**cfg), cipher=CIPHER
    )


def filled(path: Path, n: int = 3, **cfg) -> DiskTier:
    tier = make(path, **cfg)
    for i in range(n):
        assert tier.set(key(i), page(i))
    return tier


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def quarantined(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "quarantine").iterdir())


def assert_still_serving(tier: DiskTier, good: list[int]) -> None:
    for i in good:
        assert torch.equal(tier.get(key(i)), page(i)), f"page {i} lost"
    assert tier.set(key(100), page(100)) and torch.equal(tier.get(key(100)), page(100))


def run_script(body: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    code = HELPERS + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout, check=False,
    )


# -- corruption --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("offset", "reason"),
    [(HEADER_BYTES + 1234, "payload-checksum"), (60, "header-checksum"), (0, "bad-magic")],
)
def test_flipped_byte_is_a_counted_quarantined_miss(tmp_path, offset, reason, at_rest):
    if reason == "payload-checksum" and at_rest == "sealed":
        reason = "auth"  # the GCM tag, not a CRC32, guards a sealed payload
    tier = filled(tmp_path)
    flip_byte(tier.path_of(key(1)), offset)
    assert tier.get(key(1)) is None
    stats = tier.stats()
    assert stats.integrity_failures == 1 and stats.extra["quarantined"] == 1
    assert stats.misses == 1 and stats.pages == 2 and stats.bytes_used == 2 * FILE
    assert not tier.exists(key(1)) and not tier.path_of(key(1)).exists()
    [name] = quarantined(tmp_path)
    assert name.startswith(key(1).hex) and f".{reason}." in name
    assert_still_serving(tier, [0, 2])
    assert tier.set(key(1), page(1)) and torch.equal(tier.get(key(1)), page(1))  # re-saved
    tier.close()


def test_flipped_byte_into_caller_buffer_is_not_returned(tmp_path):
    tier = filled(tmp_path)
    flip_byte(tier.path_of(key(0)), HEADER_BYTES + 5)
    out = torch.empty(PAGE, dtype=torch.uint8)
    assert tier.get(key(0), out=out) is None
    assert tier.stats().integrity_failures == 1
    tier.close()


def test_truncated_page_is_a_miss(tmp_path):
    tier = filled(tmp_path)
    os.truncate(tier.path_of(key(2)), HEADER_BYTES + 100)
    assert tier.get(key(2)) is None
    assert tier.stats().integrity_failures == 1
    assert ".truncated." in quarantined(tmp_path)[0]
    assert_still_serving(tier, [0, 1])
    tier.close()


def test_truncated_page_found_at_restart(tmp_path):
    tier = filled(tmp_path)
    tier.close()
    os.truncate(tier.path_of(key(0)), HEADER_BYTES // 2)  # not even a whole header
    os.truncate(tier.path_of(key(1)), HEADER_BYTES + 10)
    tier = make(tmp_path)  # the manifest's size check sends both to a header check
    stats = tier.stats()
    assert stats.integrity_failures == 2 and stats.pages == 1
    assert stats.extra["pages_from_manifest"] == 1 and stats.extra["quarantined"] == 2
    assert_still_serving(tier, [2])
    tier.close()


def test_page_renamed_over_another_key(tmp_path):
    tier = filled(tmp_path)
    os.replace(tier.path_of(key(0)), tier.path_of(key(1)))  # key 1's name, key 0's bytes
    assert tier.get(key(1)) is None  # wrong key: never served as key 1
    assert tier.get(key(0)) is None  # its file is gone
    stats = tier.stats()
    assert stats.integrity_failures == 1 and stats.extra["vanished_files"] == 1
    assert ".wrong-key." in quarantined(tmp_path)[0]
    assert_still_serving(tier, [2])
    tier.close()


def test_page_renamed_to_a_new_key_found_at_restart(tmp_path):
    tier = filled(tmp_path)
    tier.close()
    stray = tier.path_of(key(50))
    stray.parent.mkdir(exist_ok=True)
    os.replace(tier.path_of(key(0)), stray)
    tier = make(tmp_path)
    assert not tier.exists(key(50)) and not tier.exists(key(0))
    stats = tier.stats()
    assert stats.integrity_failures == 1 and stats.pages == 2
    assert ".wrong-key." in quarantined(tmp_path)[0]
    assert_still_serving(tier, [1, 2])
    tier.close()


def test_quarantine_is_bounded(tmp_path):
    tier = filled(tmp_path, n=4, quarantine_max_files=2)
    for i in range(4):
        flip_byte(tier.path_of(key(i)), HEADER_BYTES)
        assert tier.get(key(i)) is None
    assert len(quarantined(tmp_path)) == 2
    assert tier.stats().integrity_failures == 4
    tier.close()


# -- full and unwritable filesystems ----------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs: a filesystem that really fills up. Needs root (CI runs as root)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_filesystem_stops_writes_keeps_reads_and_resumes(small_tmpfs):
    now = [0.0]
    tier = make(small_tmpfs, pages=64, clock=lambda: now[0], retry_backoff_s=10)
    stored = 0
    while tier.set(key(stored), page(stored)):
        stored += 1
        assert stored < 64, "a 1 MiB filesystem cannot hold 64 pages"
    stats = tier.stats()
    assert stored >= 3
    assert stats.extra["writes_disabled"] == 1 and stats.extra["write_errors"] == 1
    assert not list((small_tmpfs / "pages").rglob("*.tmp"))  # failed temp file removed
    for i in range(stored):  # reads keep working
        assert torch.equal(tier.get(key(i)), page(i))
    assert not tier.set(key(200), page(200))  # gate closed: declined without trying
    assert tier.stats().extra["write_errors"] == 1
    for i in range(3):  # space comes back...
        tier.delete(key(i))
    assert not tier.set(key(201), page(201))  # ...but only the back-off reopens writes
    now[0] += 10
    assert tier.set(key(202), page(202))
    stats = tier.stats()
    assert stats.extra["writes_disabled"] == 0 and torch.equal(tier.get(key(202)), page(202))
    tier.close()


def test_file_size_limit_in_subprocess(tmp_path):
    """RLIMIT_FSIZE makes writes fail with EFBIG without root; same degradation path."""
    result = run_script(
        """
        import json, resource, sys
        from symram_vllm.tiers.disk import DiskTier, DiskTierConfig
        now = [0.0]
        tier = DiskTier(sys.argv[1], 1 << 24, clock=lambda: now[0],
                        config=DiskTierConfig(retry_backoff_s=1), cipher=CIPHER)
        out = {"small": tier.set(key(0), page(0, 1000))}
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, hard))
        out["big"] = tier.set(key(1), page(1))
        out["after_fail"] = tier.stats().extra
        out["read"] = bool(torch.equal(tier.get(key(0)), page(0, 1000)))
        out["while_closed"] = tier.set(key(2), page(2))
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        now[0] += 1.5
        out["resumed"] = tier.set(key(3), page(3))
        out["read_resumed"] = bool(torch.equal(tier.get(key(3)), page(3)))
        out["final"] = tier.stats().extra
        tier.close()
        print(json.dumps(out))
        """,
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["small"] and not out["big"] and out["read"] and not out["while_closed"]
    assert out["after_fail"]["writes_disabled"] == 1 and out["after_fail"]["write_errors"] == 1
    assert "writes disabled" in result.stderr  # the logged warning
    assert out["resumed"] and out["read_resumed"]
    assert out["final"]["writes_disabled"] == 0 and out["final"]["write_errors"] == 1


def test_read_only_filesystem_serves_reads(small_tmpfs):
    tier = filled(small_tmpfs)
    tier.close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    try:
        tier = make(small_tmpfs)
        assert all(torch.equal(tier.get(key(i)), page(i)) for i in range(3))
        assert not tier.set(key(9), page(9))
        stats = tier.stats()
        assert stats.extra["writes_disabled"] == 1 and stats.extra["write_errors"] == 1
        tier.close()
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)


def test_unwritable_directory_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    tier = make(blocker / "tier")  # mkdir fails (ENOTDIR) even for root
    assert tier.stats().extra["writes_disabled"] == 1
    assert not tier.set(key(0), page(0)) and tier.get(key(0)) is None
    tier.close()


# -- writers killed mid-write --------------------------------------------------------------
TORN_WRITER = """
import os, sys, time
from symram_vllm.tiers.disk import DiskTier
tier = DiskTier(sys.argv[1], 1 << 24, cipher=CIPHER)
for i in range(5):
    tier.set(key(i), page(i))

def torn_write(path, buf, fsync):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, bytes(buf[: len(buf) // 2]))
    os.fsync(fd)
    print("MID", path, flush=True)
    time.sleep(60)

tier.io.write_new = torn_write
tier.set(key(5), page(5))
"""


def test_sigkill_mid_write_never_leaves_a_readable_torn_page(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HELPERS + TORN_WRITER, str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("MID"), proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait()
    [tmp] = list((tmp_path / "pages").rglob("*.tmp"))
    assert tmp == Path(line.split()[1])
    # Worst case beyond SIGKILL: a crash that persisted a rename before the data
    # leaves the torn bytes under the page's own name.
    torn_final = tmp_path / "pages" / key(5).chain[:1].hex() / f"{key(5).hex}.page"
    shutil.copy(tmp, torn_final)
    tier = make(tmp_path)
    stats = tier.stats()
    assert stats.extra["temp_files_removed"] == 1 and not list(tmp_path.rglob("*.tmp"))
    assert stats.integrity_failures == 1 and ".truncated." in quarantined(tmp_path)[0]
    assert stats.pages == 5 and not tier.exists(key(5)) and tier.get(key(5)) is None
    assert_still_serving(tier, list(range(5)))
    tier.close()


FREE_RUNNING_WRITER = """
import sys
from symram_vllm.tiers.disk import DiskTier, DiskTierConfig
tier = DiskTier(sys.argv[1], 1 << 26, config=DiskTierConfig(write_workers=2), cipher=CIPHER)
for i in range(100000):
    tier.set_async(key(i), page(i, 256 * 1024))
"""


def test_sigkill_of_busy_writer_then_rescan_returns_only_whole_pages(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HELPERS + FREE_RUNNING_WRITER, str(tmp_path)], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        # The child imports torch first: tens of seconds on a busy host's cold cache.
        deadline = time.monotonic() + 90
        while len(list((tmp_path / "pages").rglob("*.page"))) < 20:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "writer made no progress"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait()
    tier = make(tmp_path, pages=400)
    stats = tier.stats()
    assert stats.pages >= 20 and stats.integrity_failures == 0
    for k in list(tier.keys()):
        i = int.from_bytes(k.chain, "big")
        assert torch.equal(tier.get(k), page(i, 256 * 1024)), f"page {i} torn"
    assert tier.stats().integrity_failures == 0
    tier.close()

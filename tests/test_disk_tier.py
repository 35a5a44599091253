import errno
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from at_rest import MODES, cipher_for, set_mode_env

from symram_vllm import capability
from symram_vllm.capability import Capability
from symram_vllm.keys import BlockKey
from symram_vllm.tiers import aligned_io
from symram_vllm.tiers.aligned_io import (
    ALIGN,
    AlignedBuffer,
    PosixFileIO,
    align_up,
    choose_backend,
    open_file_io,
    probe_direct_io,
)
from symram_vllm.tiers.crypto import PageCipher
from symram_vllm.tiers.disk import DiskTier, DiskTierConfig, DiskTierLocked
from symram_vllm.tiers.disk_layout import MANIFEST_NAME, rebuild_index
from symram_vllm.tiers.page_format import HEADER_BYTES, checksum, tag_crc, unpack_header

PAGE = 64 * 1024
FILE = HEADER_BYTES + PAGE
CIPHER: PageCipher | None = None  # set per test by `at_rest`: plaintext or sealed pages


@pytest.fixture(autouse=True, params=MODES)
def at_rest(request, monkeypatch) -> str:
    monkeypatch.setattr(sys.modules[__name__], "CIPHER", cipher_for(request.param))
    set_mode_env(monkeypatch, request.param)
    return request.param


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(32, "big"))


def page(i: int, size: int = PAGE) -> torch.Tensor:
    return ((torch.arange(size, dtype=torch.int64) * (i + 3) + i) % 251).to(torch.uint8)


def make(path: Path, pages: int = 8, **cfg) -> DiskTier:
    return DiskTier(path, pages * FILE, config=DiskTierConfig(**cfg), cipher=CIPHER)


class GatedIO(PosixFileIO):
    """Real POSIX I/O whose writes wait for `gate`: a disk that stalls on demand."""

    def __init__(self) -> None:
        super().__init__(direct=False)
        self.gate = threading.Event()
        self.writing = threading.Event()

    def write_new(self, path, buf, fsync):
        self.writing.set()
        assert self.gate.wait(10), "test forgot to open the gate"
        super().write_new(path, buf, fsync)


def test_roundtrip_fixed_and_variable_pages(tmp_path):
    tier = make(tmp_path)
    sizes = {0: PAGE, 1: 10_000, 2: 1, 3: 3 * ALIGN}
    for i, size in sizes.items():
        assert tier.set(key(i), page(i, size), codec="zstd" if size != PAGE else None)
    for i, size in sizes.items():
        assert torch.equal(tier.get(key(i)), page(i, size))
    assert tier.entry(key(1)).codec == "zstd" and tier.entry(key(0)).codec == "none"
    assert tier.set(key(0), page(99))  # content-addressed: present means done
    assert torch.equal(tier.get(key(0)), page(0))
    assert tier.get(key(42)) is None
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.puts, stats.pages) == (5, 1, 4, 4)
    tier.close()


@pytest.mark.parametrize("aligned", [True, False])
def test_get_into_out_buffer(tmp_path, aligned):
    tier = make(tmp_path)
    tier.set(key(0), page(0))
    tier.set(key(1), page(1, 5000))
    if aligned:
        out = AlignedBuffer(PAGE).tensor[:PAGE]
    else:
        out = torch.empty(PAGE + 1, dtype=torch.uint8)[1:]
    got = tier.get(key(0), out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(out, page(0))
    short = tier.get(key(1), out=out)  # smaller page into a bigger buffer: a prefix view
    assert short.numel() == 5000 and torch.equal(short, page(1, 5000))
    with pytest.raises(ValueError):
        tier.get(key(0), out=torch.empty(10, dtype=torch.uint8))
    tier.close()


def test_page_file_layout_and_header(tmp_path):
    tier = make(tmp_path)
    tier.set(key(7).for_rank(3), page(7, 10_000), codec="int8+zstd", position=42)
    path = tier.path_of(key(7).for_rank(3))
    assert path.parent.parent == tmp_path / "pages"
    assert path.stat().st_size == HEADER_BYTES + align_up(10_000)
    raw = path.read_bytes()
    header = unpack_header(raw[:HEADER_BYTES])
    assert header.key == key(7).for_rank(3)
    assert (header.codec, header.position, header.payload_len) == ("int8+zstd", 42, 10_000)
    stored = raw[HEADER_BYTES : HEADER_BYTES + 10_000]
    if CIPHER is None:
        assert header.seal is None and header.payload_crc == checksum(stored)
        assert stored == page(7, 10_000).numpy().tobytes()
    else:
        assert header.seal.key_id == CIPHER.key_id and len(header.seal.nonce) == 12
        assert header.payload_crc == tag_crc(header.seal.tag)
        assert stored != page(7, 10_000).numpy().tobytes()  # ciphertext
    assert set(raw[HEADER_BYTES + 10_000 :]) == {0}  # padding is zeroed
    tier.close()


def test_delete_keys_and_rank_isolation(tmp_path):
    tier = make(tmp_path)
    tier.set(key(1), page(1))
    tier.set(key(1).for_rank(1), page(2))
    assert sorted(k.rank for k in list(tier.keys())) == [0, 1]
    assert torch.equal(tier.get(key(1).for_rank(1)), page(2))
    assert tier.delete(key(1)) and not tier.delete(key(1))
    assert not tier.exists(key(1)) and not tier.path_of(key(1)).exists()
    assert tier.stats().bytes_used == FILE
    tier.close()


def test_budget_evicts_least_recently_used(tmp_path):
    evicted: list[BlockKey] = []
    tier = make(tmp_path, pages=3)
    tier.on_evict = evicted.append
    for i in range(3):
        tier.set(key(i), page(i))
    tier.get(key(0))  # 0 becomes most recent
    tier.set(key(3), page(3))
    assert evicted == [key(1)]
    assert not tier.path_of(key(1)).exists()
    stats = tier.stats()
    assert stats.evictions == 1 and stats.bytes_used == 3 * FILE <= stats.bytes_capacity
    tier.close()


def test_page_larger_than_budget_is_declined_without_evicting(tmp_path):
    tier = make(tmp_path, pages=2)
    tier.set(key(0), page(0))
    assert not tier.set(key(1), page(1, 3 * PAGE))
    assert tier.exists(key(0)) and tier.stats().rejected_puts == 1
    tier.close()


def test_pins_protect_pages_and_expire(tmp_path):
    now = [0.0]
    tier = DiskTier(tmp_path, 2 * FILE, clock=lambda: now[0], cipher=CIPHER)
    tier.set(key(0), page(0))
    tier.set(key(1), page(1))
    assert tier.pin(key(0), ttl_s=10) and not tier.pin(key(9))
    tier.set(key(2), page(2))
    assert tier.exists(key(0)) and not tier.exists(key(1))
    tier.pin(key(2))  # forever
    assert not tier.set(key(3), page(3))  # everything pinned: declined, not an error
    now[0] = 11.0
    assert not tier.is_pinned(key(0))
    assert tier.set(key(3), page(3)) and not tier.exists(key(0))
    tier.close()


def test_victim_chooser_sees_lru_window(tmp_path):
    seen: list[list[BlockKey]] = []

    def chooser(candidates):
        seen.append(list(candidates))
        return candidates[-1]  # the most recent of the window

    tier = make(tmp_path, pages=3)
    tier.victim_chooser, tier.victim_window = chooser, 2
    for i in range(4):
        tier.set(key(i), page(i))
    assert seen == [[key(0), key(1)]]
    assert tier.exists(key(0)) and not tier.exists(key(1))
    tier.close()


def test_async_writes_queue_drop_and_never_block_reads(tmp_path):
    io = GatedIO()
    tier = DiskTier(
        tmp_path, 16 * FILE, file_io=io, cipher=CIPHER,
        config=DiskTierConfig(write_workers=1, write_queue=1, when_queue_full="drop"),
    )
    io.gate.set()
    assert tier.set(key(0), page(0))
    io.gate.clear()
    first = tier.set_async(key(1), page(1))
    assert io.writing.wait(5)
    second = tier.set_async(key(2), page(2))
    assert tier.stats().extra["write_queue_depth"] == 2
    dropped = tier.set_async(key(3), page(3))
    assert dropped.done() and dropped.result() is False
    assert tier.stats().extra["dropped_writes"] == 1
    assert tier.set_async(key(1), page(1)) is first  # same pending write, not a second one
    # While the disk is stuck: a pending page is served from its staging copy, and a
    # page on disk is read in the caller's thread, not behind the writes.
    start = time.perf_counter()
    assert torch.equal(tier.get(key(1)), page(1))
    assert torch.equal(tier.get(key(0)), page(0))
    assert time.perf_counter() - start < 2
    timed_out = tier.set_async(key(4), page(4), block=True, timeout=0.05)
    assert timed_out.result(1) is False
    io.gate.set()
    assert first.result(5) and second.result(5)
    tier.flush()
    stats = tier.stats()
    assert stats.extra["write_queue_depth"] == 0 and stats.pages == 3
    assert torch.equal(tier.get(key(2)), page(2))
    tier.close()


def test_block_mode_applies_back_pressure(tmp_path):
    io = GatedIO()
    tier = DiskTier(
        tmp_path, 16 * FILE, file_io=io, cipher=CIPHER,
        config=DiskTierConfig(write_workers=1, write_queue=0),
    )
    tier.set_async(key(0), page(0))
    assert io.writing.wait(5)
    saver = threading.Thread(target=lambda: tier.set_async(key(1), page(1)))
    saver.start()
    saver.join(0.2)
    assert saver.is_alive()  # the saver waits for the disk
    assert not tier.wait_for_room(0.01)
    io.gate.set()
    saver.join(5)
    assert not saver.is_alive()
    tier.flush()
    assert tier.exists(key(1)) and tier.stats().extra["dropped_writes"] == 0
    tier.close()


def test_delete_cancels_a_pending_write(tmp_path):
    io = GatedIO()
    tier = DiskTier(tmp_path, 16 * FILE, file_io=io, cipher=CIPHER)
    fut = tier.set_async(key(0), page(0))
    assert io.writing.wait(5)
    assert tier.delete(key(0))
    io.gate.set()
    assert fut.result(5) is False
    assert not tier.exists(key(0)) and not tier.path_of(key(0)).exists()
    assert not list((tmp_path / "pages").rglob("*.tmp"))
    tier.close()


def test_direct_io_probe_is_cached_and_falls_back_on_einval(tmp_path, monkeypatch):
    aligned_io.forget_probes()
    calls = []
    real_open = os.open

    def refusing_open(path, flags, *args):
        calls.append(path)
        if flags & aligned_io.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(aligned_io.os, "open", refusing_open)
    probe = probe_direct_io(tmp_path)
    assert not probe.available and "refused O_DIRECT" in probe.reason
    n = len(calls)
    assert probe_direct_io(tmp_path) == probe and len(calls) == n  # once per directory
    io, reason = open_file_io(tmp_path, "auto", "auto")
    assert not io.direct and "refused" in reason
    with pytest.raises(OSError):
        open_file_io(tmp_path, "auto", "on")
    monkeypatch.undo()
    aligned_io.forget_probes()


def test_tier_works_buffered_when_directory_refuses_direct_io(tmp_path, monkeypatch):
    aligned_io.forget_probes()
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & aligned_io.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(aligned_io.os, "open", refusing_open)
    tier = make(tmp_path)
    assert tier.stats().extra["direct_io"] == 0
    tier.set(key(0), page(0, 1234))
    assert torch.equal(tier.get(key(0)), page(0, 1234))
    tier.close()
    aligned_io.forget_probes()


def test_direct_io_is_used_where_supported(tmp_path):
    aligned_io.forget_probes()
    if not probe_direct_io(tmp_path).available:
        pytest.skip("this filesystem refuses O_DIRECT")
    tier = make(tmp_path)
    assert tier.stats().extra["direct_io"] == 1
    tier.close()


def test_backend_choice():
    no, yes = Capability(False, "no CUDA"), Capability(True, "kvikio ok")
    assert choose_backend("auto", no)[0] == "posix"
    assert choose_backend("auto", yes)[0] == "kvikio"
    assert choose_backend("kvikio", no)[0] == "posix"  # falls back, with a warning
    assert choose_backend("posix", yes)[0] == "posix"
    with pytest.raises(ValueError):
        choose_backend("gds", yes)


def test_probe_picks_posix_on_this_host_and_kvikio_when_available(tmp_path, monkeypatch):
    assert not capability.kvikio_capability().available  # no CUDA on these machines
    tier = make(tmp_path / "a")
    assert tier.io.name == "posix" and tier.stats().extra["kvikio"] == 0
    assert "kvikio" not in sys.modules  # the GPU path is imported lazily
    tier.close()

    class FakeKvikio(PosixFileIO):
        name = "kvikio"

        def __init__(self) -> None:
            super().__init__(direct=False)

    monkeypatch.setattr(capability, "kvikio_capability", lambda: Capability(True, "fake GPU"))
    monkeypatch.setattr(aligned_io, "KvikioFileIO", FakeKvikio)
    tier = make(tmp_path / "b")
    assert tier.io.name == "kvikio" and tier.stats().extra["kvikio"] == 1
    tier.set(key(0), page(0))
    assert torch.equal(tier.get(key(0)), page(0))
    tier.close()


def test_warm_restart_from_manifest(tmp_path):
    tier = make(tmp_path)
    for i in range(4):
        tier.set(key(i), page(i), position=i)
    tier.get(key(0))  # LRU order now 1, 2, 3, 0
    tier.close()
    assert (tmp_path / MANIFEST_NAME).exists()
    tier = make(tmp_path, pages=3)  # smaller budget: the LRU page must go
    extra = tier.stats().extra
    assert extra["pages_from_manifest"] == 4 and extra["pages_scanned"] == 0
    assert not (tmp_path / MANIFEST_NAME).exists()  # consumed: a crash now means rescan
    assert not tier.exists(key(1))
    assert [tier.entry(key(i)).position for i in (2, 3, 0)] == [2, 3, 0]
    for i in (0, 2, 3):
        assert torch.equal(tier.get(key(i)), page(i))
    tier.close()


def test_warm_restart_by_scan_orders_by_age(tmp_path):
    tier = make(tmp_path, manifest=False)
    for i in range(4):
        tier.set(key(i), page(i))
    tier.close()
    assert not (tmp_path / MANIFEST_NAME).exists()
    for age, i in enumerate([2, 0, 3, 1]):  # key 1 oldest ... key 2 newest
        os.utime(tier.path_of(key(i)), (1e9 - age * 100, 1e9 - age * 100))
    tier = make(tmp_path, pages=2)
    assert tier.stats().extra["pages_scanned"] == 4
    assert sorted(k.chain[-1] for k in list(tier.keys())) == [0, 2]
    assert torch.equal(tier.get(key(2)), page(2))
    tier.close()


def test_tampered_manifest_is_rejected_and_pages_rescanned(tmp_path):
    tier = make(tmp_path)
    for i in range(3):
        tier.set(key(i), page(i))
    tier.close()
    manifest = tmp_path / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace('"length":65536', '"length":65535', 1))
    tier = make(tmp_path)
    extra = tier.stats().extra
    assert extra["manifest_rejected"] == 1 and extra["pages_scanned"] == 3
    assert all(torch.equal(tier.get(key(i)), page(i)) for i in range(3))
    tier.close()


def test_scan_progress_bar_for_many_pages(tmp_path, capsys):
    tier = make(tmp_path, manifest=False)
    for i in range(3):
        tier.set(key(i), page(i, 100))
    report = rebuild_index(tmp_path / "pages", tier.io, {}, progress_min_files=2, cipher=CIPHER)
    assert len(report.entries) == 3
    assert "symram disk index" in capsys.readouterr().err
    rebuild_index(tmp_path / "pages", tier.io, {}, progress_min_files=10)
    assert "symram disk index" not in capsys.readouterr().err
    tier.close()


def test_one_live_tier_per_directory(tmp_path):
    tier = make(tmp_path)
    with pytest.raises(DiskTierLocked, match=str(os.getpid())):
        make(tmp_path)
    tier.close()
    make(tmp_path).close()  # released on close


def test_block_timeout_bounds_the_wait_then_drops(tmp_path):
    io = GatedIO()
    tier = DiskTier(
        tmp_path, 16 * FILE, file_io=io, cipher=CIPHER,
        config=DiskTierConfig(write_workers=1, write_queue=0, block_timeout_s=0.05),
    )
    first = tier.set_async(key(0), page(0))
    assert io.writing.wait(5)
    start = time.perf_counter()
    late = tier.set_async(key(1), page(1))  # 'block' mode, but only for block_timeout_s
    assert late.done() and late.result() is False
    assert time.perf_counter() - start < 2
    assert tier.stats().extra["dropped_writes"] == 1
    io.gate.set()
    assert first.result(5)
    tier.close()


def test_read_workers_and_io_backend_are_honoured(tmp_path):
    tier = make(tmp_path, read_workers=3, io_backend="posix", direct_io="off")
    assert tier._reader._max_workers == 3
    assert type(tier.io) is PosixFileIO and "posix requested" in tier.io_reason
    tier.set(key(0), page(0))
    assert torch.equal(tier.get_async(key(0)).result(5), page(0))
    tier.close()


def test_write_gate_back_off_doubles_up_to_retry_backoff_max_s(tmp_path):
    now = [0.0]
    tier = DiskTier(tmp_path, 8 * FILE, clock=lambda: now[0], cipher=CIPHER,
                    config=DiskTierConfig(retry_backoff_s=1, retry_backoff_max_s=3))
    tier.gate.failed(OSError("disk gone"))
    waits = [tier.gate.retry_in()]
    for _ in range(3):
        now[0] += waits[-1]
        assert tier.gate.allow()  # the probe after the back-off
        tier.gate.failed(OSError("still gone"))
        waits.append(tier.gate.retry_in())
    assert waits == [1, 2, 3, 3]
    tier.close()


def test_kvikio_that_cannot_do_io_here_falls_back_to_posix(tmp_path, monkeypatch):
    # kvikio may import on a CUDA host and still fail on the disk's file system (no
    # O_DIRECT on overlayfs, no libcufile): a round trip at open time decides.
    from symram_vllm.capability import Capability

    class Failing:
        name = "kvikio"

        def __init__(self) -> None:
            raise RuntimeError("cuFile: file system not supported")

    monkeypatch.setattr(capability, "kvikio_capability", lambda: Capability(True, "test"))
    monkeypatch.setattr(aligned_io, "KvikioFileIO", Failing)
    probe = aligned_io.probe_kvikio_io(tmp_path)
    assert not probe.available and "file system not supported" in probe.reason
    io, reason = open_file_io(tmp_path, "kvikio", "off")
    assert io.name == "posix" and "kvikio unusable here" in reason
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind

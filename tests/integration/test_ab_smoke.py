"""The A/B runner end to end on the tiny model: a complete report (JSON keys, Markdown,
PNG plots) in which the symram arm served prompt KV from its tiers and the vanilla arm
did not; and Ctrl-C stops it with every engine gone and the partial results kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from symram_vllm.serving.stack import port_is_free

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def run_ab(args: list[str], log: Path, sigint_ignored: bool = False
           ) -> subprocess.Popen[bytes]:
    """`sigint_ignored`: started as a shell without job control starts a background
    command (CI runners do), with SIGINT ignored; Ctrl-C must still stop the run."""
    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "loadtest.ab", *args], cwd=REPO, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "COLUMNS": "200"},
            preexec_fn=ignore_sigint if sigint_ignored else None,
        )


def test_ab_smoke_writes_a_complete_report(tmp_path):
    proc = run_ab(["--smoke", "--full-sweep", "--peer-check", "--out-dir", str(tmp_path)],
                  tmp_path / "ab.log")
    try:
        rc = proc.wait(timeout=1200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "ab.log").read_text()
    assert rc == 0, log[-3000:]
    result = json.loads((tmp_path / "ab_smoke.json").read_text())
    assert result["status"] == "complete"
    for key in ("sessions_at_slo_baseline", "sessions_at_slo_symram", "sessions_ratio",
                "machine", "slo", "engine", "workloads", "points", "results", "command"):
        assert key in result, key
    assert result["machine"]["cpu_count"] >= 1
    assert result["engine"]["kv_cache_bytes"] == (
        result["engine"]["kv_cache_tokens"] * result["model"]["kv_bytes_per_token"])

    points = result["points"]
    # chat at 1 and 2 users, docqa at 2: each on both arms.
    assert sorted((p["scenario"], p["users"], p["arm"]) for p in points) == sorted(
        (s, u, a) for s, u in (("chat", 1), ("chat", 2), ("docqa", 2))
        for a in ("baseline", "symram"))
    for p in points:
        assert p["summary"]["requests"] == p["expected_requests"] > 0
        assert p["summary"]["errors"] == 0
        assert p["summary"]["ttft_p95_s"] > 0
    for scenario in ("chat", "docqa"):
        for arm in ("baseline", "symram"):
            assert result["results"][scenario][arm], (scenario, arm)

    symram = [p["tiers"] for p in points if p["arm"] == "symram"]
    vanilla = [p["tiers"] for p in points if p["arm"] == "baseline"]
    assert sum(t["symram_dram_hits"] + t["symram_disk_hits"] for t in symram) > 0
    assert sum(t["tokens"]["symram_dram"] + t["tokens"]["symram_disk"] for t in symram) > 0
    assert sum(t["symram_saved_blocks"] for t in symram) > 0
    assert all(t["symram_loaded_blocks"] == 0 and t["tokens"]["symram_dram"] == 0
               for t in vanilla)
    # Identical workloads: both arms saw the same prompt tokens at each point.
    by_point: dict[tuple[str, int], set[int]] = {}
    for p in points:
        by_point.setdefault((p["scenario"], p["users"]), set()).add(p["summary"]["prompt_tokens"])
    assert all(len(v) == 1 for v in by_point.values()), by_point

    md = (tmp_path / "ab_smoke.md").read_text()
    assert "Sessions sustained at p95 TTFT" in md
    for scenario in ("chat", "docqa"):
        for kind in ("ttft", "throughput", "tiers"):
            png = tmp_path / f"ab_smoke_{scenario}_{kind}.png"
            assert png.read_bytes()[:8] == PNG
            assert png.name in md
    # The peer client (vllm bench serve) ran against both arms.
    for arm in ("baseline", "symram"):
        peer = result["peer_check"][arm]
        assert peer["returncode"] == 0, peer
        assert peer["completed"] == result["peer_check"]["spec"]["num_prompts"]
        assert peer["failed"] == 0 and peer["median_ttft_ms"] > 0
    assert "vllm bench serve (prefix_repetition)" in md
    raw = tmp_path / "logs" / "ab_smoke"
    assert (raw / "chat_u2_r0_symram.jsonl").exists()
    assert (raw / "ab_symram_engine.log").exists()


def _group_alive(pgid: int) -> bool:
    """A live (not zombie) process in process group `pgid`, read from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_ab_ctrl_c_kills_engines_and_keeps_partial_results(tmp_path):
    proc = run_ab(["--smoke", "--scenarios", "chat", "--users", "1,2,3,4,5,6", "--full-sweep",
                   "--out-dir", str(tmp_path), "--name", "partial"], tmp_path / "ab.log",
                  sigint_ignored=True)
    result_path = tmp_path / "partial.json"
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, (tmp_path / "ab.log").read_text()[-3000:]
            if result_path.exists():
                result = json.loads(result_path.read_text())
                if len(result.get("points", [])) >= 1:
                    break
            assert time.monotonic() < deadline, "no point finished in time"
            time.sleep(1)
        processes = result["processes"]
        assert {p["name"] for p in processes} >= {"vanilla-engine", "symram-engine"}
        assert all(_group_alive(p["pid"]) for p in processes)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal does
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 1
    result = json.loads(result_path.read_text())
    assert result["status"] == "interrupted"
    assert 1 <= len(result["points"]) < 12
    assert "interrupted" in (tmp_path / "partial.md").read_text()
    # Every engine (and its vLLM children, same process group) is gone, ports free.
    assert not [p for p in processes if _group_alive(p["pid"])]
    assert all(port_is_free(port) for p in processes for port in p["ports"])

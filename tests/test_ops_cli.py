"""`symram stats`, `pin` (control routes) and `bypass` against a real control endpoint over
a real TierStack; the bypass switch across processes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import httpx
import pytest
import torch

from symram_vllm import bypass
from symram_vllm.cli import main
from symram_vllm.control import ControlServer
from symram_vllm.keys import BlockKey
from symram_vllm.ops_cli import summarize
from symram_vllm.tiers.disk import DiskTier, DiskTierConfig
from symram_vllm.tiers.page_format import HEADER_BYTES
from symram_vllm.tiers.stack import TierStack

PAGE = 4096
TOKEN = "ops-cli-control-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
INFO = {"instance_id": "engine-3", "signature_digest": "cd" * 32, "block_size": 16,
        "tp_size": 1, "codec": "none", "model": "demo"}


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(bypass.RUNTIME_DIR_ENV, str(tmp_path / "run"))
    yield
    bypass.configure(0)


@pytest.fixture
def control(tmp_path):
    disk = DiskTier(tmp_path / "disk", 64 * (HEADER_BYTES + PAGE), config=DiskTierConfig())
    stack = TierStack(PAGE, 4 * PAGE, disk, pin_memory=False)
    server = ControlServer(stack, token=TOKEN, rank=0, info=INFO)
    url = server.start(host="127.0.0.1", port=0)
    bypass.configure(int(url.rsplit(":", 1)[1]))
    yield url, stack
    server.stop()
    stack.close()


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(32, "big"), 0)


def test_stats_sums_tiers_and_hit_rate(control, capsys):
    url, stack = control
    for i in range(3):
        assert stack.put(key(i), torch.full((PAGE,), i, dtype=torch.uint8), position=i)
    assert stack.get(key(0)) is not None
    assert stack.get(key(99)) is None
    assert main(["stats", "--control", url, "--token", TOKEN, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = report["summary"]
    assert summary["dram"]["pages"] == 3 and summary["dram"]["capacity_bytes"] == 4 * PAGE
    assert summary["hits"]["dram"] == 1 and summary["hits"]["misses"] == 1
    assert summary["hit_rate"] == 0.5
    assert main(["stats", "--control", url, "--token", TOKEN]) == 0
    text = capsys.readouterr().out
    assert "engine engine-3" in text and "dram" in text and "disk" in text


def test_summary_adds_ranks():
    ranks = [{"dram_pages": 2, "dram_bytes_used": 10, "dram_bytes_capacity": 100,
              "stack_dram_hits": 1, "stack_misses": 1}] * 2
    summary = summarize(ranks)
    assert summary["ranks"] == 2 and summary["dram"]["pages"] == 4
    assert summary["dram"]["capacity_bytes"] == 200 and summary["hit_rate"] == 0.5


def test_pin_keeps_pages_through_eviction_and_unpin_releases(control):
    url, stack = control
    for i in range(2):
        assert stack.put(key(i), torch.full((PAGE,), i, dtype=torch.uint8), position=i)
    hexes = [key(i).chain.hex() for i in range(2)]
    reply = httpx.post(f"{url}/symram/pin", json={"keys": hexes, "ttl_s": 60},
                       headers=AUTH).json()
    assert reply == {"requested": 2, "pinned": 2, "ttl_s": 60.0}
    assert stack.dram.is_pinned(key(0))
    bad = httpx.post(f"{url}/symram/pin", json={"keys": hexes, "ttl_s": 0}, headers=AUTH)
    assert bad.status_code == 422 and "ttl_s" in bad.json()["error"]["message"]
    unpinned = httpx.post(f"{url}/symram/unpin", json={"keys": hexes}, headers=AUTH)
    assert unpinned.json() == {"requested": 2}
    assert not stack.dram.is_pinned(key(0))


def test_bypass_on_off_through_the_cli_is_seen_by_another_process(control, capsys, caplog):
    url, _ = control
    port = url.rsplit(":", 1)[1]
    probe = ("import sys; from symram_vllm import bypass; bypass.configure(int(sys.argv[1])); "
             "print(bypass.bypass_active())")

    def seen_elsewhere() -> str:
        return subprocess.run([sys.executable, "-c", probe, port], capture_output=True,
                              text=True, check=True, timeout=60).stdout.strip()

    assert seen_elsewhere() == "False"
    with caplog.at_level(logging.WARNING, logger="symram.bypass"):
        assert main(["bypass", "on", "--control", url, "--token", TOKEN, "--reason",
                     "bad pages", "--by", "oncall"]) == 0
    assert "stopped" in capsys.readouterr().out
    assert "symram bypass ON by oncall from 127.0.0.1 (bad pages)" in caplog.text  # audit
    assert bypass.bypass_active()  # this process (the control endpoint's) at once
    assert seen_elsewhere() == "True"  # and any other process of the engine
    state = httpx.get(f"{url}/symram/bypass", headers=AUTH).json()
    assert state["active"] is True and state["reason"] == "bad pages"
    assert main(["bypass", "status", "--control", url, "--token", TOKEN]) == 0
    assert "bypass is ON" in capsys.readouterr().out
    assert main(["bypass", "off", "--control", url, "--token", TOKEN]) == 0
    assert seen_elsewhere() == "False"
    assert httpx.get(f"{url}/symram/bypass", headers=AUTH).json() == {"active": False}


def test_switch_refreshes_within_its_interval(tmp_path):
    now = [0.0]
    reader = bypass.BypassSwitch("7", clock=lambda: now[0])
    writer = bypass.BypassSwitch("7")
    assert not reader.active()
    writer.set(True, by="t")
    assert not reader.active()  # cached until the refresh interval passes
    now[0] += bypass.REFRESH_S
    assert reader.active()
    writer.set(False, by="t")
    now[0] += bypass.REFRESH_S
    assert not reader.active()


def test_unreadable_flag_counts_as_on(tmp_path):
    switch = bypass.BypassSwitch("8")
    assert switch.path is not None
    switch.path.parent.mkdir(parents=True, exist_ok=True)
    switch.path.write_text("{not json")
    assert switch.active()


def test_a_wrong_token_is_explained(control, capsys):
    url, _ = control
    assert main(["stats", "--control", url, "--token", "not-the-token-0123456"]) == 1
    assert "refused the token" in capsys.readouterr().err


def test_commands_explain_a_missing_endpoint(capsys, monkeypatch):
    from symram_vllm.serving.engine_process import free_port

    for name in ("SYMRAM_CONTROL_PORT", "SYMRAM_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    assert main(["stats"]) == 1
    assert "control_port is not set" in capsys.readouterr().err
    started = time.monotonic()
    assert main(["bypass", "on", "--control", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "cannot reach" in capsys.readouterr().err
    assert time.monotonic() - started < 15

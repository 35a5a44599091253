"""`symram up` end to end with the tiny model: it comes up, serves a request through its
public port, and SIGINT leaves no child process and no listening port behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from symram_vllm.serving.engine_process import free_port
from symram_vllm.serving.stack import port_is_free

pytestmark = pytest.mark.engine


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_up_serves_and_sigint_cleans_up(tiny_model, tmp_path):
    port = free_port()
    state = tmp_path / "state"
    out = open(tmp_path / "up.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "symram_vllm.cli", "up", "--model", str(tiny_model),
         "--port", str(port), "--state-dir", str(state), "--dram-bytes", "64MiB",
         "--disk-bytes", "64MiB", "--", "--max-model-len", "1024",
         "--kv-cache-memory-bytes", str(4 << 20), "--enforce-eager"],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "COLUMNS": "400"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "up.out").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "symram up not healthy in 600 s"
            time.sleep(1)
        # The ready banner comes after every process is healthy.
        while "symram is up" not in (tmp_path / "up.out").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.5)
        banner = (tmp_path / "up.out").read_text()
        assert "try:\n  curl -s" in banner and url in banner

        body = {"model": str(tiny_model), "prompt": "def fibonacci(n):", "max_tokens": 8,
                "temperature": 0}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 8

        children = descendants(proc.pid)
        assert len(children) >= 2  # at least an engine and its vLLM processes
        ports = {port} | {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", banner)}
        logs = sorted(p.name for p in (state / "logs").iterdir())
        assert "engine-0.log" in logs
        redis = "redis-server" in " ".join(
            Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
            for pid in children if alive(pid))
        if redis:
            assert "redis.log" in logs and "directory: redis://" in banner
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            out.close()
    assert rc == 0, (tmp_path / "up.out").read_text()
    text = (tmp_path / "up.out").read_text()
    assert "stopped; logs in" in text
    # Nothing left: no child of `symram up` alive, no port of the stack listening.
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in children if alive(pid)]
    assert all(port_is_free(p) for p in ports), ports

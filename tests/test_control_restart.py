"""The worker supervises its control endpoint's process: a child that dies (SIGKILL, as
an OOM kill) is started again on the same port with exponential backoff; a child that
keeps dying is given up on, with a log line saying why; restarts are a metric; and a
killed engine still leaves no control process behind, restarted children included."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace

import httpx
import pytest
import torch
from test_control_security import _gone

from symram_vllm.config import SymramConfig
from symram_vllm.connectors.vllm_stats import COUNTERS
from symram_vllm.connectors.worker import WorkerSide
from symram_vllm.control import ControlServer
from symram_vllm.control_restart import RestartBackoff, RestartPolicy, describe_exit
from symram_vllm.keys import BlockKey
from symram_vllm.tiers.stack import TierStack

PAGE = 4096
TOKEN = "restart-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
INFO = {"instance_id": "e", "signature_digest": "ab" * 32, "block_size": 16, "tp_size": 1,
        "codec": "none", "model": "demo"}
# Quick retries so a test spends its time on process starts, not on backoff.
FAST = RestartPolicy(first_delay_s=0.02, max_delay_s=0.1, stable_after_s=60.0,
                     max_fast_failures=3)
# A cold Python importing FastAPI on a loaded 2-core host (control.START_TIMEOUT_S).
WITHIN_S = 60.0


def chain(i: int) -> bytes:
    return i.to_bytes(32, "big")


def wait_until(condition: Callable[[], object], within_s: float = WITHIN_S) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {within_s} s: {condition}"
        time.sleep(0.02)


@pytest.fixture
def stack():
    st = TierStack(PAGE, 16 * PAGE, None, pin_memory=False)
    assert st.put(BlockKey(chain(0), 0), torch.zeros(PAGE, dtype=torch.uint8), position=0)
    yield st
    st.close()


def answers(url: str) -> bool:
    """The endpoint on `url` answers a lookup from the worker's stack."""
    try:
        got = httpx.post(f"{url}/symram/lookup", json={"keys": [chain(0).hex()]},
                         headers=AUTH, timeout=2)
    except httpx.HTTPError:
        return False
    return got.status_code == 200 and got.json()["dram"] == 1


def test_a_killed_child_is_restarted_on_the_same_port(stack, caplog):
    caplog.set_level(logging.WARNING, logger="symram_vllm.control")
    server = ControlServer(stack, token=TOKEN, info=INFO, restart=FAST)
    url = server.start(port=0)
    try:
        first = server.child_pid
        assert first is not None and answers(url)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: server.restarts == 1 and server.alive)
        second = server.child_pid
        assert second is not None and second != first
        assert server.url == url  # the same port, rebound
        wait_until(lambda: answers(url))
        assert server.guard_stats()["pid"] == second  # the new child, over the new link
        assert server.gave_up is None
        said = " ".join(r.getMessage() for r in caplog.records)
        assert f"process {first} killed by SIGKILL" in said and "restarted" in said
        # Killed again: restarted again (a death after a healthy run is no give-up).
        os.kill(second, signal.SIGKILL)
        wait_until(lambda: server.restarts == 2 and server.alive)
        wait_until(lambda: answers(url))
        third = server.child_pid
        assert third is not None and third != second
    finally:
        server.stop()
    assert _gone(third, 5.0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


def test_a_child_that_keeps_dying_is_given_up_on(stack, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="symram_vllm.control")
    server = ControlServer(stack, token=TOKEN, info=INFO, restart=FAST)
    url = server.start(port=0)
    starts = tmp_path / "starts"
    try:
        first = server.child_pid
        assert first is not None
        # From now on every child is a real process that dies at once (a broken install,
        # memory too tight to start Python), noting each start.
        server.child_command = [sys.executable, "-c",
                                "import sys; open(sys.argv[1], 'a').write('x'); sys.exit(3)",
                                str(starts)]
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: server.gave_up is not None)
        supervisor = server._supervisor
        assert supervisor is not None
        supervisor.join(10)
        assert not supervisor.is_alive()  # nothing left to start another
        # The kill was failure 1; restarts 2 and 3 died; the 3rd failure ends it.
        assert starts.read_text() == "x" * (FAST.max_fast_failures - 1)
        assert server.restarts == 0 and not server.alive and server.child_pid is None
        assert "exit code 3" in server.gave_up
        given_up = [r for r in caplog.records if "given up" in r.getMessage()]
        assert len(given_up) == 1 and given_up[0].levelno == logging.ERROR
        assert "3 failures in a row" in given_up[0].getMessage()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
        assert stack.where(BlockKey(chain(0), 0)) == "dram"  # the engine serves on
    finally:
        server.stop()
    assert starts.read_text() == "x" * (FAST.max_fast_failures - 1)  # none since


ENGINE = """
import sys, time
from symram_vllm.control import ControlServer
from symram_vllm.control_restart import RestartPolicy

class Stack:
    def where(self, key): return None
    def prefetch(self, keys): raise AssertionError
    def stats(self): return {}

server = ControlServer(Stack(), token=sys.argv[1], info={},
                       restart=RestartPolicy(first_delay_s=0.02, max_delay_s=0.1))
server.start(port=0)
shown = None
while True:  # print each child's pid as it comes up
    if server.alive and server.child_pid != shown:
        shown = server.child_pid
        print(shown, flush=True)
    time.sleep(0.02)
"""


def test_a_killed_engine_leaves_no_restarted_control_process():
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, TOKEN], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert engine.stdout is not None
        first = int(engine.stdout.readline())
        os.kill(first, signal.SIGKILL)
        second = int(engine.stdout.readline())  # the restarted child, serving
        assert second != first and not _gone(second, 0.2)
        engine.kill()  # SIGKILL: no atexit, no stop()
        engine.wait(10)
        assert _gone(second, 10.0)
    finally:
        engine.kill()


def test_restarts_reach_the_metrics_as_a_counter():
    assert "control_restarts" in COUNTERS
    worker = WorkerSide(SymramConfig(), rank=0)
    control = SimpleNamespace(restarts=2, stop=lambda: None)
    worker.control = control  # type: ignore[assignment]
    assert worker.take_counters()[0]["control_restarts"] == 2
    assert worker.take_counters()[0]["control_restarts"] == 0  # deltas, as tier totals
    control.restarts = 3
    assert worker.take_counters()[0]["control_restarts"] == 1


def test_backoff_doubles_is_capped_and_resets_after_a_healthy_run():
    policy = RestartPolicy(first_delay_s=0.5, max_delay_s=3.0, stable_after_s=60.0,
                           max_fast_failures=5)
    backoff = RestartBackoff(policy)
    assert [backoff.after_failure(1.0), backoff.after_failure(None),
            backoff.after_failure(2.0), backoff.after_failure(None)] == [0.5, 1.0, 2.0, 3.0]
    assert backoff.after_failure(None) is None  # the 5th in a row
    healthy = RestartBackoff(policy)
    for _ in range(10):  # each child served a minute: every death is a new incident
        assert healthy.after_failure(61.0) == 0.5
    assert RestartBackoff(RestartPolicy(max_fast_failures=1)).after_failure(99.0) is None
    with pytest.raises(ValueError):
        RestartPolicy(first_delay_s=0)
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(3) == "exit code 3"

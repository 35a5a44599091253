"""The engine-side control endpoint against a real TierStack (DRAM over a DiskTier)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import torch

from symram_vllm.control import MAX_KEYS, ControlServer
from symram_vllm.keys import BlockKey
from symram_vllm.tiers.disk import DiskTier, DiskTierConfig
from symram_vllm.tiers.page_format import HEADER_BYTES
from symram_vllm.tiers.policy import PolicyConfig
from symram_vllm.tiers.stack import TierStack

PAGE = 4096
TOKEN = "control-token-for-tests-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
api = httpx.Client(headers=AUTH, timeout=30)  # a gateway's control client
INFO = {"instance_id": "engine-7", "signature_digest": "ab" * 32, "block_size": 16,
        "tp_size": 2, "codec": "none", "model": "demo"}


def chain(i: int) -> bytes:
    return i.to_bytes(32, "big")


def page(i: int) -> torch.Tensor:
    return torch.full((PAGE,), i % 256, dtype=torch.uint8)


@pytest.fixture
def stack(tmp_path):
    disk = DiskTier(tmp_path / "disk", 64 * (HEADER_BYTES + PAGE), config=DiskTierConfig())
    # Deep-prefix recompute costs so every evicted page is worth writing back to disk.
    # No background write-back: which tier holds a page must not depend on how long the
    # control process takes to start.
    policy = PolicyConfig(recompute={"block_tokens": 16, "seconds_per_token": 1e-3},
                          background_writeback_s=0)
    st = TierStack(PAGE, 4 * PAGE, disk, config=policy, pin_memory=False)
    yield st
    st.close()


@pytest.fixture
def server(stack):
    srv = ControlServer(stack, token=TOKEN, rank=1, info=INFO)
    url = srv.start(host="127.0.0.1", port=0)
    yield srv, url, stack
    srv.stop()


def fill(stack: TierStack, ids: range, rank: int = 1) -> None:
    for i in ids:
        assert stack.put(BlockKey(chain(i), rank), page(i), position=i)
    assert stack.disk is not None
    stack.disk.flush()


def hexes(ids) -> list[str]:
    return [chain(i).hex() for i in ids]


def test_info_and_stats(server):
    _, url, _ = server
    info = api.get(f"{url}/symram/info").json()
    assert info == {**INFO, "rank": 1}
    stats = api.get(f"{url}/symram/stats").json()
    assert stats["dram_bytes_capacity"] == 4 * PAGE
    assert "disk_pages" in stats
    # The control plane's own cost in the worker: its one thread's CPU time.
    assert 0 < stats["control_link_cpu_s"] < 5 and stats["control_link_answered"] >= 0


def test_an_engine_error_is_a_clear_503(stack):
    class Broken:
        def where(self, key):
            raise RuntimeError("tier lock poisoned")

        def stats(self):
            return stack.stats()

        def prefetch(self, keys):
            raise AssertionError

    srv = ControlServer(Broken(), token=TOKEN, rank=0, info=INFO)
    url = srv.start(port=0)
    try:
        got = api.post(f"{url}/symram/lookup", json={"keys": hexes(range(2))})
        assert got.status_code == 503
        assert "tier lock poisoned" in got.json()["error"]["message"]
        assert api.get(f"{url}/symram/stats").status_code == 200  # it serves on
    finally:
        srv.stop()


def test_lookup_reports_prefix_per_tier(server):
    _, url, stack = server
    fill(stack, range(8))  # DRAM holds 4: 0-3 were written back to disk on eviction
    where = [stack.where(BlockKey(chain(i), 1)) for i in range(8)]
    assert where == ["disk"] * 4 + ["dram"] * 4
    got = api.post(f"{url}/symram/lookup", json={"keys": hexes(range(10))}).json()
    assert got == {"dram": 0, "disk": 4, "any": 8}
    # The rank is part of the key: rank 0's endpoint on the same stack holds none of them.
    rank0 = ControlServer(stack, token=TOKEN, rank=0, info=INFO)
    try:
        url0 = rank0.start(port=0)
        got0 = api.post(f"{url0}/symram/lookup", json={"keys": hexes(range(8))}).json()
        assert got0 == {"dram": 0, "disk": 0, "any": 0}
    finally:
        rank0.stop()
    # A prefix that starts in DRAM.
    got = api.post(f"{url}/symram/lookup", json={"keys": hexes([4, 5, 0, 1, 99, 6])}).json()
    assert got == {"dram": 2, "disk": 0, "any": 4}
    assert api.post(f"{url}/symram/lookup", json={"keys": []}).json() == {
        "dram": 0, "disk": 0, "any": 0}


def test_prefetch_promotes_disk_pages(server):
    _, url, stack = server
    fill(stack, range(6))  # 0-1 on disk, 2-5 in DRAM
    for i in (4, 5):  # make room for two promotions without evicting them again
        assert stack.dram.delete(BlockKey(chain(i), 1))
    promotions = stack.stats()["stack_promotions"]
    before = api.post(f"{url}/symram/lookup", json={"keys": hexes(range(4))}).json()
    assert before == {"dram": 0, "disk": 2, "any": 4}
    got = api.post(f"{url}/symram/prefetch", json={"keys": hexes(range(2)), "wait_s": 5}).json()
    assert got["requested"] == 2 and got["done"] is True
    assert got["dram_resident"] == 2 and got["promoted"] == 2
    assert [stack.where(BlockKey(chain(i), 1)) for i in range(4)] == ["dram"] * 4
    assert stack.stats()["stack_promotions"] == promotions + 2
    again = api.post(f"{url}/symram/prefetch", json={"keys": hexes(range(2))}).json()
    assert again["promoted"] == 0 and again["dram_resident"] == 2
    after = api.post(f"{url}/symram/lookup", json={"keys": hexes(range(4))}).json()
    assert after == {"dram": 4, "disk": 2, "any": 4}


def test_prefetch_wait_is_bounded(stack):
    class SlowStack:
        """Delegates to the real stack; its prefetch never finishes in time."""

        def __init__(self) -> None:
            self.release = threading.Event()

        def where(self, key):
            return "disk"  # every key needs a promotion, which never finishes in time

        def stats(self):
            return stack.stats()

        def prefetch(self, keys):
            from concurrent.futures import Future

            fut: Future[int] = Future()
            threading.Thread(target=lambda: (self.release.wait(5), fut.set_result(0))).start()
            return fut

    slow = SlowStack()
    srv = ControlServer(slow, token=TOKEN, rank=0, info=INFO)
    url = srv.start(port=0)
    try:
        start = time.monotonic()
        got = api.post(f"{url}/symram/prefetch", json={"keys": hexes(range(2)), "wait_s": 0.2})
        assert time.monotonic() - start < 2.0
        assert got.json()["done"] is False and got.json()["dram_resident"] == 0
    finally:
        slow.release.set()
        srv.stop()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"keys": ["00" * 32, "zz" * 32]}, "keys[1]"),
        ({"keys": ["00" * 31]}, "keys[0]"),
        ({"keys": "00"}, "keys"),
        ({"keys": ["00" * 32], "wait_s": -1}, "wait_s"),
        ({"keys": ["00" * 32], "extra": 1}, "extra"),
        ({"keys": ["00" * 32] * (MAX_KEYS + 1)}, f"at most {MAX_KEYS}"),
    ],
)
def test_bad_bodies_are_422_naming_the_problem(server, body, needle):
    _, url, _ = server
    path = "/symram/prefetch" if "wait_s" in body else "/symram/lookup"
    response = api.post(f"{url}{path}", json=body)
    assert response.status_code == 422
    assert needle in response.json()["error"]["message"]


def test_port_taken_is_a_clear_error(stack):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            ControlServer(stack, token=TOKEN, info=INFO).start(port=port)


def test_stop_frees_the_port(stack):
    srv = ControlServer(stack, token=TOKEN, info=INFO)
    url = srv.start(port=0)
    port = int(url.rsplit(":", 1)[1])
    srv.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=1)
    again = ControlServer(stack, token=TOKEN, info=INFO)
    again.start(port=port)
    try:
        assert httpx.get(f"{again.url}/health").json() == {"ok": True}
    finally:
        again.stop()

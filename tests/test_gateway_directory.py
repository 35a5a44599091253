"""The gateway's prefix lookup from the shared directory: per-engine DRAM/disk/any runs
in one round trip (real redis-server and real Redis Cluster), the control endpoints as
fallback (unknown instance, Redis down), end to end through the gateway with engines
whose control endpoints are gone, and no torch on the directory code it imports."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest
import redis
from redis_fixtures import redis_cluster  # noqa: F401 - session fixture
from test_gateway_fakes import engines, gateway_config, route_of, running_gateway, tokenize

from symram_vllm.directory.locate import locate_command, parse_locate
from symram_vllm.directory.redis_directory import RedisDirectory
from symram_vllm.serving.gateway.backends import Backend, EngineInfo
from symram_vllm.serving.gateway.directory_locator import DirectoryLocator, make_locator
from symram_vllm.serving.gateway.locator import LocateQuery, PrefixHit, PrefixLocator

pytestmark = pytest.mark.timeout(120)

DIGEST = "ab" * 32


def chain(i: int, salt: str = "") -> bytes:
    import hashlib

    return hashlib.blake2b(f"{salt}/{i}".encode(), digest_size=32).digest()


def backend(name: str, instance: str | None = None, digest: str = DIGEST) -> Backend:
    b = Backend(name, f"http://{name}", f"http://{name}:1", 8, healthy=True, control_ok=True)
    b.info = EngineInfo(name if instance is None else instance, digest, 16)
    return b


def engine_dir(url: str, instance: str, digest: str = DIGEST) -> RedisDirectory:
    return RedisDirectory(url, namespace=bytes.fromhex(digest), instance_id=instance)


class Recorder(PrefixLocator):
    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    async def locate(self, queries):
        self.asked.append([q.backend.name for q in queries])
        return {q.backend.name: PrefixHit(0, 0, 1) for q in queries}


def run(coro):
    return asyncio.run(coro)


def test_runs_per_engine_and_tier_in_one_round_trip(redis_server):
    e0, e1 = engine_dir(redis_server.url, "e0"), engine_dir(redis_server.url, "e1")
    doc = [chain(i, "doc") for i in range(10)]
    e0.add(doc[:8], "dram")
    e0.add(doc[:3], "disk.abc")
    e1.add(doc[:4], "disk")
    e1.add(doc[4:6], "redis")  # shared tier: nobody's own advantage
    raw = redis.Redis.from_url(redis_server.url)

    def script_calls() -> int:
        return int(raw.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    async def scenario():
        locator = DirectoryLocator(redis_server.url, fallback=Recorder())
        try:
            before = script_calls()
            hits = await locator.locate([LocateQuery(backend("a", "e0"), doc),
                                         LocateQuery(backend("b", "e1"), doc),
                                         LocateQuery(backend("c", "e2"), doc)])
            return hits, script_calls() - before, locator.counters
        finally:
            await locator.aclose()

    hits, calls, counters = run(scenario())
    assert hits == {"a": PrefixHit(8, 3, 8), "b": PrefixHit(0, 4, 6), "c": PrefixHit(0, 0, 0)}
    assert calls <= 2 and counters["round_trips"] <= 2  # 2 only on first use (NOSCRIPT)
    assert counters["fallback"] == 0
    raw.close()
    e0.close()
    e1.close()


def test_engines_of_two_models_share_the_round_trip(redis_server):
    other = "cd" * 32
    e0, e1 = engine_dir(redis_server.url, "e0"), engine_dir(redis_server.url, "e1", other)
    doc = [chain(i, "m") for i in range(4)]
    e0.add(doc[:2], "dram")
    e1.add(doc, "dram")

    async def scenario():
        # The second locate is warm: 2 s, not the 0.25 s default, for a busy host.
        locator = DirectoryLocator(redis_server.url, timeout_s=2.0)
        try:
            await locator.locate([LocateQuery(backend("a", "e0"), doc)])  # loads the script
            trips = locator.counters["round_trips"]
            hits = await locator.locate([LocateQuery(backend("a", "e0"), doc),
                                         LocateQuery(backend("b", "e1", other), doc)])
            return hits, locator.counters["round_trips"] - trips
        finally:
            await locator.aclose()

    hits, trips = run(scenario())
    assert hits == {"a": PrefixHit(2, 0, 2), "b": PrefixHit(4, 0, 4)} and trips == 1
    e0.close()
    e1.close()


def test_engine_without_an_instance_id_asks_its_control_endpoint(redis_server):
    fallback = Recorder()

    async def scenario():
        locator = DirectoryLocator(redis_server.url, fallback=fallback)
        try:
            return await locator.locate([LocateQuery(backend("a", "e0"), [chain(1)]),
                                         LocateQuery(backend("anon", ""), [chain(1)])])
        finally:
            await locator.aclose()

    hits = run(scenario())
    assert fallback.asked == [["anon"]] and hits["anon"] == PrefixHit(0, 0, 1)
    assert hits["a"] == PrefixHit()


def test_redis_down_falls_back_with_one_timeout_per_breaker_window(redis_server):
    fallback = Recorder()
    redis_server.kill()

    async def scenario():
        locator = DirectoryLocator(redis_server.url, fallback=fallback, timeout_s=0.2,
                                   retry_after_s=30)
        try:
            start = time.monotonic()
            answers = [await locator.locate([LocateQuery(backend("a", "e0"), [chain(1)])])
                       for _ in range(20)]
            return answers, time.monotonic() - start, locator.counters
        finally:
            await locator.aclose()

    answers, elapsed, counters = run(scenario())
    assert all(a == {"a": PrefixHit(0, 0, 1)} for a in answers)
    assert counters["errors"] == 1 and len(fallback.asked) == 20
    assert elapsed < 1.5


def test_locate_on_a_redis_cluster(redis_cluster):  # noqa: F811
    url = redis_cluster.url
    e0 = RedisDirectory(url, namespace=bytes.fromhex(DIGEST), instance_id="e0")
    doc = [chain(i, "cl") for i in range(5)]
    e0.add(doc[:5], "dram")

    async def scenario():
        locator = DirectoryLocator(url)
        try:
            return await locator.locate([LocateQuery(backend("a", "e0"), doc),
                                         LocateQuery(backend("b", "e1"), doc)])
        finally:
            await locator.aclose()

    assert run(scenario()) == {"a": PrefixHit(5, 0, 5), "b": PrefixHit()}
    e0.close()


def test_parse_and_command_checks():
    command = locate_command(bytes.fromhex(DIGEST), [chain(1)], ["e0", "e1"])
    assert command.args()[2] == 1 and command.args()[-2:] == ["e0", "e1"]
    with pytest.raises(ValueError, match="instance id"):
        locate_command(bytes.fromhex(DIGEST), [chain(1)], ["bad|id"])
    assert parse_locate([1, 2, 3], ["e0"]) == {"e0": (1, 2, 3)}
    with pytest.raises(ValueError, match="answered 2 numbers"):
        parse_locate([1, 2], ["e0"])


def test_make_locator_without_and_with_a_url(redis_server):
    control = Recorder()
    assert make_locator(type("R", (), {"directory_url": None})(), control) is control
    bad = make_locator(type("R", (), {"directory_url": "http://nope"})(), control)
    assert bad is control
    good = make_locator(type("R", (), {"directory_url": redis_server.url})(), control)
    assert isinstance(good, DirectoryLocator) and good.fallback is control
    run(good.aclose())


def test_gateway_routes_by_directory_when_control_endpoints_are_slow(redis_server):
    """Fake engines whose control endpoints are gone once the gateway knows them: the
    control-endpoint lookup cannot answer; the directory does, and the repeats go to
    the holder."""
    text = "Shared system prompt for routing by directory. " * 6
    with engines("e0", "e1") as (a, b):
        config = gateway_config([a, b], routing={
            "directory_url": redis_server.url, "lookup_timeout_s": 0.05,
            # 2 s, not 0.25 s: one slow Redis answer on a busy host would send that
            # request to the (gone) control endpoints and route it by load.
            "directory_timeout_s": 2.0, "load_penalty_tokens": 0, "prefetch": False})
        holder = engine_dir(redis_server.url, "e1", a.signature)
        keys = b.keys(tokenize(text), None)
        assert keys
        holder.add(keys, "dram")
        with running_gateway(config) as (url, gateway):
            deadline = time.monotonic() + 10
            while not all(x.info for x in gateway.pool.backends):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            for engine in (a, b):  # busy engines: no control endpoint answers now
                engine.control.stop()
            routes = []
            for _ in range(6):
                response = httpx.post(f"{url}/v1/completions", timeout=10, json={
                    "model": "demo", "prompt": text, "max_tokens": 2})
                assert response.status_code == 200
                routes.append(route_of(response))
        assert all(r["instance"] == "e1" and r["reason"] == "prefix" for r in routes)
        assert gateway.locator.counters["directory"] >= 6
        holder.close()


def test_directory_code_the_gateway_uses_has_no_torch():
    # What directory_locator imports besides the gateway package itself (whose
    # config.py reaches torch through symram_vllm.config today: not this module's).
    code = ("import sys; import symram_vllm.directory.locate, symram_vllm.redis_link; "
            "import symram_vllm.directory.redis_settings, redis.asyncio.cluster; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm')); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stdout[-500:] + out.stderr[-500:]


def test_slow_directory_costs_a_few_requests_then_the_breaker_opens():
    import socket

    fallback = Recorder()
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"

        async def scenario():
            locator = DirectoryLocator(url, fallback=fallback, timeout_s=0.05,
                                       retry_after_s=30)
            try:
                start = time.monotonic()
                for _ in range(10):
                    await locator.locate([LocateQuery(backend("a", "e0"), [chain(1)])])
                return time.monotonic() - start, locator.counters
            finally:
                await locator.aclose()

        elapsed, counters = run(scenario())
    # Three slow answers in a row (each a fallback for its request) open the breaker.
    assert counters["errors"] == 3 and len(fallback.asked) == 10
    assert elapsed < 2.0

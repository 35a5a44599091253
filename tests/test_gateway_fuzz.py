"""Fuzzing the gateway (issue J, finding 8): at least 1,000 generated requests against
a running gateway in front of a fake engine; none may get a 5xx, drop the connection,
miss the request id, or get an error that is not OpenAI-shaped.

The inputs mix well-formed requests (so the proxy path runs), wrong types, hostile
JSON (deep nesting, lone UTF-16 surrogates, huge numbers), raw bytes, odd headers,
paths and methods. Derandomized, so CI runs the same 1,000 cases every time.
"""

from __future__ import annotations

import json
import string

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gateway_fakes import engines, gateway_config, running_gateway

CASES = 1000
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
         "/dashboard/data", "/v1/nothing", "/v1/completions/x"]

# Any code point, surrogates included: json.dumps turns those into \\udxxx escapes.
ANY_TEXT = st.text(st.characters(codec=None, categories=None), max_size=12)
SMALL_INT = st.one_of(st.integers(-3, 12), st.sampled_from([0, 10**9, 2**63, -(2**70)]))
SCALAR = st.one_of(st.none(), st.booleans(), SMALL_INT, st.floats(allow_nan=False),
                   ANY_TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(ANY_TEXT, inner, max_size=3)), max_leaves=8)
MESSAGE = st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from(["system", "user", "assistant"]), JSON),
    "content": st.one_of(ANY_TEXT, JSON)})
FIELDS = {
    "model": st.one_of(st.just("demo"), st.just("demo"), ANY_TEXT, JSON),
    "prompt": st.one_of(ANY_TEXT.filter(bool), st.lists(st.integers(0, 300), max_size=12),
                        st.lists(ANY_TEXT, max_size=3), JSON),
    "messages": st.one_of(st.lists(MESSAGE, min_size=1, max_size=3), JSON),
    "max_tokens": st.one_of(SMALL_INT, JSON),
    "max_completion_tokens": SMALL_INT,
    "n": st.one_of(st.integers(-1, 3), st.just(10**6)),
    "stream": st.one_of(st.booleans(), JSON),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), JSON),
    "cache_salt": st.one_of(ANY_TEXT, JSON),
    "user": st.one_of(ANY_TEXT, JSON),
    "temperature": SCALAR,
}
BODY_OBJECT = st.fixed_dictionaries({}, optional=FIELDS).flatmap(
    lambda known: st.dictionaries(ANY_TEXT, JSON, max_size=2).map(
        lambda extra: {**extra, **known}))


def _deep(depth: int) -> bytes:
    return b'{"model": "demo", "prompt": ' + b"[" * depth + b"]" * depth + b"}"


RAW_BODY = st.one_of(
    BODY_OBJECT.map(lambda obj: json.dumps(obj).encode()),
    BODY_OBJECT.map(lambda obj: json.dumps(obj).encode()),
    BODY_OBJECT.map(lambda obj: json.dumps(obj).encode()),
    st.binary(max_size=64),
    JSON.map(lambda value: json.dumps(value).encode()),
    st.integers(100, 5000).map(_deep),
    st.sampled_from([b"", b"{", b"null", b'{"model": "demo", "prompt": "\\ud800"}',
                     b'{"model": 1e999, "prompt": "x"}', b"\xff\xfe{}"]),
)
# h11 (the client) refuses header values with outer whitespace; the rest is fair game.
HEADER_TEXT = st.text(string.ascii_letters + string.digits + " -_.:/=", max_size=40).map(
    str.strip)
HEADERS = st.fixed_dictionaries({}, optional={
    "content-type": st.sampled_from(["application/json", "text/plain", "", "application/x"]),
    "x-request-id": HEADER_TEXT,
    "authorization": HEADER_TEXT,
    "x-session-id": HEADER_TEXT,
})
# Mostly valid requests too, with odd but legal values, so the proxy path is fuzzed
# as well as the validator.
TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
OPTIONAL = {"stream": st.booleans(), "cache_salt": TEXT, "user": TEXT,
            "n": st.integers(1, 2), "temperature": st.floats(0, 2),
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
            "extra_field": JSON}
VALID_COMPLETION = st.fixed_dictionaries({
    "model": st.just("demo"), "max_tokens": st.integers(1, 6),
    "prompt": st.one_of(TEXT, st.lists(st.integers(0, 300), min_size=1, max_size=12))},
    optional=OPTIONAL)
VALID_CHAT = st.fixed_dictionaries({
    "model": st.just("demo"), "max_tokens": st.integers(1, 6),
    "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": TEXT}),
                         min_size=1, max_size=3)}, optional=OPTIONAL)
REQUEST = st.one_of(
    st.tuples(st.just("POST"), st.just("/v1/completions"),
              VALID_COMPLETION.map(lambda b: json.dumps(b).encode()), HEADERS),
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"),
              VALID_CHAT.map(lambda b: json.dumps(b).encode()), HEADERS),
    st.tuples(st.just("POST"), st.sampled_from(PATHS[:2]), RAW_BODY, HEADERS),
    st.tuples(st.sampled_from(["POST", "GET", "PUT", "DELETE"]), st.sampled_from(PATHS),
              RAW_BODY, HEADERS),
)


@pytest.fixture(scope="module")
def fuzz_target():
    slow_polls = {"health_interval_s": 5, "stats_interval_s": 5}  # CPU for the cases
    with engines("a") as (a,), running_gateway(gateway_config(
            [a], limits={"max_body_bytes": 65536}, timeouts=slow_polls)) as (url, _), \
            httpx.Client(base_url=url, timeout=30) as client:
        yield client


def test_no_input_gets_a_5xx(fuzz_target):
    client = fuzz_target
    seen: dict[int, int] = {}

    @settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(REQUEST)
    def one(case: tuple[str, str, bytes, dict[str, str]]) -> None:
        method, path, body, headers = case
        response = client.request(method, path, content=body if method != "GET" else None,
                                  headers=headers)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case, response.text[:500])
        assert response.headers.get("x-request-id"), case
        if response.status_code >= 400:
            error = response.json()["error"]
            assert {"message", "type", "param", "code"} <= set(error), error
            assert isinstance(error["message"], str) and error["message"]

    one()
    assert sum(seen.values()) >= CASES
    # The mix reached the engine too, not only the validator.
    assert seen.get(200, 0) >= 100 and seen.get(400, 0) >= 100, seen

"""Proxy behaviour against fake engines over real HTTP: byte-faithful streams,
request ids, retries only before the first byte, in-flight limits, and client
disconnects reaching the engine."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from starlette.datastructures import Headers
from test_gateway_fakes import engines, gateway_config, route_of, running_gateway, wait_for

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello there, engine"}],
        "max_tokens": 5}
COMPLETION = {"model": "demo", "prompt": "def fibonacci(n):", "max_tokens": 4}


def raw_stream(url: str, path: str, body: dict, headers: dict | None = None
               ) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", f"{url}{path}", json=body, headers=headers, timeout=30) as resp:
        data = b"".join(resp.iter_raw())
    return resp, data


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT),
                                       ("/v1/completions", COMPLETION)])
@pytest.mark.parametrize("usage", [False, True])
def test_stream_is_byte_identical_to_the_engine(path, body, usage):
    body = {**body, "stream": True, "cache_salt": "abc", "priority": 0,
            "some_future_vllm_field": {"x": [1, 2]}}
    if usage:
        body["stream_options"] = {"include_usage": True}
    with engines("a") as (a,), running_gateway(gateway_config([a])) as (url, _):
        through, via_gateway = raw_stream(url, path, body)
        sent = a.received[-1]
        _, from_engine = raw_stream(a.url, path, body)
    assert through.status_code == 200
    assert via_gateway == from_engine
    assert through.headers["content-type"].startswith("text/event-stream")
    assert through.headers["x-engine"] == "a"  # engine headers are passed on
    events = [e for e in via_gateway.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    if usage:
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == body["max_tokens"]
    # Unknown vLLM fields reach the engine unchanged (auth off: cache_salt too).
    assert sent["some_future_vllm_field"] == {"x": [1, 2]}
    assert sent["cache_salt"] == "abc" and sent["priority"] == 0


def test_non_streaming_is_identical_and_request_id_round_trips():
    with engines("a") as (a,), running_gateway(gateway_config([a])) as (url, _):
        through = httpx.post(f"{url}/v1/chat/completions", json=CHAT,
                             headers={"X-Request-Id": "req-42"})
        direct = httpx.post(f"{a.url}/v1/chat/completions", json=CHAT)
        generated = httpx.post(f"{url}/v1/completions", json=COMPLETION)
        bogus = httpx.post(f"{url}/v1/completions", json=COMPLETION,
                           headers={"X-Request-Id": "bad id\twith spaces"})
    assert through.status_code == 200
    assert through.content == direct.content
    assert through.json()["choices"][0]["custom_vllm_field"] == [1, 2]
    assert through.headers["x-request-id"] == "req-42"
    assert a.headers[0]["x-request-id"] == "req-42"  # forwarded to the engine
    assert generated.headers["x-request-id"].startswith("symgw-")
    assert bogus.headers["x-request-id"].startswith("symgw-")
    assert route_of(through)["instance"] == "a"


def test_retry_on_another_engine_before_any_byte():
    with engines("a", "b") as (a, b):
        a.fail_status = 503
        config = gateway_config([a, b], routing={"max_retries": 1})
        with running_gateway(config) as (url, gw):
            # A session whose affinity is `a`: the first choice, before any prefix exists.
            session = next(s for s in (f"s{i}" for i in range(100)) if _affinity(gw, s) == "a")
            got = httpx.post(f"{url}/v1/completions", json={**COMPLETION, "user": session},
                             timeout=30)
            metrics = httpx.get(f"{url}/metrics").text
    assert got.status_code == 200
    route = route_of(got)
    assert route["instance"] == "b" and route["retry_of"] == "a"
    assert len(a.received) == 1 and len(b.received) == 1
    assert 'symram_gateway_retries_total{backend="b"} 1.0' in metrics
    assert 'symram_gateway_upstream_errors_total{backend="a",kind="http_503"} 1.0' in metrics


def _affinity(gw, session: str) -> str:
    from symram_vllm.serving.gateway.routing import _rendezvous

    key = f"{gw.auth.authenticate(Headers(), '127.0.0.1').key_id}:{session}"
    return max(gw.pool.backends, key=lambda b: _rendezvous(key, b)).name


def test_dead_engine_is_retried_and_ejected():
    with engines("a", "b") as (a, b):
        config = gateway_config([a, b], timeouts={"health_interval_s": 30})
        with running_gateway(config) as (url, _):
            a.server.stop()  # connection refused from now on; health checks are far away
            results = [httpx.post(f"{url}/v1/completions", json=COMPLETION, timeout=30)
                       for _ in range(4)]
            health = httpx.get(f"{url}/dashboard/data").json()
    assert [r.status_code for r in results] == [200] * 4
    assert all(route_of(r)["instance"] == "b" for r in results)
    assert {x["name"]: x["healthy"] for x in health["instances"]} == {"a": False, "b": True}
    assert len(b.received) == 4


def test_no_retry_once_bytes_were_sent():
    with engines("a", "b") as (a, b):
        for engine in (a, b):
            engine.break_after_chunks = 2
        with running_gateway(gateway_config([a, b])) as (url, _):
            resp, data = raw_stream(url, "/v1/completions", {**COMPLETION, "stream": True,
                                                            "max_tokens": 6})
    served = a if a.received else b
    other = b if served is a else a
    assert resp.status_code == 200
    assert other.received == []  # never retried elsewhere: the client had bytes already
    events = [e for e in data.split(b"\n\n") if e]
    assert len(events) == 3  # two real chunks, then the gateway's in-band error
    assert json.loads(events[-1][6:])["error"]["type"] == "upstream_error"


def test_inflight_limit_gives_429_with_retry_after():
    with engines("a") as (a,):
        a.chunk_delay = 0.3
        config = gateway_config([a], limits={"max_inflight_per_instance": 1,
                                             "retry_after_s": 3})
        with running_gateway(config) as (url, gw):
            # Held 3 s (10 chunks, 0.3 s apart): the refused request has that long to
            # arrive, on a busy host too.
            holder = threading.Thread(target=raw_stream, args=(
                url, "/v1/completions", {**COMPLETION, "stream": True, "max_tokens": 10}))
            holder.start()
            assert wait_for(lambda: gw.pool.backends[0].inflight == 1)
            refused = httpx.post(f"{url}/v1/completions", json=COMPLETION)
            holder.join(30)
            assert wait_for(lambda: gw.pool.backends[0].inflight == 0)
            later = httpx.post(f"{url}/v1/completions", json=COMPLETION)
            metrics = httpx.get(f"{url}/metrics").text
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "3"
    error = refused.json()["error"]
    assert error["code"] == "engine_overloaded" and "in-flight limit" in error["message"]
    assert later.status_code == 200
    assert 'symram_gateway_rejections_total{reason="inflight"} 1.0' in metrics


def test_client_disconnect_mid_stream_aborts_the_engine():
    with engines("a") as (a,):
        a.chunk_delay = 0.2
        with running_gateway(gateway_config([a])) as (url, gw):
            with httpx.stream("POST", f"{url}/v1/completions",
                              json={**COMPLETION, "stream": True, "max_tokens": 200},
                              timeout=30) as resp:
                chunks = resp.iter_raw()
                next(chunks)
                next(chunks)
            # The client closed its connection after two chunks.
            assert wait_for(lambda: a.aborted == 1, timeout=10)
            assert a.active == 0 and a.completed == 0
            assert wait_for(lambda: gw.pool.backends[0].inflight == 0)
            metrics = httpx.get(f"{url}/metrics").text
    assert 'symram_gateway_client_disconnects_total{endpoint="completions"} 1.0' in metrics


def test_hanging_up_after_done_is_not_a_disconnect():
    # Clients (the openai SDK among them) may close as soon as they read `[DONE]`,
    # before the engine's body formally ends: the generation was not abandoned.
    with engines("a") as (a,):
        a.after_done_delay = 0.5
        with running_gateway(gateway_config([a])) as (url, gw):
            with httpx.stream("POST", f"{url}/v1/completions",
                              json={**COMPLETION, "stream": True}, timeout=30) as resp:
                seen = b""
                for chunk in resp.iter_raw():
                    seen += chunk
                    if b"[DONE]" in seen:
                        break
            assert wait_for(lambda: gw.pool.backends[0].inflight == 0)
            metrics = httpx.get(f"{url}/metrics").text
    assert 'symram_gateway_client_disconnects_total{endpoint="completions"} 1.0' \
        not in metrics
    # Counted as a completed stream (the engine's trailing close is not the client's).
    assert 'symram_gateway_e2e_seconds_count{backend="a",endpoint="completions",' \
        'stream="true"} 1.0' in metrics


def test_client_disconnect_while_waiting_for_a_non_streamed_reply():
    with engines("a") as (a,):
        a.prefill_delay = 30
        with running_gateway(gateway_config([a])) as (url, gw):
            # The client hangs up once the engine has the request (a fixed 1 s client
            # timeout could expire first on a busy host: nothing for the engine to abort).
            body = json.dumps(COMPLETION).encode()
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: gateway\r\n"
                             b"content-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                assert wait_for(lambda: len(a.received) == 1, timeout=30)
                assert a.aborted == 0
            assert wait_for(lambda: a.aborted == 1, timeout=10)
            assert a.completed == 0
            assert wait_for(lambda: gw.pool.backends[0].inflight == 0)


def test_engine_error_bodies_pass_through():
    with engines("a") as (a,):
        a.fail_status = 400
        with running_gateway(gateway_config([a])) as (url, _):
            got = httpx.post(f"{url}/v1/completions", json=COMPLETION)
            streamed, data = raw_stream(url, "/v1/completions", {**COMPLETION, "stream": True})
    assert got.status_code == 400 and got.json()["error"]["message"] == "fake failure"
    assert streamed.status_code == 400 and json.loads(data)["error"]["code"] == 400


def test_ttft_and_e2e_are_measured():
    with engines("a") as (a,):
        a.chunk_delay = 0.05
        with running_gateway(gateway_config([a])) as (url, _):
            start = time.monotonic()
            raw_stream(url, "/v1/chat/completions", {**CHAT, "stream": True})
            elapsed = time.monotonic() - start
            httpx.post(f"{url}/v1/completions", json=COMPLETION)
            metrics = httpx.get(f"{url}/metrics").text
    ttft = _sample(metrics, 'symram_gateway_ttft_seconds_sum{backend="a",endpoint="chat"}')
    e2e = _sample(metrics,
                  'symram_gateway_e2e_seconds_sum{backend="a",endpoint="chat",stream="true"}')
    assert 0.05 <= ttft < e2e <= elapsed + 0.05
    assert _sample(metrics, 'symram_gateway_e2e_seconds_count{backend="a",'
                            'endpoint="completions",stream="false"}') == 1.0


def _sample(metrics: str, prefix: str) -> float:
    line = next(x for x in metrics.splitlines() if x.startswith(prefix))
    return float(line.rsplit(" ", 1)[1])


def test_engine_timeout_is_504_and_not_retried():
    with engines("a", "b") as (a, b):
        for engine in (a, b):
            engine.prefill_delay = 5
        config = gateway_config([a, b], timeouts={"read_s": 0.5})
        with running_gateway(config) as (url, gw):
            start = time.monotonic()
            got = httpx.post(f"{url}/v1/completions", json=COMPLETION, timeout=30)
            elapsed = time.monotonic() - start
            healthy = [x.healthy for x in gw.pool.backends]
    assert got.status_code == 504 and got.json()["error"]["code"] == "upstream_timeout"
    assert elapsed < 4
    assert len(a.received) + len(b.received) == 1  # a slow engine is not a dead one
    assert healthy == [True, True]

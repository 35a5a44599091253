"""Routing: the decision rules in isolation, then end to end against fake engines whose
control endpoints answer from real tier stacks (prefix, load, affinity, prefetch,
health ejection and readmission, model aggregation)."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
from test_gateway_fakes import (
    BLOCK,
    engines,
    gateway_config,
    route_of,
    running_gateway,
    tokenize,
    wait_for,
)

from symram_vllm.keys import BlockKey
from symram_vllm.serving.gateway.backends import Backend, EngineInfo
from symram_vllm.serving.gateway.config import RoutingConfig
from symram_vllm.serving.gateway.locator import PrefixHit
from symram_vllm.serving.gateway.routing import Router

LONG = "The quick brown fox jumps over the lazy dog. " * 4  # 180 chars = 45 blocks


def backend(name: str, inflight: int = 0, max_inflight: int = 8, block: int = 16) -> Backend:
    b = Backend(name, f"http://{name}", f"http://{name}:1", max_inflight, healthy=True,
                control_ok=True, inflight=inflight)
    b.info = EngineInfo(name, "00" * 32, block)
    return b


# -- decision rules ---------------------------------------------------------------------------
def test_longest_prefix_wins_when_load_is_equal():
    router = Router(RoutingConfig())
    a, b, c = backend("a"), backend("b"), backend("c")
    hits = {"a": PrefixHit(2, 0, 2), "b": PrefixHit(0, 9, 9), "c": PrefixHit()}
    decision = router.choose([a, b, c], hits)
    assert decision is not None
    assert (decision.backend.name, decision.reason, decision.matched_blocks) == ("b", "prefix", 9)
    assert decision.header() == "instance=b;reason=prefix;matched_blocks=9;dram_blocks=0"
    assert decision.matched_tokens == 9 * 16


def test_dram_counts_more_than_disk():
    router = Router(RoutingConfig(disk_weight=0.5))
    a, b = backend("a"), backend("b")
    # 6 in DRAM beats 10 on disk at half weight (6 > 5)
    decision = router.choose([a, b], {"a": PrefixHit(6, 0, 6), "b": PrefixHit(0, 10, 10)})
    assert decision is not None and decision.backend.name == "a"


def test_load_outweighs_a_short_prefix():
    router = Router(RoutingConfig(load_penalty_tokens=100))
    busy, idle = backend("busy", inflight=5), backend("idle")
    # 2 blocks x 16 tokens = 32 matched tokens < 5 x 100 tokens of load
    short = router.choose([busy, idle], {"busy": PrefixHit(2, 0, 2)})
    assert short is not None and (short.backend.name, short.reason) == ("idle", "load")
    # 40 blocks = 640 tokens > 500: worth queueing behind the load
    long = router.choose([busy, idle], {"busy": PrefixHit(40, 0, 40)})
    assert long is not None and (long.backend.name, long.reason) == ("busy", "prefix")


def test_affinity_is_stable_and_spreads_sessions():
    router = Router(RoutingConfig())
    pool = [backend(n) for n in "abcd"]
    first = {f"s{i}": router.choose(pool, {}, f"s{i}") for i in range(200)}
    assert all(d is not None and d.reason == "affinity" for d in first.values())
    again = {s: router.choose(pool, {}, s) for s in first}
    assert all(first[s].backend is again[s].backend for s in first)  # type: ignore[union-attr]
    spread = Counter(d.backend.name for d in first.values())  # type: ignore[union-attr]
    assert set(spread) == set("abcd") and min(spread.values()) > 20
    # Removing one engine moves only that engine's sessions.
    smaller = [b for b in pool if b.name != "d"]
    moved = [s for s, d in first.items()
             if router.choose(smaller, {}, s).backend is not d.backend]  # type: ignore[union-attr]
    assert len(moved) == spread["d"]


def test_least_loaded_and_limits():
    router = Router(RoutingConfig())
    a, b, c = backend("a", inflight=3), backend("b", inflight=1), backend("c", inflight=1)
    picks = {router.choose([a, b, c], {}).backend.name for _ in range(4)}  # type: ignore[union-attr]
    assert picks == {"b", "c"}  # ties alternate; the busy one is never picked
    full = backend("full", inflight=2, max_inflight=2)
    only = router.choose([full, a], {"full": PrefixHit(50, 0, 50)})
    assert only is not None and (only.backend.name, only.reason) == ("a", "single")
    assert router.choose([full], {}) is None
    assert router.choose([a, b], {}, exclude=("a", "b")) is None


# -- end to end with fake engines ---------------------------------------------------------------
def post(url: str, prompt: str, **extra) -> httpx.Response:
    response = httpx.post(f"{url}/v1/completions", timeout=30,
                          json={"model": "demo", "prompt": prompt, "max_tokens": 2, **extra})
    assert response.status_code == 200, response.text
    return response


def test_request_goes_to_the_engine_holding_its_prefix():
    with engines("a", "b", "c") as fakes, running_gateway(gateway_config(fakes)) as (url, gw):
        holder = fakes[1]
        holder.store_prompt(tokenize(LONG), None)  # b served this prefix before
        got = post(url, LONG + " and then some more text")
        route = route_of(got)
        assert route == {"instance": "b", "reason": "prefix", "matched_blocks": "45",
                         "dram_blocks": "45"}
        # A prompt nobody holds is routed by load; the one who served it now holds it.
        fresh = "A completely different prompt about sailing boats and the sea."
        first = route_of(post(url, fresh))
        assert first["reason"] == "least_loaded"
        second = route_of(post(url, fresh + " More."))
        assert second["instance"] == first["instance"] and second["reason"] == "prefix"
        metrics = httpx.get(f"{url}/metrics").text
    assert 'symram_gateway_route_decisions_total{backend="b",reason="prefix"} 1.0' in metrics
    assert f'symram_gateway_matched_prefix_tokens_by_backend_total{{backend="b"}} ' \
           f'{45.0 * BLOCK}' in metrics
    assert gw.route_counts["prefix"] == 2


def test_chat_requests_are_keyed_through_the_engine_tokenizer():
    from test_gateway_fakes import render_chat

    messages = [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]
    with engines("a", "b") as fakes, running_gateway(gateway_config(fakes)) as (url, _):
        fakes[0].store_prompt(tokenize(render_chat(messages)), None)
        got = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                         json={"model": "demo", "messages": messages, "max_tokens": 2})
        tokenize_calls = sum(f.tokenize_calls for f in fakes)
    assert route_of(got)["instance"] == "a" and route_of(got)["reason"] == "prefix"
    assert tokenize_calls == 1


def test_a_slow_tokenizer_costs_the_prefix_route_and_is_counted():
    """/tokenize past its budget: the request is still served, routed without its
    prefix, and the failure is counted where an operator looks."""
    with engines("a", "b") as fakes, running_gateway(gateway_config(
            fakes, routing={"tokenize_timeout_s": 0.2})) as (url, _):
        fakes[0].store_prompt(tokenize(LONG), None)
        for fake in fakes:
            fake.tokenize_delay = 2.0
        slow = route_of(post(url, LONG))
        for fake in fakes:
            fake.tokenize_delay = 0.0
        fast = route_of(post(url, LONG))
        metrics = httpx.get(f"{url}/metrics").text
    assert slow["reason"] == "least_loaded" and slow["matched_blocks"] == "0"
    assert fast == {"instance": "a", "reason": "prefix", "matched_blocks": "45",
                    "dram_blocks": "45"}
    assert 'kind="tokenize_timeout"} 1.0' in metrics


def test_token_id_prompts_need_no_tokenize_call():
    ids = tokenize(LONG)
    with engines("a", "b") as fakes, running_gateway(gateway_config(fakes)) as (url, _):
        fakes[1].store_prompt(ids, None)
        got = httpx.post(f"{url}/v1/completions", timeout=30,
                         json={"model": "demo", "prompt": [*ids, 1, 2], "max_tokens": 2})
        assert sum(f.tokenize_calls for f in fakes) == 0
    assert route_of(got)["instance"] == "b"


def test_session_affinity_without_a_prefix():
    with engines("a", "b", "c") as fakes, running_gateway(gateway_config(fakes)) as (url, _):
        seen = {route_of(httpx.post(
            f"{url}/v1/completions", timeout=30,
            headers={"x-session-id": "conversation-1"},
            json={"model": "demo", "prompt": f"s{i}", "max_tokens": 1}))["instance"]
            for i in range(5)}
        by_user = {route_of(post(url, f"t{i}", user="alice"))["reason"] for i in range(3)}
    assert len(seen) == 1  # prompts shorter than a block: affinity decides every time
    assert by_user == {"affinity"}


def test_prefetch_on_arrival_promotes_the_disk_part(tmp_path):
    with engines("a", dram_pages=8, disk_path=tmp_path / "disk") as (a,):
        keys = a.store_prompt(tokenize(LONG), None)  # 45 pages; DRAM keeps the last 8
        assert a.stack.disk is not None
        a.stack.disk.flush()
        head = [a.stack.where(BlockKey(k, 0)) for k in keys[:3]]
        assert head == ["disk"] * 3
        # Room for the promoted pages so none of them is evicted again at once.
        for k in keys[-8:]:
            assert a.stack.dram.delete(BlockKey(k, 0))
        with running_gateway(gateway_config([a], routing={"prefetch_wait_s": 5})) as (url, _):
            got = post(url, LONG[: 8 * BLOCK])  # the first 8 blocks, all on disk
            metrics = httpx.get(f"{url}/metrics").text
        assert [a.stack.where(BlockKey(k, 0)) for k in keys[:8]] == ["dram"] * 8
        assert a.stack.stats()["stack_prefetched"] == 8
    assert got.headers["x-symram-prefetch"] == "requested=8;resident=8"
    assert route_of(got)["dram_blocks"] == "0" and route_of(got)["matched_blocks"] == "8"
    assert 'symram_gateway_prefetched_blocks_total{backend="a"} 8.0' in metrics
    assert 'symram_gateway_prefetches_total{backend="a",outcome="complete"} 1.0' in metrics


def test_unhealthy_engine_is_ejected_then_readmitted():
    with engines("a", "b") as (a, b), running_gateway(gateway_config([a, b])) as (url, gw):
        a.healthy = False
        assert wait_for(lambda: not gw.pool.by_name("a").healthy)
        routed = {route_of(post(url, f"x{i}"))["instance"] for i in range(4)}
        assert routed == {"b"}
        state = httpx.get(f"{url}/dashboard/data").json()
        assert [x["healthy"] for x in state["instances"]] == [False, True]
        b.healthy = False
        assert wait_for(lambda: not gw.pool.by_name("b").healthy)
        down = httpx.get(f"{url}/health")
        refused = httpx.post(f"{url}/v1/completions",
                             json={"model": "demo", "prompt": "x", "max_tokens": 1})
        a.healthy = True
        assert wait_for(lambda: gw.pool.by_name("a").healthy)
        back = route_of(post(url, "y"))
    assert down.status_code == 503 and down.json()["error"]["code"] == "no_healthy_backend"
    assert refused.status_code == 503 and "No healthy engine" in refused.json()["error"]["message"]
    assert back["instance"] == "a"


def test_models_are_aggregated_and_requests_go_where_the_model_is():
    with engines("a") as (a,), engines("b", models=("demo", "other")) as (b,), \
            running_gateway(gateway_config([a, b])) as (url, _):
        models = httpx.get(f"{url}/v1/models").json()
        routed = {route_of(httpx.post(
            f"{url}/v1/completions", timeout=30,
            json={"model": "other", "prompt": f"p{i}", "max_tokens": 1}))["instance"]
            for i in range(3)}
    assert models["object"] == "list"
    assert sorted(m["id"] for m in models["data"]) == ["demo", "other"]
    assert routed == {"b"}


@pytest.mark.parametrize("control", [False, True])
def test_engines_without_control_still_serve(control):
    with engines("a", "b", control=control) as fakes, \
            running_gateway(gateway_config(fakes)) as (url, gw):
        if control:
            fakes[0].control.stop()  # type: ignore[union-attr]
        fakes[0].store_prompt(tokenize(LONG), None)
        results = [route_of(post(url, LONG)) for _ in range(2)]
        assert gw.pool.by_name("a").control_url == (fakes[0].control_url if control else None)
    # Without a's answer nobody is known to hold the prefix: plain load balancing.
    assert [r["reason"] for r in results] == ["least_loaded"] * 2
    assert {r["instance"] for r in results} == {"a", "b"}
    assert all(r["matched_blocks"] == "0" for r in results)

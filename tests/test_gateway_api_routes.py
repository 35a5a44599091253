"""Responses / Messages support in the gateway without an engine: rendering into chat
messages, body checks, stream observation and response ownership. The real-engine
tests are in tests/integration/test_gateway_apis.py."""

from __future__ import annotations

import json

import pytest

from symram_vllm.serving.gateway.api_routes import (
    ResponseOwners,
    check_body,
    completion_budget,
    usage_total,
)
from symram_vllm.serving.gateway.errors import GatewayError
from symram_vllm.serving.gateway.prompt import (
    anthropic_messages,
    responses_messages,
    tokenize_request,
)
from symram_vllm.serving.gateway.proxy import StreamObserver


def test_responses_render_as_vllm_builds_them():
    assert responses_messages({"input": "hi", "instructions": "be brief"}) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    items = [{"role": "user", "content": [{"type": "input_text", "text": "a"}]},
             {"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": "b"}]}]
    assert responses_messages({"input": items}) == [
        {"role": "user", "content": [{"type": "text", "text": "a"}]},
        {"role": "assistant", "content": "b"}]


@pytest.mark.parametrize("body", [
    {"input": "x", "previous_response_id": "resp_1"},  # history lives in the engine
    {"input": "x", "tools": [{"type": "function", "name": "f"}]},
    {"input": [{"type": "function_call_output", "call_id": "c", "output": "o"}]},
    {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
    {"input": []},
])
def test_responses_the_gateway_cannot_render_get_no_keys(body):
    assert responses_messages(body) is None
    assert tokenize_request("responses", {"model": "m", **body}) is None


def test_messages_render_as_vllm_builds_them():
    body = {"system": [{"type": "text", "text": "x-anthropic-billing-header: 123"},
                       {"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
            "messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
                         {"role": "user", "content": [{"type": "text", "text": "1"},
                                                      {"type": "text", "text": "2"}]}]}
    assert anthropic_messages(body) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": [{"type": "text", "text": "1"},
                                     {"type": "text", "text": "2"}]}]
    request = tokenize_request("messages", {"model": "m", **body})
    assert isinstance(request, dict) and request["model"] == "m"
    assert request["messages"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "system", "content": "inline"}, {"role": "user", "content": "q"}]},
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
    {"messages": [{"role": "user", "content": "q"}], "tools": [{"name": "f"}]},
    {"messages": [{"role": "user", "content": "q"}], "thinking": {"type": "enabled"}},
])
def test_messages_the_gateway_cannot_render_get_no_keys(body):
    assert anthropic_messages(body) is None


@pytest.mark.parametrize(("endpoint", "body", "param"), [
    ("responses", {"input": ""}, "input"),
    ("responses", {"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ("responses", {"input": "x", "instructions": 3}, "instructions"),
    ("messages", {"messages": []}, "messages"),
    ("messages", {"messages": [{"role": "user", "content": "x"}], "system": 1}, "system"),
    ("embeddings", {}, "input"),
    ("tokenize", {"prompt": 5}, "prompt"),
    ("detokenize", {"tokens": ["a"]}, "tokens"),
])
def test_bad_bodies_are_400_naming_the_field(endpoint, body, param):
    with pytest.raises(GatewayError) as caught:
        check_body(endpoint, body)
    assert caught.value.status == 400 and caught.value.param == param


def test_max_output_tokens_respects_the_gateways_cap():
    check_body("responses", {"input": "x", "max_output_tokens": 64}, cap=64)
    with pytest.raises(GatewayError) as caught:
        check_body("responses", {"input": "x", "max_output_tokens": 65}, cap=64)
    assert caught.value.param == "max_output_tokens" and "64" in caught.value.message


def test_budget_and_usage_across_apis():
    assert completion_budget({"max_output_tokens": 7}) == 7
    assert completion_budget({"max_tokens": 5}) == 5
    assert completion_budget({}) is None
    assert usage_total({"total_tokens": 9}) == 9
    assert usage_total({"input_tokens": 3, "output_tokens": 4}) == 7
    assert usage_total({"input_tokens": 3}) is None and usage_total(None) is None


def sse(events: list[tuple[str, dict]]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                    for name, data in events)


def test_observer_reads_a_responses_stream():
    obs = StreamObserver(started=0.0)
    stream = sse([
        ("response.created", {"type": "response.created",
                              "response": {"id": "resp_9", "usage": None}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "x"}),
        ("response.completed", {"type": "response.completed", "response": {
            "id": "resp_9", "usage": {"input_tokens": 3, "output_tokens": 1,
                                      "total_tokens": 4}}}),
    ])
    for i in range(0, len(stream), 7):  # any chunking
        obs.feed(stream[i:i + 7])
    assert obs.response_id == "resp_9" and obs.first_content_at is not None
    assert obs.usage == {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}
    assert obs.done


def test_observer_reads_a_messages_stream():
    obs = StreamObserver(started=0.0)
    obs.feed(sse([
        ("message_start", {"type": "message_start",
                           "message": {"usage": {"input_tokens": 11, "output_tokens": 0}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0}),
        ("content_block_delta", {"type": "content_block_delta",
                                 "delta": {"type": "text_delta", "text": "a"}}),
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 8}}),
    ]))
    assert obs.first_content_at is not None and not obs.done
    assert usage_total(obs.usage) == 19
    obs.feed(sse([("message_stop", {"type": "message_stop"})]))
    assert obs.done and obs.response_id is None


def test_response_owners_are_bounded_and_learned_from_bodies():
    owners = ResponseOwners(capacity=2)
    owners.learn_from_body(json.dumps({"object": "response", "id": "r1"}).encode(), "e0")
    owners.learn_from_body(b"not json", "e0")
    owners.learn_from_body(json.dumps({"object": "chat.completion", "id": "c"}).encode(), "e0")
    owners.remember("r2", "e1")
    assert owners.owner("r1") == "e0"  # now the most recent
    owners.remember("r3", "e1")
    assert owners.owner("r2") is None and owners.owner("r1") == "e0"
    assert owners.owner(None) is None and owners.owner("c") is None

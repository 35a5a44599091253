"""The official OpenAI client, streaming and not, against `symram serve`."""

from __future__ import annotations

import pytest
from openai import OpenAI

from symram_vllm.serving.engine_process import EngineServer

pytestmark = pytest.mark.engine

SYSTEM = "You are a Python interpreter. " + " ".join(f"def helper_{i}(x): return x + {i}"
                                                       for i in range(120))


@pytest.fixture(scope="module")
def server(tiny_model, artifacts_dir):
    with EngineServer(tiny_model, artifacts_dir / "engine_openai.log") as srv:
        yield srv


def stream_text(client: OpenAI, messages: list[dict]) -> tuple[str, dict | None]:
    text, usage = "", None
    stream = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return text, usage


def test_streaming_and_non_streaming_agree_and_reuse_kv(server):
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["demo"]
    conversations = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"call helper_{i}"}]
        for i in range(6)
    ]
    plain = [
        client.chat.completions.create(
            model="demo", messages=m, max_tokens=16, temperature=0
        ).choices[0].message.content
        for m in conversations
    ]
    streamed = [stream_text(client, m) for m in conversations]
    assert [text for text, _ in streamed] == plain
    assert all(usage and usage["completion_tokens"] > 0 for _, usage in streamed)
    # The shared system prompt is long; later conversations reuse its KV.
    assert all(usage["prompt_tokens_details"]["cached_tokens"] > 0 for _, usage in streamed[1:])
    assert server.metrics().get("symram:saved_blocks_total", 0.0) > 0

"""The prompt's token ids, exactly as the engine will see them.

The gateway asks an engine's own ``POST /tokenize`` rather than loading the tokenizer
itself: that is the same tokenizer, chat template, template arguments and special-token
rules vLLM applies when it serves the request (chat: template adds BOS,
``add_special_tokens`` false; completions: true), for any model, with no model files
and no transformers import in the gateway. It costs one local round trip (~1-3 ms);
when it fails or is slow the request is routed without prefix information, never
refused. Token-id prompts need no call.

``/v1/responses`` and ``/v1/messages`` requests are first rewritten into the chat
messages vLLM itself renders them into (``vllm/entrypoints/openai/responses/utils.py``
``construct_input_messages``; ``vllm/entrypoints/anthropic/serving.py``
``to_chat_completion_request``), for text conversations. What that rewrite cannot
reproduce exactly (tools, images, thinking options, a stored ``previous_response_id``
history, inline system turns) gets no keys: such a request is routed by affinity or
load, never refused, and never served a wrong prefix (the engine checks its own hashes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx

from symram_vllm.serving.gateway.backends import Backend

logger = logging.getLogger("symram.gateway")

# Fields of a chat request that change how vLLM renders it into tokens.
CHAT_TEMPLATE_FIELDS = (
    "add_generation_prompt", "continue_final_message", "add_special_tokens", "chat_template",
    "chat_template_kwargs", "tools", "mm_processor_kwargs",
)


def _token_ids(value: Any) -> list[int] | None:
    if isinstance(value, list) and value and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        return value
    return None


def _text(value: Any) -> str | None:
    """A string, or the text of a list of text blocks; None for anything else."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        return None
    parts = []
    for block in value:
        if not isinstance(block, dict) or block.get("type") not in ("text", "input_text",
                                                                    "output_text"):
            return None
        if not isinstance(block.get("text"), str):
            return None
        parts.append(block)
    return None if not parts else "".join(b["text"] for b in parts)


def responses_messages(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The chat messages vLLM builds from a text-only Responses request."""
    if body.get("previous_response_id") or body.get("tools") or body.get("reasoning") \
            or body.get("prompt") is not None:
        return None
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions:
        if not isinstance(instructions, str):
            return None
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        return None
    for item in given:
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            return None
        role, content = item.get("role"), item.get("content")
        if role not in ("user", "assistant", "system", "developer"):
            return None
        if role == "assistant":  # vLLM keeps only the first part's text
            text = content if isinstance(content, str) else (
                content[0].get("text") if isinstance(content, list) and content
                and isinstance(content[0], dict) else None)
            if not isinstance(text, str):
                return None
            if messages and messages[-1].get("role") == "assistant" and \
                    messages[-1].get("content") is None:
                return None
            messages.append({"role": "assistant", "content": text})
        else:  # passed to the chat renderer as given; it reads input_text as text
            if _text(content) is None:
                return None
            message = {k: v for k, v in item.items() if k != "type"}
            if isinstance(content, list):  # /tokenize's schema knows only "text" parts
                message["content"] = [{"type": "text", "text": b["text"]} for b in content]
            messages.append(message)
    return messages


BILLING_HEADER = "x-anthropic-billing-header"


def anthropic_messages(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The chat messages vLLM builds from a text-only Anthropic Messages request."""
    if body.get("tools") or body.get("thinking") or body.get("output_config"):
        return None
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        if isinstance(system, str):
            text = system
        elif isinstance(system, list):
            blocks = [b for b in system if isinstance(b, dict)]
            if len(blocks) != len(system) or any(b.get("type") != "text" for b in blocks):
                return None
            text = "".join(str(b.get("text") or "") for b in blocks
                           if not str(b.get("text") or "").startswith(BILLING_HEADER))
        else:
            return None
        if text:
            messages.append({"role": "system", "content": text})
    given = body.get("messages")
    if not isinstance(given, list):
        return None
    for msg in given:
        if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
            return None  # inline system turns depend on the chat template
        content = msg.get("content")
        if isinstance(content, str):
            messages.append({"role": msg["role"], "content": content})
            continue
        if _text(content) is None:
            return None
        parts = [{"type": "text", "text": b["text"]} for b in content if b.get("text")]
        if not parts:
            if msg["role"] == "user":
                continue  # vLLM drops a user turn with no content
            messages.append({"role": "assistant"})
        elif len(parts) == 1:
            messages.append({"role": msg["role"], "content": parts[0]["text"]})
        else:
            messages.append({"role": msg["role"], "content": parts})
    return messages


def chat_messages(endpoint: str, body: dict[str, Any]) -> list[Any] | None:
    if endpoint == "chat":
        messages = body.get("messages")
        return messages if isinstance(messages, list) else None
    if endpoint == "responses":
        return responses_messages(body)
    if endpoint == "messages":
        return anthropic_messages(body)
    return None


def tokenize_request(endpoint: str, body: dict[str, Any]) -> dict[str, Any] | list[int] | None:
    """The /tokenize body for this request, its token ids when it already carries them,
    or None when it has no prompt the gateway can key (e.g. prompt embeddings)."""
    model = body.get("model")
    if endpoint in ("chat", "responses", "messages"):
        messages = chat_messages(endpoint, body)
        if not messages:
            return None
        out = {"model": model, "messages": messages}
        if endpoint == "chat":
            out.update({k: body[k] for k in CHAT_TEMPLATE_FIELDS if k in body})
        return out
    if endpoint != "completions":
        return None
    prompt = body.get("prompt")
    ids = _token_ids(prompt)
    if ids is not None:
        return ids
    if isinstance(prompt, list) and prompt:  # a batch: route by its first prompt
        prompt = prompt[0]
        ids = _token_ids(prompt)
        if ids is not None:
            return ids
    if not isinstance(prompt, str) or not prompt:
        return None
    return {"model": model, "prompt": prompt,
            "add_special_tokens": bool(body.get("add_special_tokens", True))}


async def prompt_tokens(
    client: httpx.AsyncClient,
    backend: Backend,
    endpoint: str,
    body: dict[str, Any],
    timeout_s: float,
    headers: dict[str, str] | None = None,
    on_failure: Callable[[Backend, str], None] | None = None,
) -> list[int] | None:
    """The prompt's token ids, or None when it has none the gateway can key or the
    engine's /tokenize failed (`on_failure(backend, kind)` is told: the request is
    then routed without its prefix)."""
    request = tokenize_request(endpoint, body)
    if request is None or isinstance(request, list):
        return request
    try:
        response = await client.post(f"{backend.url}/tokenize", json=request,
                                     timeout=timeout_s, headers=headers)
        response.raise_for_status()
        tokens = response.json()["tokens"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        logger.debug("tokenize on %s failed: %r", backend.name, exc)
        if on_failure is not None:
            timed_out = isinstance(exc, httpx.TimeoutException)
            on_failure(backend, "tokenize_timeout" if timed_out else "tokenize")
        return None
    return _token_ids(tokens) or []

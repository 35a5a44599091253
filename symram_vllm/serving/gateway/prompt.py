"""The prompt's token ids, exactly as the engine will see them.

The gateway asks an engine's own ``POST /tokenize`` rather than loading the tokenizer
itself: that is the same tokenizer, chat template, template arguments and special-token
rules vLLM applies when it serves the request (chat: template adds BOS,
``add_special_tokens`` false; completions: true), for any model, with no model files
and no transformers import in the gateway. It costs one local round trip (~1-3 ms);
when it fails or is slow the request is routed without prefix information, never
refused. Token-id prompts need no call.
"""

from __future__ import annotations

import logging
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


def tokenize_request(endpoint: str, body: dict[str, Any]) -> dict[str, Any] | list[int] | None:
    """The /tokenize body for this request, its token ids when it already carries them,
    or None when it has no prompt the gateway can key (e.g. prompt embeddings)."""
    model = body.get("model")
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        out = {"model": model, "messages": messages}
        out.update({k: body[k] for k in CHAT_TEMPLATE_FIELDS if k in body})
        return out
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
) -> list[int] | None:
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
        return None
    return _token_ids(tokens) or []

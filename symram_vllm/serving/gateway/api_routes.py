"""The APIs beyond chat and completions: OpenAI Responses, Anthropic Messages, and the
engine's embeddings / tokenize / detokenize endpoints.

``/v1/responses`` and ``/v1/messages`` take chat's path through the gateway: API key ->
rate limit -> body checks -> tenant ``cache_salt`` -> prompt tokens (``prompt.py``
renders them as vLLM does) -> prefix lookup -> route -> prefetch -> forward with retry
-> stream back. ``/v1/embeddings``, ``/tokenize`` and ``/detokenize`` are forwarded with
the same auth, limits and model check, routed by session affinity or load (no prompt
keys: nothing is generated).

A ``/v1/responses`` request naming a ``previous_response_id`` goes to the engine that
produced that response: vLLM keeps stored responses in the memory of the engine that
made them, so another engine would answer 404.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from symram_vllm.serving.gateway.errors import GatewayError

# path -> the endpoint kind used in metrics and by prompt.py
ROUTES = {
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/v1/embeddings": "embeddings",
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
}
PATHS = tuple(ROUTES)
MAX_REMEMBERED_RESPONSES = 65536


def _bad(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_request",
                        reason="invalid_request")


def check_body(endpoint: str, body: dict[str, Any], cap: int | None = None) -> None:
    """The endpoint-specific part of the body checks (types, and the gateway's
    ``max_tokens_cap`` on ``max_output_tokens``: vLLM owns the rest)."""
    if endpoint == "responses":
        given = body.get("input")
        if not isinstance(given, str | list) or given in ("", []):
            raise _bad("'input' is required: a string or an array of input items.", "input")
        for name in ("instructions", "previous_response_id"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise _bad(f"'{name}' must be a string.", name)
        value = body.get("max_output_tokens")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise _bad(f"'max_output_tokens' must be a positive integer, got {value!r}.",
                       "max_output_tokens")
        if value is not None and cap is not None and value > cap:
            raise _bad(f"'max_output_tokens' is {value}, above this gateway's limit of {cap}.",
                       "max_output_tokens")
    elif endpoint == "messages":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or \
                not all(isinstance(m, dict) for m in messages):
            raise _bad("'messages' is required: a non-empty array of objects with 'role' and "
                       "'content'.", "messages")
        if body.get("system") is not None and not isinstance(body["system"], str | list):
            raise _bad("'system' must be a string or an array of text blocks.", "system")
    elif endpoint == "embeddings":
        given = body.get("input")
        if not isinstance(given, str | list) or given in ("", []):
            raise _bad("'input' is required: a string, an array of strings or of token ids.",
                       "input")
    elif endpoint == "tokenize":
        if not isinstance(body.get("prompt"), str) and not isinstance(body.get("messages"),
                                                                      list):
            raise _bad("'prompt' (a string) or 'messages' (an array) is required.", "prompt")
    elif endpoint == "detokenize":
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise _bad("'tokens' is required: an array of token ids.", "tokens")


def completion_budget(body: dict[str, Any]) -> int | None:
    """The completion tokens a request asks for, whatever the API calls the field."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def usage_total(usage: dict[str, Any] | None) -> int | None:
    """Total tokens of an OpenAI or an Anthropic ``usage`` object."""
    if not isinstance(usage, dict):
        return None
    if isinstance(usage.get("total_tokens"), int):
        return usage["total_tokens"]
    parts = [usage.get(k) for k in ("input_tokens", "output_tokens")]
    if all(isinstance(p, int) for p in parts):
        return int(parts[0]) + int(parts[1])  # type: ignore[arg-type]
    return None


class ResponseOwners:
    """Which engine made each stored response (bounded, least recently used first out)."""

    def __init__(self, capacity: int = MAX_REMEMBERED_RESPONSES) -> None:
        self.capacity = capacity
        self._owners: OrderedDict[str, str] = OrderedDict()

    def remember(self, response_id: Any, backend: str) -> None:
        if not isinstance(response_id, str) or not response_id:
            return
        self._owners[response_id] = backend
        self._owners.move_to_end(response_id)
        while len(self._owners) > self.capacity:
            self._owners.popitem(last=False)

    def owner(self, response_id: Any) -> str | None:
        if not isinstance(response_id, str):
            return None
        backend = self._owners.get(response_id)
        if backend is not None:
            self._owners.move_to_end(response_id)
        return backend

    def learn_from_body(self, content: bytes, backend: str) -> None:
        try:
            data = json.loads(content)
        except ValueError:
            return
        if isinstance(data, dict) and data.get("object") == "response":
            self.remember(data.get("id"), backend)


def register(app: Any, gateway: Any) -> None:
    """Add the routes to the gateway's app (``app.py`` calls this once)."""

    def endpoint(kind: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            return await gateway.handle(request, kind)
        handler.__name__ = f"{kind}_endpoint"
        return handler

    for path, kind in ROUTES.items():
        app.add_route(path, endpoint(kind), methods=["POST"])

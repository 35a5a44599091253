"""Request bodies: parse the JSON of an OpenAI-style request and check the fields the
gateway relies on (model, messages or prompt, stream, token caps), answering any
problem with an OpenAI-shaped 400 that names the field and the fix."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from symram_vllm.serving.gateway import api_routes
from symram_vllm.serving.gateway.errors import GatewayError

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_JSON_STRING = re.compile(rb'"[^"\\\\]*(?:\\\\.[^"\\\\]*)*"')  # unrolled: linear and fast
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_DEPTH_STEP = np.zeros(256, dtype=np.int32)
_DEPTH_STEP[list(b"[{")], _DEPTH_STEP[list(b"]}")] = 1, -1
MAX_JSON_DEPTH = 128  # OpenAI bodies nest a few levels; Python's parsers recurse per level


def bad(message: str, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, param=param, code=code, reason="invalid_request")


def check_types(endpoint: str, body: dict[str, Any], cap: int | None, max_n: int) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required and must be a non-empty string.", "model")
    if endpoint in api_routes.ROUTES.values():
        api_routes.check_body(endpoint, body, cap)
    elif endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' is required and must be a non-empty array.", "messages")
        if not all(isinstance(m, dict) for m in messages):
            raise bad("Each entry of 'messages' must be an object with 'role' and 'content'.",
                       "messages")
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list) or prompt in ("", []):
            raise bad("'prompt' is required: a string, an array of strings, an array of "
                       "token ids, or an array of such arrays.", "prompt")
    if "stream" in body and not isinstance(body["stream"], bool | type(None)):
        raise bad(f"'stream' must be a boolean, got {type(body['stream']).__name__}.",
                   "stream")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(f"'{name}' must be a positive integer, got {value!r}.", name)
        if cap is not None and name != "n" and value > cap:
            raise bad(f"'{name}' is {value}, above this gateway's limit of {cap}.", name)
        if name == "n" and value > max_n:
            raise bad(f"'n' is {value}, above this gateway's limit of {max_n}.", name)
    for name in ("user", "cache_salt"):
        value = body.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise bad(f"'{name}' must be a non-empty string.", name)
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise bad("'stream_options' must be an object.", "stream_options")


def json_depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text (strings skipped), all at C speed: an
    8 MiB body of brackets takes tens of milliseconds, less than parsing it."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, delete=_NOT_BRACKETS)
    if not brackets:
        return 0
    steps = _DEPTH_STEP[np.frombuffer(brackets, dtype=np.uint8)]
    return int(np.cumsum(steps, dtype=np.int32).max())


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request's JSON object, or an OpenAI-shaped 400 for anything else: bad JSON,
    nesting deeper than the parser's recursion limit, or a lone UTF-16 surrogate (which
    JSON escapes allow and no UTF-8 encoder does)."""
    too_deep = bad(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.",
                    code="invalid_json")
    try:
        body = json.loads(raw)  # fails fast (RecursionError) past ~990 levels
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise bad(f"We could not parse the JSON body of your request ({exc}). The body "
                   "must be a JSON object.", code="invalid_json") from None
    # What parsed may still be too deep to re-encode later, a few frames further down.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(raw) > MAX_JSON_DEPTH:
        raise too_deep
    if not isinstance(body, dict):
        raise bad(f"The request body must be a JSON object, got {type(body).__name__}.",
                   code="invalid_json")
    # Only a \uD800-\uDFFF escape can carry a surrogate (raw surrogate bytes are
    # invalid UTF-8 and fail above), so the full check runs only when one is present.
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad("The JSON body holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF "
                       "escape without its pair); send valid Unicode.",
                       code="invalid_unicode") from None
    return body

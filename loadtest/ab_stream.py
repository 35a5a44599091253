"""Reading an OpenAI completion SSE stream (no Locust import: the runner and the unit
tests use it without gevent's monkey-patching)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any


def parse_stream(lines: Iterable[bytes], start: float,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """First-content time, end time, token counts and cached tokens of one stream.

    TTFT is the arrival of the first chunk with text. A byte-level BPE token can decode
    to "" (half a UTF-8 character), so with no text at all it falls back to the first
    chunk with a choice, then to the end. TPOT = (E2E - TTFT) / (output tokens - 1).
    """
    first_content: float | None = None
    first_chunk: float | None = None
    chunks = 0
    usage: dict[str, Any] = {}
    for raw in lines:
        if not raw.startswith(b"data:"):
            continue  # blank separators, comments, event names
        payload = raw[5:].strip()
        if not payload or payload == b"[DONE]":
            continue
        chunk = json.loads(payload)
        if "error" in chunk:
            raise RuntimeError(f"server error in stream: {chunk['error']}")
        choices = chunk.get("choices") or []
        if choices:
            now = clock()
            if first_chunk is None:
                first_chunk = now
            if choices[0].get("text"):
                chunks += 1
                if first_content is None:
                    first_content = now
        if chunk.get("usage"):
            usage = chunk["usage"]
    end = clock()
    first = first_content or first_chunk or end
    details = usage.get("prompt_tokens_details") or {}
    output_tokens = int(usage.get("completion_tokens") or chunks)
    ttft = first - start
    e2e = end - start
    return {
        "ttft_s": ttft,
        "e2e_s": e2e,
        "tpot_s": (e2e - ttft) / (output_tokens - 1) if output_tokens > 1 else 0.0,
        "output_tokens": output_tokens,
        "prompt_tokens_reported": int(usage.get("prompt_tokens") or 0),
        "cached_tokens": int(details.get("cached_tokens") or 0),
    }

"""A validated request on its way through the gateway, and what it counts against its
key's token limit once finished."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from symram_vllm.serving.gateway import api_routes
from symram_vllm.serving.gateway.auth import Principal
from symram_vllm.serving.gateway.backends import Backend
from symram_vllm.serving.gateway.locator import PrefixHit


@dataclass
class Prepared:
    """A validated request, ready to route."""

    endpoint: str
    path: str
    body: dict[str, Any]
    principal: Principal
    stream: bool
    started: float
    request_id: str
    session: str | None
    candidates: list[Backend]
    tokens: list[int] | None = None
    charged_tokens: int = 0  # prompt + max_tokens x n: the worst case
    taken_tokens: int = 0  # what the token bucket actually gave (at most its capacity)
    prompt_estimate: int = 0
    keys: dict[str, list[bytes]] = field(default_factory=dict)
    hits: dict[str, PrefixHit] = field(default_factory=dict)


def tokens_used(prep: Prepared, usage: dict[str, Any] | None, seen_events: int,
                status: int) -> int:
    """What a finished request counts against its token limit: the engine's usage when
    it reported one; nothing when the engine refused it; otherwise the worst case
    (prompt + max_tokens x n), or more if more content events were seen."""
    total = api_routes.usage_total(usage)  # OpenAI total_tokens, Anthropic input + output
    if total is not None:
        return total
    if status != 200:
        return 0
    return max(prep.charged_tokens, prep.prompt_estimate + seen_events)

"""Rate limits (token buckets per key, on requests and on tokens) and request size."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from starlette.requests import Request

from symram_vllm.serving.gateway.errors import GatewayError


class TokenBucket:
    """`rate` units per second, holding at most `capacity`. A charge may be adjusted
    afterwards (the token count of a reply is known only at its end), so the level can
    go negative: the next requests then wait for the debt to refill."""

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self.level = capacity
        self.stamp = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, amount: float) -> float:
        """Take `amount` (capped at capacity) and return 0, or take nothing and return the
        seconds until it would fit."""
        amount = min(amount, self.capacity)
        with self._lock:
            self._refill()
            if self.level >= amount:
                self.level -= amount
                return 0.0
            return (amount - self.level) / self.rate

    def adjust(self, delta: float) -> None:
        """Charge `delta` more (negative: refund) without checking."""
        with self._lock:
            self._refill()
            self.level = min(self.capacity, self.level - delta)


class RateLimiter:
    """Per-key buckets: requests per minute and tokens per minute."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, key: str, kind: str, per_minute: float) -> TokenBucket:
        with self._lock:
            bucket = self._buckets.get((key, kind))
            if bucket is None or bucket.capacity != per_minute:
                bucket = TokenBucket(per_minute / 60.0, per_minute, self.clock)
                self._buckets[(key, kind)] = bucket
            return bucket

    def check_request(self, key: str, per_minute: float | None) -> None:
        if per_minute is None:
            return
        wait = self._bucket(key, "requests", per_minute).take(1)
        if wait > 0:
            raise GatewayError(
                429, f"Rate limit reached: {per_minute:g} requests per minute for this API "
                f"key. Retry in {wait:.1f} s.",
                code="rate_limit_exceeded", reason="rate_requests",
                headers={"Retry-After": str(max(1, math.ceil(wait)))})

    def charge_tokens(self, key: str, per_minute: float | None, tokens: int) -> int:
        """Take `tokens` (at most a full bucket) or raise 429; returns what was taken,
        the amount `settle_tokens` must later correct."""
        if per_minute is None:
            return 0
        bucket = self._bucket(key, "tokens", per_minute)
        wait = bucket.take(tokens)
        if wait > 0:
            raise GatewayError(
                429, f"Rate limit reached: {per_minute:g} tokens per minute for this API key; "
                f"this request needs about {tokens} (prompt + max_tokens). Retry in "
                f"{wait:.1f} s.",
                code="rate_limit_exceeded", reason="rate_tokens",
                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return int(min(tokens, bucket.capacity))

    def settle_tokens(self, key: str, per_minute: float | None, taken: int, used: int) -> None:
        """Correct a charge once the reply's real token count is known. `taken` is what
        `charge_tokens` returned, not what was asked: refunding the uncapped request
        let a request above the bucket's capacity refill the bucket (issue J)."""
        if per_minute is None or used == taken:
            return
        self._bucket(key, "tokens", per_minute).adjust(used - taken)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    too_big = GatewayError(
        413, f"Request body is larger than the gateway's limit of {limit} bytes.",
        code="request_too_large", reason="body_size")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_big
        except ValueError:
            raise GatewayError(400, "Invalid Content-Length header.", code="invalid_request",
                               reason="invalid_request") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)

"""What stands between the network and the engine's control endpoint.

The audit showed a flood of large lookups from 8 clients slowing 64-token generation
from 0.14 s to over 1 s when the endpoint ran inside the vLLM worker process. It now
runs in a low-priority child process of the worker (``symram_vllm.control``), and the
guard, a pure ASGI wrapper in front of every route there, bounds what a flood can make
that process, and through it the worker's one control thread, do:

* **A shared token.** Every path but ``/health`` needs ``Authorization: Bearer TOKEN``
  (compared in constant time). Without it the endpoint is a prefix-membership oracle.
* **Bounded bodies.** A declared ``Content-Length`` over the limit is refused before
  any byte of the body is read; a chunked body is cut off at the limit.
* **A per-client rate limit** (token bucket per peer address).
* **A time budget** for requests with a body (lookups, prefetches; GETs are cheap and
  only rate-limited, and so is the bypass kill switch, which must answer during a
  flood). The serving thread may spend at most ``cpu_share`` of wall time (the
  worker's control thread has a budget of its own, ``control_link``):
  all its CPU time is charged (``time.thread_time()``: parsing, refusals, handlers),
  and a handler's wall time beyond its CPU time on top. On a loaded host a thread that
  holds the GIL is often preempted, and the worker waits for the GIL all that while,
  so CPU time alone undercounts the harm (measured: a CPU-only budget let a flood slow
  generation 1.7x). Over budget, admitted requests wait, asleep and holding no GIL,
  until it refills. Time a handler spends awaiting (the worker's answer, a prefetch's
  ``wait_s``) is not charged: the handler adds it to
  ``scope["state"]["symram_waited_s"]``.
* **Slow refusals.** 401, 429 and 503 answers are held back ``reject_delay_s``, so a
  client that retries at once spends its time waiting, not making the worker parse.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MIN_TOKEN_CHARS = 16
OPEN_PATHS = frozenset({"/health"})
# The kill switch must work while the endpoint is flooded (that is when an operator
# reaches for it): it needs the token and is rate-limited like everything else, but it
# never queues for the time budget. Its handler writes one small flag file.
UNBUDGETED_PATHS = frozenset({"/symram/bypass"})


@dataclass(frozen=True)
class ControlLimits:
    max_body_bytes: int = 96 * 1024  # 1,024 hex keys in JSON are ~68 KiB
    rate_per_client: float = 100.0  # requests per second per peer address
    burst_per_client: float = 200.0
    cpu_share: float = 0.05  # of wall time, for the handlers on the serving thread
    cpu_burst_s: float = 0.05
    max_waiting: int = 64  # requests queued for CPU budget before 503
    reject_delay_s: float = 1.0
    max_clients: int = 4096  # rate-limit buckets kept (least recently seen dropped)


def check_token(token: str | None) -> str:
    """The token, or ValueError saying how to set one."""
    if not token:
        raise ValueError(
            "the control endpoint needs a shared token: set control_token (env "
            "SYMRAM_CONTROL_TOKEN) or control_token_file on the engine, and the same value "
            "as the gateway's control_token"
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"control_token must be at least {MIN_TOKEN_CHARS} characters")
    return token


class WorkBudget:
    """Keeps the time charged to it under `share` of wall time, with a `burst_s`
    allowance: `admit()` waits while the budget is spent, `charge()` spends it. Used
    from one event loop."""

    def __init__(self, share: float, burst_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 cpu: Callable[[], float] | None = time.thread_time) -> None:
        self.share = share
        self.burst_s = burst_s
        self.clock = clock
        self.cpu = cpu  # the serving thread's CPU clock, charged continuously (or None)
        self.level = burst_s
        self._stamp = clock()
        self._cpu_stamp = cpu() if cpu is not None else 0.0
        self.waiting = 0
        self.throttled_s = 0.0
        self.charged_s = 0.0
        self._queue = asyncio.Lock()

    def _update(self) -> None:
        now = self.clock()
        spent = 0.0
        if self.cpu is not None:
            used = self.cpu()
            spent, self._cpu_stamp = max(used - self._cpu_stamp, 0.0), used
            self.charged_s += spent
        self.level = min(self.burst_s, self.level + (now - self._stamp) * self.share - spent)
        self._stamp = now

    def pause_s(self) -> float:
        """Seconds to wait before the next admission (0: admitted now), for a caller
        that waits by itself (the worker's control link sleeps in ``select``)."""
        self._update()
        return 0.0 if self.level >= 0 else -self.level / self.share

    def charge(self, seconds: float) -> None:
        self._update()
        self.level -= max(seconds, 0.0)
        self.charged_s += max(seconds, 0.0)

    async def admit(self) -> None:
        """Wait until the budget is positive. One waiter at a time sleeps on the timer,
        the others queue behind it (FIFO): a refill wakes one request, not all of
        them, and every wake-up of the serving thread is a GIL handoff the worker
        pays for."""
        self.waiting += 1
        try:
            async with self._queue:
                while True:
                    self._update()
                    if self.level >= 0:
                        return
                    pause = -self.level / self.share
                    self.throttled_s += pause
                    await asyncio.sleep(pause)
        finally:
            self.waiting -= 1


class ClientBuckets:
    """Token bucket per client address, at most `max_clients` of them."""

    def __init__(self, rate: float, burst: float, max_clients: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.max_clients, self.clock = rate, burst, max_clients, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str) -> bool:
        now = self.clock()
        level, stamp = self._buckets.pop(client, (self.burst, now))
        level = min(self.burst, level + (now - stamp) * self.rate)
        ok = level >= 1.0
        self._buckets[client] = (level - 1.0 if ok else level, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return ok


class ControlGuard:
    """ASGI wrapper applying the token, body, rate and CPU limits to every route."""

    def __init__(self, app: ASGIApp, token: str, limits: ControlLimits | None = None) -> None:
        self.app = app
        self._token = check_token(token).encode()
        self.limits = limits or ControlLimits()
        self.clients = ClientBuckets(self.limits.rate_per_client, self.limits.burst_per_client,
                                     self.limits.max_clients)
        self.budget: WorkBudget | None = None  # made on the serving thread
        self.refused: dict[str, int] = {}

    def _authorized(self, scope: Scope) -> bool:
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token)

    async def _refuse(self, send: Send, status: int, message: str, why: str,
                      close: bool = False) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1
        await asyncio.sleep(self.limits.reject_delay_s)
        kind = "rate_limit_error" if status == 429 else (
            "service_unavailable" if status == 503 else "invalid_request_error")
        body = json.dumps({"error": {"message": message, "type": kind, "param": None,
                                     "code": status}}).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if status in (429, 503):
            headers.append((b"retry-after", b"1"))
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.budget is None:
            self.budget = WorkBudget(self.limits.cpu_share, self.limits.cpu_burst_s)
        client = (scope.get("client") or ("unknown", 0))[0]
        if not self.clients.take(client):
            await self._refuse(send, 429, "Too many control requests from this address.",
                               "rate")
            return
        if not self._authorized(scope):
            await self._refuse(send, 401, "Missing or wrong control token: send "
                               "'Authorization: Bearer <control_token>'.", "auth")
            return
        limit = self.limits.max_body_bytes
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(send, 413, f"Control request bodies are limited to {limit} "
                               "bytes.", "size", close=True)
            return
        if scope.get("method") == "GET" or scope.get("path") in UNBUDGETED_PATHS:
            # info and stats: cheap, rate-limited per client, and the gateway's health
            # check, which must not queue behind a flood of lookups; and the kill switch.
            await self.app(scope, receive, send)
            return
        if self.budget.waiting >= self.limits.max_waiting:
            await self._refuse(send, 503, "The control endpoint is busy; retry shortly.",
                               "busy")
            return
        # The body is read (bounded) before the CPU budget is asked for: a slow sender
        # never holds a place in the queue.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                await self._refuse(send, 413, f"Control request bodies are limited to "
                                   f"{limit} bytes.", "size", close=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.budget.admit()
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks),
                                  "more_body": False}]

        async def buffered() -> Message:
            return replay.pop() if replay else await receive()

        state = scope.setdefault("state", {})
        state["symram_waited_s"] = 0.0
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            await self.app(scope, buffered, send)
        finally:
            wall = time.perf_counter() - started - state["symram_waited_s"]
            # The CPU part is charged through thread_time; add the time the handler held
            # its place (and perhaps the GIL) without running.
            self.budget.charge(wall - (time.thread_time() - cpu))

"""The gateway application: ``create_app(config) -> FastAPI``.

One request through ``/v1/chat/completions`` or ``/v1/completions``:

auth (API key -> tenant) -> request rate limit -> body (size, JSON, types) -> model
known? -> tenant ``cache_salt`` -> prompt tokens (engine's /tokenize) -> token rate
limit -> chain keys per engine namespace -> prefix lookup on every engine (parallel,
short deadline) -> route -> prefetch disk->DRAM on the chosen engine if it helps ->
forward (retry elsewhere while no byte has reached the client) -> stream back.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from symram_vllm.serving.gateway import api_routes
from symram_vllm.serving.gateway.auth import Authenticator, Principal
from symram_vllm.serving.gateway.backends import Backend, BackendPool
from symram_vllm.serving.gateway.config import GatewayConfig
from symram_vllm.serving.gateway.dashboard import STATIC_DIR, Timeline, dashboard_html, occupancy
from symram_vllm.serving.gateway.directory_locator import make_locator
from symram_vllm.serving.gateway.errors import GatewayError
from symram_vllm.serving.gateway.keys import tier_keys
from symram_vllm.serving.gateway.limits import RateLimiter, read_body
from symram_vllm.serving.gateway.locator import (
    ControlLocator,
    LocateQuery,
    PrefixHit,
    PrefixLocator,
)
from symram_vllm.serving.gateway.metrics import GatewayMetrics
from symram_vllm.serving.gateway.prompt import prompt_tokens
from symram_vllm.serving.gateway.proxy import (
    ClientGone,
    StreamObserver,
    StreamProxyResponse,
    read_raw,
    response_headers,
    unless_disconnected,
)
from symram_vllm.serving.gateway.routing import RouteDecision, Router
from symram_vllm.serving.gateway.upstream import FastUpstream

logger = logging.getLogger("symram.gateway")

ROUTE_HEADER = "x-symram-route"
PREFETCH_HEADER = "x-symram-prefetch"
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_JSON_STRING = re.compile(rb'"[^"\\\\]*(?:\\\\.[^"\\\\]*)*"')  # unrolled: linear and fast
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_DEPTH_STEP = np.zeros(256, dtype=np.int32)
_DEPTH_STEP[list(b"[{")], _DEPTH_STEP[list(b"]}")] = 1, -1
MAX_JSON_DEPTH = 128  # OpenAI bodies nest a few levels; Python's parsers recurse per level
RETRY_STATUSES = frozenset({502, 503, 504})
FORWARD_HEADERS = ("accept", "traceparent", "tracestate", "user-agent")
KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
               "/dashboard", "/dashboard/data", *api_routes.PATHS)
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


class RequestIdMiddleware:
    """Honours a client's X-Request-Id (if sane) or makes one, puts it on every
    response, and counts responses by path and status. Pure ASGI: streams stay
    streams."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                      if k == b"x-request-id"), "")
        request_id = given if _REQUEST_ID.match(given) else f"symgw-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope.get("path", "")
        label = path if path in KNOWN_PATHS else (
            "/dashboard/static" if path.startswith("/dashboard/static/") else "other")

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                self.metrics.requests.labels(label, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # A bug, not an input: one log line with the traceback, and an OpenAI-shaped
            # 500 that carries the request id and is counted like any other answer.
            logger.exception("request %s: internal error on %s", request_id, path)
            if started:
                raise
            error = GatewayError(500, f"Internal gateway error ({type(exc).__name__}); see "
                                 f"the gateway log, request {request_id}.",
                                 code="internal_error", headers={"Connection": "close"})
            await error.response()(scope, receive, send_with_id)


@dataclass
class Attempt:
    """One backend's in-flight slot for a request; released exactly once."""

    backend: Backend
    metrics: GatewayMetrics
    released: bool = False

    def __post_init__(self) -> None:
        self.backend.inflight += 1
        self.metrics.inflight.labels(self.backend.name).set(self.backend.inflight)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.backend.inflight -= 1
            self.metrics.inflight.labels(self.backend.name).set(self.backend.inflight)


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


def _bad(message: str, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, param=param, code=code, reason="invalid_request")


def _check_types(endpoint: str, body: dict[str, Any], cap: int | None, max_n: int) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a non-empty string.", "model")
    if endpoint in api_routes.ROUTES.values():
        api_routes.check_body(endpoint, body, cap)
    elif endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' is required and must be a non-empty array.", "messages")
        if not all(isinstance(m, dict) for m in messages):
            raise _bad("Each entry of 'messages' must be an object with 'role' and 'content'.",
                       "messages")
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list) or prompt in ("", []):
            raise _bad("'prompt' is required: a string, an array of strings, an array of "
                       "token ids, or an array of such arrays.", "prompt")
    if "stream" in body and not isinstance(body["stream"], bool | type(None)):
        raise _bad(f"'stream' must be a boolean, got {type(body['stream']).__name__}.",
                   "stream")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _bad(f"'{name}' must be a positive integer, got {value!r}.", name)
        if cap is not None and name != "n" and value > cap:
            raise _bad(f"'{name}' is {value}, above this gateway's limit of {cap}.", name)
        if name == "n" and value > max_n:
            raise _bad(f"'n' is {value}, above this gateway's limit of {max_n}.", name)
    for name in ("user", "cache_salt"):
        value = body.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise _bad(f"'{name}' must be a non-empty string.", name)
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise _bad("'stream_options' must be an object.", "stream_options")


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
    too_deep = _bad(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.",
                    code="invalid_json")
    try:
        body = json.loads(raw)  # fails fast (RecursionError) past ~990 levels
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise _bad(f"We could not parse the JSON body of your request ({exc}). The body "
                   "must be a JSON object.", code="invalid_json") from None
    # What parsed may still be too deep to re-encode later, a few frames further down.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(raw) > MAX_JSON_DEPTH:
        raise too_deep
    if not isinstance(body, dict):
        raise _bad(f"The request body must be a JSON object, got {type(body).__name__}.",
                   code="invalid_json")
    # Only a \uD800-\uDFFF escape can carry a surrogate (raw surrogate bytes are
    # invalid UTF-8 and fail above), so the full check runs only when one is present.
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _bad("The JSON body holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF "
                       "escape without its pair); send valid Unicode.",
                       code="invalid_unicode") from None
    return body


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


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        locator: PrefixLocator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        t = config.timeouts
        # The request path (forward, tokenize, prefix lookups) runs on aiohttp, about 6x
        # less CPU per request than httpx (upstream.py); an injected httpx transport
        # (tests) replaces it with httpx.
        self.upstream: httpx.AsyncClient | FastUpstream
        if transport is None:
            self.upstream = FastUpstream(t.read_s, t.connect_s)
        else:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
            self.upstream = httpx.AsyncClient(
                transport=transport, limits=limits, trust_env=False,
                timeout=httpx.Timeout(t.read_s, connect=t.connect_s, pool=t.connect_s),
            )
        self.control = httpx.AsyncClient(
            transport=transport, trust_env=False,
            timeout=httpx.Timeout(t.health_timeout_s, connect=min(t.connect_s, 2.0)),
        )
        self.metrics = GatewayMetrics()
        token = config.control_token.get_secret_value() if config.control_token else None
        # Sent on control-endpoint calls only, never to the engines' OpenAI port.
        self.control_headers = {"authorization": f"Bearer {token}"} if token else {}
        self.pool = BackendPool(config, self.control, self.control_headers)
        self.locator = locator or make_locator(config.routing, ControlLocator(
            self.upstream, config.routing.lookup_timeout_s,
            on_failure=lambda b, kind: self.metrics.upstream_errors.labels(b.name, kind).inc(),
            headers=self.control_headers))
        self.router = Router(config.routing)
        self.auth = Authenticator(config)
        self.limiter = RateLimiter(clock)
        self.timeline = Timeline(config.dashboard_history)
        self.route_counts: dict[str, int] = {}
        self.instance_routes: dict[str, dict[str, int]] = {}
        self.response_owners = api_routes.ResponseOwners()
        self.pool.stats_listeners.append(
            lambda backend, stats, now: self.timeline.record(backend.name, stats, now))
        self.pool.health_listeners.append(
            lambda b: self.metrics.healthy.labels(b.name).set(1.0 if b.healthy else 0.0))

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        logger.info("symram gateway: %s", self.auth.describe())
        await self.pool.discover()
        for b in self.pool.backends:
            logger.info("backend %s: %s, control %s, max in flight %d", b.name, b.url,
                        b.control_url or "none (no prefix routing)", b.max_inflight)
        if not self.pool.backends:
            logger.warning("no backends configured or discovered: requests get 503 until "
                           "one is")
        await self.pool.check_all()
        self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()
        await self.upstream.aclose()
        await self.control.aclose()
        if hasattr(self.locator, "aclose"):
            await self.locator.aclose()

    # -- request preparation ---------------------------------------------------------------
    async def prepare(self, request: Request, endpoint: str) -> Prepared:
        started = time.monotonic()
        principal = self.auth.authenticate(request.headers,
                                           request.client.host if request.client else None)
        self.limiter.check_request(principal.key_id, principal.requests_per_minute)
        raw = await read_body(request, self.config.limits.max_body_bytes)
        body = parse_body(raw)
        limits = self.config.limits
        _check_types(endpoint, body, limits.max_tokens_cap, limits.max_n)
        model = body["model"]
        candidates = self.pool.serving(model)
        owner = self.response_owners.owner(body.get("previous_response_id"))
        candidates = [b for b in candidates if b.name == owner] or candidates
        if not candidates:
            if not self.pool.healthy():
                raise GatewayError(503, "No healthy engine is available; retry shortly.",
                                   code="no_healthy_backend", reason="no_backend",
                                   headers={"Retry-After": str(self.config.limits.retry_after_s)})
            served = ", ".join(sorted(str(m.get("id")) for m in self.pool.models()))
            raise GatewayError(404, f"The model '{model}' does not exist. Served models: "
                               f"{served}.", param="model", code="model_not_found",
                               reason="model_not_found")
        salt = principal.cache_salt(body.get("cache_salt"))
        if salt is not None:
            body["cache_salt"] = salt
        session_value = request.headers.get(self.config.routing.session_header) or body.get("user")
        session = f"{principal.tenant or principal.key_id}:{session_value}" if session_value \
            else None
        return Prepared(
            endpoint=endpoint, path=request.url.path, body=body, principal=principal,
            stream=bool(body.get("stream")), started=started,
            request_id=request.state.request_id, session=session, candidates=candidates,
        )

    def _charge_tokens(self, prep: Prepared, raw_len: int) -> None:
        body = prep.body
        prompt = len(prep.tokens) if prep.tokens is not None else math.ceil(raw_len / 4)
        if prep.endpoint == "completions" and isinstance(body.get("prompt"), list) and \
                body["prompt"] and not isinstance(body["prompt"][0], int):
            prompt *= len(body["prompt"])
        completion = (api_routes.completion_budget(body)
                      or self.config.limits.default_completion_tokens)
        prep.prompt_estimate = prompt
        prep.charged_tokens = prompt + completion * int(body.get("n") or 1)
        prep.taken_tokens = self.limiter.charge_tokens(
            prep.principal.key_id, prep.principal.tokens_per_minute, prep.charged_tokens)
        if prep.stream and prep.endpoint in ("chat", "completions"):
            # The real count of a limited stream comes from its usage chunk: ask for it
            # (Responses and Messages streams report usage at their end anyway).
            options = body.get("stream_options") or {}
            body["stream_options"] = {**options, "include_usage": True}

    async def locate(self, prep: Prepared) -> None:
        """Tokens, keys per engine namespace, and each engine's held prefix.

        The tokenize round trip is made only when its answer is used: some candidate
        has a control endpoint to look the keys up, or the key has a token limit."""
        t0 = time.monotonic()
        keyed = [b for b in prep.candidates if b.info is not None
                 and (b.control_ok or not getattr(self.locator, "needs_control", True))]
        limited = prep.principal.tokens_per_minute is not None
        if keyed or limited:
            tokenizer = min(prep.candidates, key=lambda b: b.inflight)
            prep.tokens = await prompt_tokens(
                self.upstream, tokenizer, prep.endpoint, prep.body,
                self.config.routing.tokenize_timeout_s, {REQUEST_ID_HEADER: prep.request_id})
        if limited:
            self._charge_tokens(prep, len(json.dumps(prep.body)))
        if prep.tokens and keyed:
            cache: dict[tuple[str, int, str], list[bytes]] = {}
            queries = []
            for backend in keyed:
                info = backend.info
                assert info is not None
                seed = info.none_hash_seed or self.config.routing.none_hash_seed
                ns = (info.signature_digest, info.block_size, seed)
                if ns not in cache:
                    cache[ns] = tier_keys(
                        prep.tokens, info.signature_digest, info.block_size,
                        prep.body.get("cache_salt"), seed=seed,
                        max_blocks=self.config.routing.max_lookup_blocks)
                prep.keys[backend.name] = cache[ns]
                queries.append(LocateQuery(backend, cache[ns]))
            if any(q.keys for q in queries):
                prep.hits = await self.locator.locate(queries)
        self.metrics.lookup_seconds.observe(time.monotonic() - t0)

    def route(self, prep: Prepared, exclude: tuple[str, ...] = ()) -> RouteDecision:
        candidates = [b for b in prep.candidates if b.healthy]
        decision = self.router.choose(candidates, prep.hits, prep.session, exclude)
        if decision is None:
            left = [b for b in candidates if b.name not in exclude]
            if left:
                raise GatewayError(
                    429, f"All {len(left)} engines serving '{prep.body['model']}' are at their "
                    "in-flight limit; retry shortly.", code="engine_overloaded",
                    reason="inflight",
                    headers={"Retry-After": str(self.config.limits.retry_after_s)})
            raise GatewayError(503, f"No healthy engine left for '{prep.body['model']}'.",
                               code="no_healthy_backend", reason="no_backend",
                               headers={"Retry-After": str(self.config.limits.retry_after_s)})
        return decision

    def _record_route(self, decision: RouteDecision) -> None:
        name = decision.backend.name
        self.metrics.routes.labels(name, decision.reason).inc()
        self.metrics.matched_tokens.observe(decision.matched_tokens)
        self.metrics.matched_tokens_total.labels(name).inc(decision.matched_tokens)
        self.route_counts[decision.reason] = self.route_counts.get(decision.reason, 0) + 1
        mine = self.instance_routes.setdefault(name, {})
        mine[decision.reason] = mine.get(decision.reason, 0) + 1

    async def prefetch(self, prep: Prepared, decision: RouteDecision) -> str | None:
        """Promote the part of the chosen engine's prefix that is only on disk."""
        cfg = self.config.routing
        hit, backend = decision.hit, decision.backend
        keys = prep.keys.get(backend.name) or []
        if not cfg.prefetch or hit.any - hit.dram < cfg.min_prefetch_blocks or not keys:
            return None
        wanted = [k.hex() for k in keys[hit.dram:hit.any]]
        resident = 0
        try:
            for url in backend.control_rank_urls():
                response = await self.control.post(
                    f"{url}/symram/prefetch", json={"keys": wanted, "wait_s": cfg.prefetch_wait_s},
                    timeout=cfg.prefetch_wait_s + self.config.timeouts.health_timeout_s,
                    headers=self.control_headers)
                response.raise_for_status()
                data = response.json()
                resident = int(data["dram_resident"])
                self.metrics.prefetched_blocks.labels(backend.name).inc(int(data["promoted"]))
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            self.metrics.prefetches.labels(backend.name, "failed").inc()
            logger.debug("prefetch on %s failed: %r", backend.name, exc)
            return f"requested={len(wanted)};failed"
        outcome = "complete" if resident >= len(wanted) else "partial"
        self.metrics.prefetches.labels(backend.name, outcome).inc()
        return f"requested={len(wanted)};resident={resident}"

    # -- forwarding ------------------------------------------------------------------------
    def _upstream_request(self, prep: Prepared, backend: Backend, request: Request
                          ) -> httpx.Request:
        headers = {"content-type": "application/json", "accept-encoding": "identity",
                   REQUEST_ID_HEADER: prep.request_id}
        for name in FORWARD_HEADERS:
            if name in request.headers:
                headers[name] = request.headers[name]
        return self.upstream.build_request(
            "POST", f"{backend.url}{prep.path}", content=json.dumps(prep.body).encode(),
            headers=headers)

    async def forward(
        self, prep: Prepared, decision: RouteDecision, request: Request
    ) -> tuple[httpx.Response, RouteDecision, Attempt, str | None]:
        """Open the upstream response (headers received), retrying on another engine
        while nothing has been sent to the client."""
        tried: list[str] = []
        while True:
            backend = decision.backend
            attempt = Attempt(backend, self.metrics)
            failure: str
            try:
                prefetch = await self.prefetch(prep, decision)
                upstream = await self.upstream.send(
                    self._upstream_request(prep, backend, request), stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError,
                    httpx.ReadError, httpx.WriteError) as exc:
                attempt.release()
                failure = type(exc).__name__
                self.metrics.upstream_errors.labels(backend.name, failure).inc()
                self.pool.mark_failed(backend, f"{failure}: {exc}")
            except httpx.TimeoutException as exc:
                attempt.release()
                self.metrics.upstream_errors.labels(backend.name, "timeout").inc()
                raise GatewayError(504, f"Engine {backend.name} did not answer within the "
                                   f"gateway's timeout ({type(exc).__name__}).",
                                   code="upstream_timeout", reason="upstream_timeout") from None
            except BaseException:
                attempt.release()
                raise
            else:
                if upstream.status_code not in RETRY_STATUSES or \
                        len(tried) >= self.config.routing.max_retries:
                    return upstream, decision, attempt, prefetch
                await upstream.aclose()
                attempt.release()
                failure = f"http_{upstream.status_code}"
                self.metrics.upstream_errors.labels(backend.name, failure).inc()
            tried.append(backend.name)
            if len(tried) > self.config.routing.max_retries:
                raise GatewayError(502, f"Engine {backend.name} failed ({failure}) and no "
                                   "retry is left.", code="upstream_unavailable",
                                   reason="upstream_failed")
            try:
                decision = replace(self.route(prep, tuple(tried)), retry_of=backend.name)
            except GatewayError:
                raise GatewayError(502, f"Engine {backend.name} failed ({failure}) and no other "
                                   "engine can take the request.", code="upstream_unavailable",
                                   reason="upstream_failed") from None
            self.metrics.retries.labels(decision.backend.name).inc()
            logger.warning("request %s: %s failed (%s), retrying on %s", prep.request_id,
                           backend.name, failure, decision.backend.name)

    def _finish(self, prep: Prepared, decision: RouteDecision, usage: dict[str, Any] | None,
                first_content_at: float | None, outcome: str, seen_events: int = 0,
                status: int = 200) -> None:
        now = time.monotonic()
        name = decision.backend.name
        if first_content_at is not None:
            self.metrics.ttft.labels(prep.endpoint, name).observe(first_content_at - prep.started)
        if outcome == "disconnect":
            self.metrics.disconnects.labels(prep.endpoint).inc()
        elif outcome == "upstream_error":
            self.metrics.upstream_errors.labels(name, "broken_stream").inc()
        else:
            self.metrics.e2e.labels(prep.endpoint, name, str(prep.stream).lower()).observe(
                now - prep.started)
        self.limiter.settle_tokens(prep.principal.key_id, prep.principal.tokens_per_minute,
                                   prep.taken_tokens,
                                   tokens_used(prep, usage, seen_events, status))

    async def handle(self, request: Request, endpoint: str) -> Response:
        prep = await self.prepare(request, endpoint)

        async def open_upstream() -> tuple[httpx.Response, RouteDecision, Attempt, str | None,
                                           bytes | None]:
            await self.locate(prep)
            first = self.route(prep)
            self._record_route(first)
            upstream, decision, attempt, prefetch = await self.forward(prep, first, request)
            if prep.stream and upstream.status_code == 200:
                return upstream, decision, attempt, prefetch, None
            try:
                content = await read_raw(upstream)
            finally:
                attempt.release()
            return upstream, decision, attempt, prefetch, content

        try:
            upstream, decision, attempt, prefetch, content = await unless_disconnected(
                request.receive, open_upstream())
        except ClientGone:
            self.metrics.disconnects.labels(endpoint).inc()
            return Response(status_code=499)
        extra = {ROUTE_HEADER: decision.header()}
        if prefetch:
            extra[PREFETCH_HEADER] = prefetch
        headers = response_headers(upstream, extra)
        if content is None:
            observer = StreamObserver(prep.started)

            def on_finish(outcome: str) -> None:
                self.response_owners.remember(observer.response_id, decision.backend.name)
                attempt.release()
                self._finish(prep, decision, observer.usage, observer.first_content_at, outcome,
                             observer.content_events)

            return StreamProxyResponse(upstream, headers, observer, on_finish)
        usage = None
        if upstream.status_code == 200:
            self.response_owners.learn_from_body(content, decision.backend.name)
            try:
                usage = json.loads(content).get("usage")
            except (ValueError, AttributeError):
                usage = None
        self._finish(prep, decision, usage, None, "complete", status=upstream.status_code)
        return Response(content, status_code=upstream.status_code, headers=headers)

    # -- read-only views -------------------------------------------------------------------
    def dashboard_data(self) -> dict[str, Any]:
        now = time.time()
        bucket = self.config.timeouts.stats_interval_s
        instances = []
        for backend in self.pool.backends:
            item = backend.snapshot()
            item["tiers"] = occupancy(backend.last_stats) if backend.last_stats else None
            item["stats_age_s"] = (round(now - backend.stats_at, 3)
                                   if backend.stats_at is not None else None)
            item["routed"] = dict(self.instance_routes.get(backend.name, {}))
            instances.append(item)
        return {
            "generated_at": now,
            "auth": "auth on" if self.auth.enabled else "auth off",
            "instances": instances,
            "routes": dict(self.route_counts),
            "bucket_s": bucket,
            "timeline": self.timeline.series(bucket),
            "timeline_by_instance": {name: self.timeline.series(bucket, name)
                                     for name in self.timeline.instances()},
            "events": list(self.timeline.points)[-50:],
        }


def create_app(
    config: GatewayConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    locator: PrefixLocator | None = None,
) -> FastAPI:
    """The gateway as an ASGI app. `transport` replaces the network for every upstream
    call (tests); `locator` replaces the control-endpoint prefix lookup."""
    gateway = Gateway(config, transport=transport, locator=locator)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="symram gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.gateway = gateway
    app.add_middleware(RequestIdMiddleware, metrics=gateway.metrics)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> Response:
        if exc.status < 500 or exc.reason in ("no_backend",):
            gateway.metrics.rejections.labels(exc.reason).inc()
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: f"Unknown path {request.url.path}.",
                   405: f"Method {request.method} is not allowed on {request.url.path}."}.get(
            exc.status_code, str(exc.detail))
        gateway.metrics.rejections.labels(f"http_{exc.status_code}").inc()
        return GatewayError(exc.status_code, message, code=f"http_{exc.status_code}").response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        gateway.metrics.rejections.labels("invalid_request").inc()
        return _bad("; ".join(str(e.get("msg")) for e in exc.errors())).response()

    def endpoint(kind: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            return await gateway.handle(request, kind)
        handler.__name__ = f"{kind}_completions"
        return handler

    # Plain Starlette routes: FastAPI's dependency solving costs ~50 us a request here.
    app.add_route("/v1/chat/completions", endpoint("chat"), methods=["POST"])
    app.add_route("/v1/completions", endpoint("completions"), methods=["POST"])
    api_routes.register(app, gateway)

    def client_of(request: Request) -> str | None:
        return request.client.host if request.client else None

    def viewer(request: Request, protected: bool) -> None:
        if protected and gateway.auth.enabled:
            gateway.auth.authenticate_viewer(request.headers, client_of(request))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        gateway.auth.authenticate(request.headers, client_of(request))
        return JSONResponse({"object": "list", "data": gateway.pool.models()})

    @app.get("/health")
    async def health() -> Response:
        # Open to load balancers and probes, so it says only whether the gateway can
        # serve: no backend names, URLs or error text (those are on /dashboard/data).
        healthy = sum(b.healthy for b in gateway.pool.backends)
        if healthy:
            return JSONResponse({"status": "ok", "healthy": healthy})
        body = GatewayError(503, "No healthy engine.", code="no_healthy_backend").body()
        body.update({"status": "unavailable", "healthy": 0})
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        viewer(request, config.protect_metrics)
        for b in gateway.pool.backends:
            gateway.metrics.inflight.labels(b.name).set(b.inflight)
            gateway.metrics.healthy.labels(b.name).set(1.0 if b.healthy else 0.0)
        return Response(gateway.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/dashboard")
    async def dashboard(request: Request) -> Response:
        viewer(request, config.protect_dashboard)
        return HTMLResponse(dashboard_html())

    @app.get("/dashboard/data")
    async def dashboard_data(request: Request) -> Response:
        viewer(request, config.protect_dashboard)
        return JSONResponse(gateway.dashboard_data())

    return app

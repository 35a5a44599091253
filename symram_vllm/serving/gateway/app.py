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
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from symram_vllm.serving.gateway import api_routes
from symram_vllm.serving.gateway.auth import Authenticator
from symram_vllm.serving.gateway.backends import Backend, BackendPool
from symram_vllm.serving.gateway.config import GatewayConfig
from symram_vllm.serving.gateway.dashboard import STATIC_DIR, Timeline, dashboard_html, occupancy
from symram_vllm.serving.gateway.directory_locator import make_locator
from symram_vllm.serving.gateway.errors import GatewayError
from symram_vllm.serving.gateway.forwarding import REQUEST_ID_HEADER, Attempt, Forwarder
from symram_vllm.serving.gateway.keys import tier_keys
from symram_vllm.serving.gateway.limits import RateLimiter, read_body
from symram_vllm.serving.gateway.locator import (
    ControlLocator,
    LocateQuery,
    PrefixLocator,
)
from symram_vllm.serving.gateway.metrics import GatewayMetrics
from symram_vllm.serving.gateway.prepared import Prepared, tokens_used
from symram_vllm.serving.gateway.prompt import prompt_tokens
from symram_vllm.serving.gateway.proxy import (
    ClientGone,
    StreamObserver,
    StreamProxyResponse,
    read_raw,
    response_headers,
    unless_disconnected,
)
from symram_vllm.serving.gateway.request_body import bad, check_types, parse_body
from symram_vllm.serving.gateway.routing import RouteDecision, Router
from symram_vllm.serving.gateway.upstream import FastUpstream

logger = logging.getLogger("symram.gateway")

ROUTE_HEADER = "x-symram-route"
PREFETCH_HEADER = "x-symram-prefetch"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
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
            on_failure=self._upstream_failed, headers=self.control_headers))
        self.router = Router(config.routing)
        self.auth = Authenticator(config)
        self.limiter = RateLimiter(clock)
        self.timeline = Timeline(config.dashboard_history)
        self.route_counts: dict[str, int] = {}
        self.instance_routes: dict[str, dict[str, int]] = {}
        self.response_owners = api_routes.ResponseOwners()
        self.forwarder = Forwarder(config, self.upstream, self.control, self.control_headers,
                                   self.pool, self.metrics, self.route)
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
        check_types(endpoint, body, limits.max_tokens_cap, limits.max_n)
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
                self.config.routing.tokenize_timeout_s, {REQUEST_ID_HEADER: prep.request_id},
                on_failure=self._upstream_failed)
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

    def _upstream_failed(self, backend: Backend, kind: str) -> None:
        """A lookup or tokenize call failed: the request is routed without its prefix."""
        self.metrics.upstream_errors.labels(backend.name, kind).inc()

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
            # Why this engine: what each engine was found to hold (an engine missing
            # from `hits` could not be asked in time and counted as holding nothing).
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("request %s: %s; hits %s", prep.request_id, first.header(),
                             {name: (hit.dram, hit.any) for name, hit in prep.hits.items()})
            upstream, decision, attempt, prefetch = await self.forwarder.forward(
                prep, first, request)
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
        return bad("; ".join(str(e.get("msg")) for e in exc.errors())).response()

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

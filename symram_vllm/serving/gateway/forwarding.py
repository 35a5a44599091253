"""Forwarding a routed request: ask the chosen engine to prefetch the part of the
prefix it holds only on disk, open the upstream response, and retry on another engine
while nothing has reached the client (connection failures, 502/503/504)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import httpx
from fastapi import Request

from symram_vllm.serving.gateway.backends import Backend, BackendPool
from symram_vllm.serving.gateway.config import GatewayConfig
from symram_vllm.serving.gateway.errors import GatewayError
from symram_vllm.serving.gateway.metrics import GatewayMetrics
from symram_vllm.serving.gateway.prepared import Prepared
from symram_vllm.serving.gateway.routing import RouteDecision
from symram_vllm.serving.gateway.upstream import FastUpstream

logger = logging.getLogger("symram.gateway")

REQUEST_ID_HEADER = "x-request-id"
RETRY_STATUSES = frozenset({502, 503, 504})
FORWARD_HEADERS = ("accept", "traceparent", "tracestate", "user-agent")
RouteFn = Callable[[Prepared, tuple[str, ...]], RouteDecision]


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


class Forwarder:
    """The gateway's way to an engine for one routed request: prefetch, send, retry.
    `route` picks the next engine for a retry (excluding those that failed)."""

    def __init__(self, config: GatewayConfig, upstream: httpx.AsyncClient | FastUpstream,
                 control: httpx.AsyncClient, control_headers: dict[str, str],
                 pool: BackendPool, metrics: GatewayMetrics, route: RouteFn) -> None:
        self.config = config
        self.upstream = upstream
        self.control = control
        self.control_headers = control_headers
        self.pool = pool
        self.metrics = metrics
        self.route = route

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

"""The engines behind the gateway: their state, health checks (eject and readmit), the
stats poll that feeds the dashboard, and discovery of engines behind a DNS name (a
Kubernetes headless service resolves to one address per ready pod)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from symram_vllm.serving.gateway.config import BackendConfig, DiscoveryConfig, GatewayConfig

logger = logging.getLogger("symram.gateway")


@dataclass(frozen=True)
class EngineInfo:
    """What an engine's control endpoint says about its key namespace."""

    instance_id: str
    signature_digest: str
    block_size: int
    tp_size: int = 1
    codec: str = "none"
    model: str = ""
    none_hash_seed: str | None = None

    @classmethod
    def parse(cls, data: dict[str, Any]) -> EngineInfo:
        digest = str(data["signature_digest"])
        bytes.fromhex(digest)  # ValueError if the engine sent garbage
        block_size = int(data["block_size"])
        if block_size <= 0:
            raise ValueError(f"block_size {block_size}")
        seed = data.get("none_hash_seed")
        return cls(
            instance_id=str(data.get("instance_id") or ""),
            signature_digest=digest,
            block_size=block_size,
            tp_size=max(int(data.get("tp_size") or 1), 1),
            codec=str(data.get("codec") or "none"),
            model=str(data.get("model") or ""),
            none_hash_seed=None if seed is None else str(seed),
        )


@dataclass
class Backend:
    name: str
    url: str
    control_url: str | None
    max_inflight: int
    healthy: bool = False
    checked: bool = False
    control_ok: bool = False
    info: EngineInfo | None = None
    models: list[dict[str, Any]] = field(default_factory=list)
    inflight: int = 0
    failures: int = 0
    successes: int = 0
    last_error: str = ""
    changed_at: float = field(default_factory=time.time)
    last_stats: dict[str, float] = field(default_factory=dict)
    stats_at: float | None = None  # wall-clock time of the last successful stats poll
    source: str | None = None  # the discovery URL that found it (None: configured)

    @classmethod
    def from_config(cls, cfg: BackendConfig, default_max_inflight: int) -> Backend:
        assert cfg.name is not None
        return cls(cfg.name, cfg.url, cfg.control_url, cfg.max_inflight or default_max_inflight)

    def serves(self, model: str) -> bool:
        return any(m.get("id") == model for m in self.models)

    def control_rank_urls(self) -> list[str]:
        """Control URL of every TP rank (rank r listens on the rank-0 port + r)."""
        if self.control_url is None:
            return []
        tp = self.info.tp_size if self.info else 1
        parts = urlsplit(self.control_url)
        if parts.port is None:
            return [self.control_url]
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
        return [
            urlunsplit(parts._replace(netloc=f"{host}:{parts.port + r}")) for r in range(tp)
        ]

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name, "url": self.url, "control_url": self.control_url,
            "healthy": self.healthy, "control_ok": self.control_ok, "inflight": self.inflight,
            "max_inflight": self.max_inflight, "models": [m.get("id") for m in self.models],
            "instance_id": self.info.instance_id if self.info else None,
            "block_size": self.info.block_size if self.info else None,
            "last_error": self.last_error,
            "stats_at": self.stats_at,
        }


StatsListener = Callable[[Backend, dict[str, float], float], None]
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA), sorted, without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                         type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def discovered_backend(spec: DiscoveryConfig, address: str, offset: int | None,
                       default_max_inflight: int) -> Backend:
    parts = urlsplit(spec.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{address}]" if ":" in address else address
    control_port = spec.control_port or (port + offset if offset is not None else None)
    return Backend(
        name=f"{host}:{port}", url=urlunsplit(parts._replace(netloc=f"{host}:{port}")),
        control_url=f"http://{host}:{control_port}" if control_port else None,
        max_inflight=default_max_inflight, source=spec.url)


class BackendPool:
    def __init__(self, config: GatewayConfig, client: httpx.AsyncClient,
                 control_headers: dict[str, str] | None = None,
                 resolver: Resolver = resolve_addresses) -> None:
        self.config = config
        self.client = client
        self.control_headers = control_headers or {}  # the control token
        self.resolver = resolver
        self.backends = [
            Backend.from_config(b, config.limits.max_inflight_per_instance)
            for b in config.backends
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self.stats_listeners: list[StatsListener] = []
        self.health_listeners: list[Callable[[Backend], None]] = []

    # -- queries -------------------------------------------------------------------------
    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.healthy]

    def serving(self, model: str) -> list[Backend]:
        return [b for b in self.backends if b.healthy and b.serves(model)]

    def models(self) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for backend in self.healthy():
            for model in backend.models:
                seen.setdefault(str(model.get("id")), model)
        return list(seen.values())

    def by_name(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)

    # -- health --------------------------------------------------------------------------
    def _set_health(self, backend: Backend, healthy: bool, why: str = "") -> None:
        if backend.healthy != healthy or not backend.checked:
            if healthy:
                logger.info("backend %s (%s) is healthy", backend.name, backend.url)
            elif backend.checked and backend.healthy:
                logger.warning("backend %s (%s) ejected: %s", backend.name, backend.url, why)
            else:
                logger.warning("backend %s (%s) is not healthy: %s", backend.name,
                               backend.url, why)
            backend.changed_at = time.time()
        backend.healthy = healthy
        backend.checked = True
        for listener in self.health_listeners:
            listener(backend)

    def mark_failed(self, backend: Backend, why: str) -> None:
        """Passive ejection: a request could not reach the engine."""
        backend.last_error = why
        backend.successes = 0
        backend.failures = max(backend.failures, self.config.timeouts.eject_after_failures)
        self._set_health(backend, False, why)

    async def check(self, backend: Backend) -> None:
        t = self.config.timeouts
        try:
            response = await self.client.get(f"{backend.url}/health",
                                              timeout=t.health_timeout_s)
            if response.status_code != 200:
                raise RuntimeError(f"/health returned {response.status_code}")
            models = await self.client.get(f"{backend.url}/v1/models",
                                           timeout=t.health_timeout_s)
            models.raise_for_status()
            backend.models = list(models.json().get("data") or [])
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            backend.last_error = why
            backend.successes = 0
            backend.failures += 1
            if not backend.checked or backend.failures >= t.eject_after_failures:
                self._set_health(backend, False, why)
        else:
            backend.failures = 0
            backend.successes += 1
            if not backend.checked or backend.healthy or (
                backend.successes >= t.readmit_after_successes
            ):
                self._set_health(backend, True)
        await self._check_control(backend)

    async def _check_control(self, backend: Backend) -> None:
        if backend.control_url is None:
            return
        try:
            response = await self.client.get(f"{backend.control_url}/symram/info",
                                              timeout=self.config.timeouts.health_timeout_s,
                                              headers=self.control_headers)
            response.raise_for_status()
            info = EngineInfo.parse(response.json())
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            if backend.control_ok:
                logger.warning("backend %s: control endpoint %s unavailable (%s): routing "
                               "without its prefix information", backend.name,
                               backend.control_url, exc)
            backend.control_ok = False
            return
        if not backend.control_ok:
            logger.info("backend %s: control endpoint %s (instance %r, block size %d)",
                        backend.name, backend.control_url, info.instance_id, info.block_size)
        backend.info = info
        backend.control_ok = True

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.backends))

    async def poll_stats(self, backend: Backend) -> None:
        if backend.control_url is None or not backend.control_ok:
            return
        totals: dict[str, float] = {}
        try:
            for url in backend.control_rank_urls():
                response = await self.client.get(f"{url}/symram/stats",
                                                  timeout=self.config.timeouts.health_timeout_s,
                                                  headers=self.control_headers)
                response.raise_for_status()
                for key, value in response.json().items():
                    if isinstance(value, int | float):
                        totals[key] = totals.get(key, 0.0) + float(value)
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("backend %s: stats poll failed: %s", backend.name, exc)
            return
        backend.last_stats = totals
        now = time.time()
        backend.stats_at = now
        for listener in self.stats_listeners:
            listener(backend, totals, now)

    async def discover(self) -> None:
        """Resolve every discovery name; add backends for new addresses, drop vanished
        ones. A failed lookup keeps what the last one found."""
        for spec in self.config.discover:
            parts = urlsplit(spec.url)
            assert parts.hostname is not None
            try:
                addresses = await self.resolver(
                    parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
            except OSError as exc:
                logger.warning("discovery of %s failed (%s): keeping %d known engines",
                               spec.url, exc, sum(b.source == spec.url for b in self.backends))
                continue
            found = {b.name: b for b in (
                discovered_backend(spec, a, self.config.control_port_offset,
                                   self.config.limits.max_inflight_per_instance)
                for a in addresses)}
            known = {b.name for b in self.backends if b.source == spec.url}
            for name in known - set(found):
                logger.info("discovery of %s: engine %s is gone", spec.url, name)
            self.backends = [b for b in self.backends
                             if b.source != spec.url or b.name in found]
            fresh = [b for name, b in found.items()
                     if name not in known and self.by_name(name) is None]
            for backend in fresh:
                logger.info("discovery of %s: engine %s (%s)", spec.url, backend.name,
                            backend.url)
            self.backends.extend(fresh)
            await asyncio.gather(*(self.check(b) for b in fresh))

    async def _loop(self, interval: float, step: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await step()
            except Exception:  # a background loop must outlive one bad round
                logger.exception("gateway background task failed")

    def start(self) -> None:
        t = self.config.timeouts
        self._tasks = [
            asyncio.create_task(self._loop(t.health_interval_s, self.check_all)),
            asyncio.create_task(self._loop(
                t.stats_interval_s,
                lambda: asyncio.gather(*(self.poll_stats(b) for b in self.backends)))),
        ]
        if self.config.discover:
            interval = min(spec.interval_s for spec in self.config.discover)
            self._tasks.append(asyncio.create_task(self._loop(interval, self.discover)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

"""Where does a prompt's prefix live? One small interface, one implementation per
source of truth.

``ControlLocator`` asks each engine's control endpoint (``POST /symram/lookup``) in
parallel under a short deadline; an engine that does not answer in time counts as
holding nothing. A Redis-directory locator (issue D's ``RedisDirectory``) can replace
it by implementing ``PrefixLocator.locate`` over the same per-engine key lists.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from symram_vllm.serving.gateway.backends import Backend

logger = logging.getLogger("symram.gateway")


@dataclass(frozen=True)
class PrefixHit:
    """Longest leading run of a prompt's blocks an engine holds, per tier."""

    dram: int = 0
    disk: int = 0
    any: int = 0


@dataclass(frozen=True)
class LocateQuery:
    backend: Backend
    keys: list[bytes]  # the prompt's chain keys in this engine's namespace


class PrefixLocator(ABC):
    @abstractmethod
    async def locate(self, queries: Sequence[LocateQuery]) -> dict[str, PrefixHit]:
        """Prefix held by each queried backend, by backend name. Backends that could not
        be asked are left out (the router treats them as holding nothing)."""


class ControlLocator(PrefixLocator):
    def __init__(
        self,
        client: httpx.AsyncClient,
        timeout_s: float,
        on_failure: Callable[[Backend, str], None] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.on_failure = on_failure
        self.headers = headers or {}  # the control token

    async def _ask(self, query: LocateQuery) -> tuple[str, PrefixHit | None]:
        backend = query.backend
        if not query.keys or backend.control_url is None:
            return backend.name, PrefixHit()
        try:
            response = await self.client.post(
                f"{backend.control_url}/symram/lookup",
                json={"keys": [k.hex() for k in query.keys]},
                timeout=self.timeout_s,
                headers=self.headers,
            )
            response.raise_for_status()
            data = response.json()
            return backend.name, PrefixHit(int(data["dram"]), int(data["disk"]),
                                           int(data["any"]))
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            kind = "lookup_timeout" if isinstance(exc, httpx.TimeoutException) else "lookup"
            logger.debug("lookup on %s failed: %r", backend.name, exc)
            if self.on_failure is not None:
                self.on_failure(backend, kind)
            return backend.name, None

    async def locate(self, queries: Sequence[LocateQuery]) -> dict[str, PrefixHit]:
        answers = await asyncio.gather(*(self._ask(q) for q in queries))
        return {name: hit for name, hit in answers if hit is not None}

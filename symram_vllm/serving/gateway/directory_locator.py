"""Prefix routing from the shared block directory, not from busy engines.

Asking each engine's control endpoint how much of a prompt it holds costs a request
to a process that is busy generating: under load the answers miss the gateway's
budget and requests fall back to least-loaded routing exactly when routing matters.
The engines already publish what they hold to the shared directory (Redis or Redis
Cluster), so the gateway reads it there: one pipelined round trip for all engines
(one read-only script per model namespace, see ``symram_vllm.directory.locate``).

The control endpoints stay the fallback: for engines whose directory instance id the
gateway does not know (an engine without ``instance_id``), and for everyone while the
directory is unreachable. A failed directory call (or SLOW_TRIPS slow ones in a row)
opens a short breaker (``retry_after_s``) so an outage costs one timeout, not one per
request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis

from symram_vllm.directory.locate import LOCATE, locate_command, parse_locate
from symram_vllm.redis_link import LinkOptions, make_async_client, redact
from symram_vllm.serving.gateway.locator import LocateQuery, PrefixHit, PrefixLocator

logger = logging.getLogger("symram.gateway")

# Slow directory answers in a row before the breaker opens (one slow answer on a busy
# host is not an outage).
SLOW_TRIPS = 3


class DirectoryLocator(PrefixLocator):
    # The gateway may look keys up for an engine whose control endpoint is down.
    needs_control = False

    def __init__(
        self,
        url: str,
        *,
        fallback: PrefixLocator | None = None,
        options: LinkOptions | None = None,
        timeout_s: float = 0.25,
        retry_after_s: float = 1.0,
    ) -> None:
        self.url = url
        self.fallback = fallback
        self.options = options or LinkOptions(socket_timeout_s=timeout_s,
                                              connect_timeout_s=timeout_s)
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.client: Any = make_async_client(url, self.options, client_name="symram-gateway")
        self._down_until = 0.0
        # The first call also connects and loads the script: give it a second.
        self._warm = False
        self._slow = 0  # timeouts in a row
        self.counters = {"directory": 0, "fallback": 0, "errors": 0, "round_trips": 0}

    async def locate(self, queries: Sequence[LocateQuery]) -> dict[str, PrefixHit]:
        known = [q for q in queries if q.keys and q.backend.info is not None
                 and q.backend.info.instance_id]
        rest = [q for q in queries if q not in known]
        hits: dict[str, PrefixHit] = {}
        if known and time.monotonic() >= self._down_until:
            try:
                budget = self.timeout_s if self._warm else max(self.timeout_s, 1.0)
                hits = await asyncio.wait_for(self._ask(known), budget)
                self._warm = True
                self._slow = 0
                self.counters["directory"] += 1
            except (redis.RedisError, OSError, asyncio.TimeoutError, ValueError) as exc:
                self._failed(exc)
                rest = list(queries)
        elif known:
            rest = list(queries)
        if rest and self.fallback is not None:
            self.counters["fallback"] += 1
            hits.update(await self.fallback.locate(rest))
        return hits

    def _failed(self, exc: BaseException) -> None:
        """A slow answer costs this request its directory lookup; an error, or
        SLOW_TRIPS slow answers in a row, stops asking for retry_after_s."""
        self.counters["errors"] += 1
        if isinstance(exc, asyncio.TimeoutError | redis.exceptions.TimeoutError):
            self._slow += 1
            if self._slow < SLOW_TRIPS:
                return
        self._slow = 0
        self._down_until = time.monotonic() + self.retry_after_s
        logger.warning("prefix lookup in the directory %s failed (%r); asking the engines "
                       "for %.1f s", redact(self.url), exc, self.retry_after_s)

    async def _ask(self, queries: Sequence[LocateQuery], reload: bool = True
                   ) -> dict[str, PrefixHit]:
        """One pipeline: one LOCATE per namespace (engines of one model share one)."""
        groups: dict[tuple[str, tuple[bytes, ...]], list[LocateQuery]] = {}
        for q in queries:
            assert q.backend.info is not None
            groups.setdefault((q.backend.info.signature_digest, tuple(q.keys)), []).append(q)
        plan = []
        pipe = self.client.pipeline(transaction=False)
        for (digest, keys), members in groups.items():
            instances = sorted({q.backend.info.instance_id for q in members if q.backend.info})
            command = locate_command(bytes.fromhex(digest), list(keys), instances)
            pipe.execute_command(*command.args())
            plan.append((members, instances))
        self.counters["round_trips"] += 1
        answers = await pipe.execute(raise_on_error=False)
        if reload and any(isinstance(a, redis.exceptions.NoScriptError) for a in answers):
            await self.client.script_load(LOCATE)  # first use, or a restarted Redis
            return await self._ask(queries, reload=False)
        hits: dict[str, PrefixHit] = {}
        for (members, instances), answer in zip(plan, answers, strict=True):
            if isinstance(answer, Exception):
                raise answer
            held = parse_locate(answer, instances)
            for q in members:
                assert q.backend.info is not None
                hits[q.backend.name] = PrefixHit(*held[q.backend.info.instance_id])
        return hits

    async def aclose(self) -> None:
        await self.client.aclose()


def make_locator(routing: Any, control: PrefixLocator) -> PrefixLocator:
    """The gateway's locator: the directory (control endpoints as fallback) when
    ``routing.directory_url`` is set, else the control endpoints alone. A directory
    URL that cannot be used is logged and the control endpoints are used."""
    url = getattr(routing, "directory_url", None)
    if not url:
        return control
    try:
        return DirectoryLocator(url, fallback=control,
                                timeout_s=getattr(routing, "directory_timeout_s", 0.25))
    except ValueError as exc:
        logger.error("routing.directory_url %s unusable (%s): routing with the engines' "
                     "control endpoints", redact(url), exc)
        return control

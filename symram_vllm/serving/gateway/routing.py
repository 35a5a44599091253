"""Which engine gets a request.

1. **prefix**: the engine whose tiers hold the longest prefix of the prompt wins, with
   its matched tokens weighed against its in-flight load:
   ``score = block_size x (dram + disk_weight x (any - dram)) - load_penalty_tokens x in_flight``.
   If an engine without the prefix scores higher (the holder is too busy), the request
   goes to the least loaded engine instead (reason **load**).
2. **affinity**: nobody holds a prefix, but the request names a session (the
   ``x-session-id`` header or the body's ``user``): rendezvous hashing keeps a session on
   one engine while the set of engines is stable, and moves only its share when not.
3. **least_loaded**: fewest in-flight requests, ties taken in turn.

Engines at their in-flight limit are never chosen; when all are, the caller answers
429 with Retry-After.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from symram_vllm.serving.gateway.backends import Backend
from symram_vllm.serving.gateway.config import RoutingConfig
from symram_vllm.serving.gateway.locator import PrefixHit

REASONS = ("prefix", "load", "affinity", "least_loaded", "single")


@dataclass(frozen=True)
class RouteDecision:
    backend: Backend
    reason: str
    hit: PrefixHit
    block_size: int
    retry_of: str | None = None

    @property
    def matched_blocks(self) -> int:
        return self.hit.any

    @property
    def matched_tokens(self) -> int:
        return self.hit.any * self.block_size

    def header(self) -> str:
        value = (
            f"instance={self.backend.name};reason={self.reason};"
            f"matched_blocks={self.hit.any};dram_blocks={self.hit.dram}"
        )
        if self.retry_of:
            value += f";retry_of={self.retry_of}"
        return value


def _rendezvous(session: str, backend: Backend) -> bytes:
    return hashlib.blake2b(f"{session}\0{backend.name}".encode(), digest_size=8).digest()


class Router:
    def __init__(self, config: RoutingConfig) -> None:
        self.config = config
        self._turn = itertools.count()

    def score(self, backend: Backend, hit: PrefixHit | None) -> float:
        block_size = backend.info.block_size if backend.info else 0
        held = 0.0
        if hit is not None and hit.any >= self.config.min_prefix_blocks:
            held = hit.dram + self.config.disk_weight * (hit.any - hit.dram)
        return block_size * held - self.config.load_penalty_tokens * backend.inflight

    def available(self, candidates: Sequence[Backend], exclude: Collection[str] = ()
                  ) -> list[Backend]:
        return [b for b in candidates
                if b.name not in exclude and b.inflight < b.max_inflight]

    def choose(
        self,
        candidates: Sequence[Backend],
        hits: Mapping[str, PrefixHit],
        session: str | None = None,
        exclude: Collection[str] = (),
    ) -> RouteDecision | None:
        """The decision, or None when every candidate is excluded or at its limit."""
        avail = self.available(candidates, exclude)
        if not avail:
            return None

        def decide(backend: Backend, reason: str) -> RouteDecision:
            hit = hits.get(backend.name) or PrefixHit()
            block = backend.info.block_size if backend.info else 0
            return RouteDecision(backend, reason, hit, block)

        if len(avail) == 1:
            return decide(avail[0], "single")
        holders = [b for b in avail
                   if (hits.get(b.name) or PrefixHit()).any >= self.config.min_prefix_blocks]
        if holders:
            best = max(avail, key=lambda b: (self.score(b, hits.get(b.name)), -b.inflight))
            if best in holders:
                return decide(best, "prefix")
            return decide(self._least_loaded(avail), "load")
        if session:
            return decide(max(avail, key=lambda b: _rendezvous(session, b)), "affinity")
        return decide(self._least_loaded(avail), "least_loaded")

    def _least_loaded(self, avail: Sequence[Backend]) -> Backend:
        low = min(b.inflight for b in avail)
        tied = [b for b in avail if b.inflight == low]
        return tied[next(self._turn) % len(tied)]

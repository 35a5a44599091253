"""Test-only fault injection for the copy path: make the n-th load or save raise.

Set ``SYMRAM_FAULT_COPY="load:2"`` (or ``"save:1,load:3"``) in an engine's environment,
or pass a ``CopyFaults`` to ``PageMover``, and the n-th copy of that kind (1-based,
counted per worker) raises ``InjectedCopyFault`` before touching any memory. The
tests use it to prove that every exception in a copy job becomes load errors (vLLM
recomputes) and never a silently finished load. Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

ENV = "SYMRAM_FAULT_COPY"
KINDS = ("load", "save")


class InjectedCopyFault(RuntimeError):
    """Raised by an injected fault (never in normal operation)."""


@dataclass
class CopyFaults:
    # kind -> the 1-based call number that raises.
    fail_at: dict[str, int] = field(default_factory=dict)
    _calls: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def parse(cls, spec: str) -> CopyFaults:
        fail_at: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            kind, _, number = item.partition(":")
            if kind not in KINDS or not number.isdigit() or int(number) < 1:
                raise ValueError(
                    f"{ENV}={spec!r}: each item must be load:N or save:N with N >= 1, "
                    f"got {item!r}"
                )
            fail_at[kind] = int(number)
        return cls(fail_at)

    @classmethod
    def from_env(cls) -> CopyFaults:
        return cls.parse(os.environ.get(ENV, ""))

    def check(self, kind: str) -> None:
        if kind not in self.fail_at:
            return
        with self._lock:
            self._calls[kind] = self._calls.get(kind, 0) + 1
            hit = self._calls[kind] == self.fail_at[kind]
        if hit:
            raise InjectedCopyFault(f"injected {kind} fault (call {self.fail_at[kind]})")

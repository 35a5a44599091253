"""Write degradation for the disk tier: stop writing after an I/O error, retry later.

A full or read-only filesystem must not turn every save into a failing syscall (and
a log line), and must not stop reads. After a failure the gate closes; once the
back-off has passed, exactly one write is let through as a probe. Success reopens
the gate, failure doubles the back-off (up to a cap).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class WriteGate:
    def __init__(
        self, name: str, backoff_s: float, backoff_max_s: float, clock: Callable[[], float]
    ) -> None:
        self.name = name
        self._base = backoff_s
        self._max = max(backoff_s, backoff_max_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._backoff = backoff_s
        self._retry_at = 0.0
        self._probing = False
        self.disabled = False
        self.failures = 0
        self.outages = 0
        self.last_error = ""

    def allow(self) -> bool:
        """May a write be attempted now? While closed, only one probe after the back-off."""
        with self._lock:
            if not self.disabled:
                return True
            if self._probing or self._clock() < self._retry_at:
                return False
            self._probing = True
            return True

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = str(exc)
            if not self.disabled:
                self.disabled = True
                self.outages += 1
                self._backoff = self._base
                logger.warning(
                    "%s: writes disabled after %s; reads continue, retrying in %.0fs",
                    self.name, exc, self._backoff,
                )
            elif self._probing:
                self._backoff = min(self._backoff * 2, self._max)
            self._probing = False
            self._retry_at = self._clock() + self._backoff

    def succeeded(self) -> None:
        with self._lock:
            self._probing = False
            if self.disabled:
                self.disabled = False
                self._backoff = self._base
                logger.warning("%s: writes resumed", self.name)

    def abandon(self) -> None:
        """A permitted write did not reach the disk for another reason (budget, dedup)."""
        with self._lock:
            self._probing = False

    def retry_in(self) -> float:
        with self._lock:
            return max(0.0, self._retry_at - self._clock()) if self.disabled else 0.0

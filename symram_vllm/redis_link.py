"""A Redis client that never hangs or raises on an outage: bounded timeouts, a circuit
breaker, a bounded write queue and a background reconnect with exponential backoff.

symram's Redis users (the shared directory, the Redis page tier) are caches: when
Redis is gone they must degrade to "miss" at once, not stall the scheduler. So:

* every socket operation has a timeout and redis-py's own retries are off;
* the first connection error opens the breaker: later calls return their fallback
  without touching the network, so a dead Redis costs one timeout per outage, not
  one per call;
* a daemon thread probes with PING on an exponential backoff (with jitter); when it
  answers, queued writes are replayed in order and only then does the breaker close;
* writes made while the breaker is open go to a bounded queue (oldest dropped and
  counted when full). Replay is at-least-once: a write that failed mid-flight may be
  applied twice, so queued operations are written to be idempotent where it matters.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

T = TypeVar("T")
Op = Callable[[redis.Redis], object]

# Errors that mean "Redis is not reachable right now" (BusyLoadingError, raised while
# a restarted server loads its data, is a ConnectionError subclass).
OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
SUPPORTED_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class LinkOptions:
    socket_timeout_s: float = 0.25
    connect_timeout_s: float = 0.25
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 5.0
    queue_max_ops: int = 10_000

    def __post_init__(self) -> None:
        for name in ("socket_timeout_s", "connect_timeout_s", "backoff_initial_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LinkOptions.{name} must be > 0, got {getattr(self, name)}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("LinkOptions.backoff_max_s must be >= backoff_initial_s")
        if self.queue_max_ops < 1:
            raise ValueError(f"LinkOptions.queue_max_ops must be >= 1, got {self.queue_max_ops}")


def check_url(url: str) -> str:
    """Return `url` if it names a Redis server symram can use, else raise ValueError."""
    if not isinstance(url, str) or not url.startswith(SUPPORTED_SCHEMES):
        raise ValueError(
            f"unsupported Redis URL {url!r}: use redis://host:port/db, rediss://... (TLS) "
            "or unix:///path/to/redis.sock"
        )
    return url


def redact(url: str) -> str:
    """`url` without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


class RedisLink:
    def __init__(
        self, url: str, *, options: LinkOptions | None = None, client_name: str = "symram"
    ) -> None:
        self.url = check_url(url)
        self.options = options or LinkOptions()
        # from_url validates the rest of the URL (port, db...) and raises ValueError.
        self.client: redis.Redis = redis.Redis.from_url(
            url,
            socket_timeout=self.options.socket_timeout_s,
            socket_connect_timeout=self.options.connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
            client_name=client_name,
        )
        self._lock = threading.Lock()
        self._queue: deque[Op] = deque()
        self._available = True
        self._closed = threading.Event()
        self._reconnector: threading.Thread | None = None
        self.errors = 0
        self.outages = 0
        self.reconnects = 0
        self.short_circuits = 0
        self.queued_total = 0
        self.dropped = 0
        self.flushed = 0
        self._last_error_log = 0.0

    # -- calls -----------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self._available

    def call(self, op: Callable[[redis.Redis], T], fallback: T) -> T:
        """Run a read (or a write whose result matters now); `fallback` on any failure."""
        if not self._available:
            self.short_circuits += 1
            return fallback
        try:
            return op(self.client)
        except OUTAGE_ERRORS as exc:
            self._trip(exc)
        except redis.RedisError as exc:
            self._error(exc)
        return fallback

    def write(self, op: Op) -> None:
        """Run a write now, or queue it for replay when Redis is back."""
        with self._lock:
            if not self._available:
                self._enqueue_locked(op)
                return
        try:
            op(self.client)
        except OUTAGE_ERRORS as exc:
            with self._lock:
                self._enqueue_locked(op)
            self._trip(exc)
        except redis.RedisError as exc:
            self._error(exc)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def counters(self) -> dict[str, float]:
        return {
            "available": float(self._available),
            "errors": float(self.errors),
            "outages": float(self.outages),
            "reconnects": float(self.reconnects),
            "short_circuits": float(self.short_circuits),
            "queued": float(len(self._queue)),
            "queued_total": float(self.queued_total),
            "dropped": float(self.dropped),
            "flushed": float(self.flushed),
        }

    def close(self) -> None:
        self._closed.set()
        thread = self._reconnector
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.options.connect_timeout_s + 1.0)
        with self._lock:
            self.dropped += len(self._queue)
            self._queue.clear()
        with contextlib.suppress(redis.RedisError, OSError):
            self.client.close()

    # -- breaker ---------------------------------------------------------------------------
    def _enqueue_locked(self, op: Op) -> None:
        if len(self._queue) >= self.options.queue_max_ops:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(op)
        self.queued_total += 1

    def _error(self, exc: Exception) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._last_error_log > 10.0:  # a broken script or key must not flood logs
            self._last_error_log = now
            logger.warning("symram: Redis %s: %s", redact(self.url), exc)

    def _trip(self, exc: Exception) -> None:
        self.errors += 1
        with self._lock:
            if not self._available or self._closed.is_set():
                return
            self._available = False
            self.outages += 1
            self._reconnector = threading.Thread(
                target=self._reconnect_loop, name="symram-redis-reconnect", daemon=True
            )
            self._reconnector.start()
        logger.warning(
            "symram: Redis %s unavailable (%s); serving misses and queueing writes",
            redact(self.url),
            exc,
        )
        self._drop_connections()

    def _drop_connections(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            self.client.connection_pool.disconnect()

    def _reconnect_loop(self) -> None:
        delay = self.options.backoff_initial_s
        while not self._closed.wait(delay * random.uniform(0.5, 1.0)):
            try:
                self.client.ping()
                if self._replay_queue():
                    logger.warning("symram: Redis %s is back", redact(self.url))
                    return
            except OUTAGE_ERRORS:
                self._drop_connections()
            except redis.RedisError as exc:  # e.g. NOAUTH: keep the breaker open
                self._error(exc)
            delay = min(delay * 2, self.options.backoff_max_s)

    def _replay_queue(self) -> bool:
        """Replay queued writes in order; close the breaker once the queue is empty.
        Raises an outage error if Redis goes away again mid-replay."""
        while not self._closed.is_set():
            with self._lock:
                if not self._queue:
                    self._available = True
                    self.reconnects += 1
                    return True
                op = self._queue[0]
            try:
                op(self.client)
                self.flushed += 1
            except OUTAGE_ERRORS:
                raise
            except redis.RedisError as exc:
                self._error(exc)  # a write Redis rejects will not succeed later either
            with self._lock:
                if self._queue and self._queue[0] is op:
                    self._queue.popleft()
        return False

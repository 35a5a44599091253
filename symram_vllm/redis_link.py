"""A Redis client that never hangs or raises on an outage: bounded timeouts, a circuit
breaker, a bounded write queue and a background reconnect with exponential backoff.

symram's Redis users (the shared directory, the Redis page tier) are caches: when
Redis is gone they must degrade to "miss" at once, not stall the scheduler. So:

* every socket operation has a timeout and redis-py's own retries are off;
* the first connection error opens the breaker: later calls return their fallback
  without touching the network, so a dead Redis costs one timeout per outage, not
  one per call;
* a daemon thread probes with PING (on a cluster: every master answers and
  ``cluster_state:ok``) on an exponential backoff (with jitter); when it answers,
  queued writes are replayed in order and only then does the breaker close;
* writes made while the breaker is open go to a bounded queue (oldest dropped and
  counted when full). Replay is at-least-once: a write that failed mid-flight may be
  applied twice, so queued operations are written to be idempotent where it matters.

An outage is not a misconfiguration. A wrong password, a user without the needed
ACL permissions or a server certificate the CA does not vouch for will not heal by
retrying: ``RedisLink`` checks once at construction and raises ``RedisAuthError`` /
``RedisTLSError`` (both ``RedisConfigError``, a ``ValueError``) naming the URL (without
its password) and the fix. Callers turn that into "this Redis feature is off".

One factory, ``make_client``, builds every connection symram makes: single node
(``redis://``, ``rediss://`` with TLS, ``unix://``) or Redis Cluster
(``redis+cluster://host:port,host:port`` / ``rediss+cluster://``, or any URL with
``LinkOptions.cluster``), with an ACL user/password and TLS files from the options.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis._parsers.encoders import Encoder
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.retry import Retry

logger = logging.getLogger(__name__)

T = TypeVar("T")
Client = redis.Redis | RedisCluster
Op = Callable[[Any], object]

# Errors that mean "Redis is not reachable right now" (BusyLoadingError, raised while
# a restarted server loads its data, is a ConnectionError subclass). A cluster adds
# "this slot has no master right now" (during a failover).
OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
)
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SUPPORTED_SCHEMES = ("redis://", "rediss://", "unix://", *CLUSTER_SCHEMES)
# Query parameters of a cluster URL passed to every node's connection (single-node
# URLs pass any redis-py connection argument, e.g. ?ssl_ca_certs=/path/ca.pem).
CLUSTER_URL_QUERY = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


class RedisConfigError(ValueError):
    """Redis answered, but this configuration cannot work (retrying will not help)."""


class RedisAuthError(RedisConfigError):
    """Wrong user or password, or an ACL user without the commands symram needs."""


class RedisTLSError(RedisConfigError):
    """TLS failed: the server certificate does not match the CA, or a TLS file is bad."""


@dataclass(frozen=True)
class LinkOptions:
    socket_timeout_s: float = 0.25
    connect_timeout_s: float = 0.25
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 5.0
    queue_max_ops: int = 10_000
    # Most connections per node; None = as many as callers need (redis-py's default).
    # A full pool is not an outage: the call gets its fallback, the breaker stays shut.
    pool_size: int | None = None
    # Redis Cluster for a plain redis:// or rediss:// URL (the cluster schemes imply it).
    cluster: bool = False
    # ACL user and password (override any in the URL).
    username: str | None = None
    password: str | None = None
    # TLS (rediss://): the CA that signed the server certificate, and a client
    # certificate + key when the server requires one (tls-auth-clients).
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_check_hostname: bool = True

    def __post_init__(self) -> None:
        for name in ("socket_timeout_s", "connect_timeout_s", "backoff_initial_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LinkOptions.{name} must be > 0, got {getattr(self, name)}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("LinkOptions.backoff_max_s must be >= backoff_initial_s")
        if self.queue_max_ops < 1:
            raise ValueError(f"LinkOptions.queue_max_ops must be >= 1, got {self.queue_max_ops}")
        if self.pool_size is not None and self.pool_size < 1:
            raise ValueError(f"LinkOptions.pool_size must be >= 1, got {self.pool_size}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("LinkOptions: set tls_cert_file and tls_key_file together")


def check_url(url: str) -> str:
    """Return `url` if it names a Redis server symram can use, else raise ValueError."""
    if not isinstance(url, str) or not url.startswith(SUPPORTED_SCHEMES):
        shown = redact(url) if isinstance(url, str) else url
        raise ValueError(
            f"unsupported Redis URL {shown!r}: use redis://host:port/db, rediss://... (TLS), "
            "unix:///path/to/redis.sock or redis+cluster://host:port,host:port (Cluster)"
        )
    return url


def redact(url: str) -> str:
    """`url` without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def is_cluster(url: str, options: LinkOptions) -> bool:
    return options.cluster or url.startswith(CLUSTER_SCHEMES)


def _client_kwargs(url: str, options: LinkOptions, client_name: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "socket_timeout": options.socket_timeout_s,
        "socket_connect_timeout": options.connect_timeout_s,
        "health_check_interval": 0,
        "client_name": client_name,
    }
    if options.pool_size is not None:
        kwargs["max_connections"] = options.pool_size
    if options.username is not None:
        kwargs["username"] = options.username
    if options.password is not None:
        kwargs["password"] = options.password
    if url.startswith(("rediss://", "rediss+cluster://")):
        if url.startswith("rediss+cluster://"):
            kwargs["ssl"] = True  # rediss:// itself makes redis-py use SSLConnection
        kwargs["ssl_cert_reqs"] = "required"
        kwargs["ssl_check_hostname"] = options.tls_check_hostname
        if options.tls_ca_file:
            kwargs["ssl_ca_certs"] = options.tls_ca_file
        if options.tls_cert_file:
            kwargs["ssl_certfile"] = options.tls_cert_file
            kwargs["ssl_keyfile"] = options.tls_key_file
    return kwargs


def _cluster_nodes(url: str) -> tuple[list[ClusterNode], dict[str, Any]]:
    """Startup nodes, credentials and TLS files of
    redis+cluster://[user:pass@]h:p,h:p[/][?ssl_ca_certs=...]."""
    rest = url.split("://", 1)[1]
    auth: dict[str, Any] = {}
    if "@" in rest:
        creds, rest = rest.rsplit("@", 1)
        user, has_pw, password = creds.partition(":")
        if has_pw:
            auth["password"] = unquote(password)
            if user:
                auth["username"] = unquote(user)
        else:
            auth["password"] = unquote(user)
    rest, _, query = rest.partition("?")
    for name, values in parse_qs(query).items():
        if name in CLUSTER_URL_QUERY:
            auth[name] = values[-1]
    hosts = rest.split("/", 1)[0]
    nodes = []
    for item in filter(None, hosts.split(",")):
        parts = urlsplit(f"//{item}")
        try:
            port = parts.port or 6379
        except ValueError as exc:
            raise ValueError(f"bad port in {item!r}") from exc
        if not parts.hostname:
            raise ValueError(f"no host in {item!r}")
        nodes.append(ClusterNode(parts.hostname, port))
    if not nodes:
        raise ValueError("no host:port after the scheme")
    return nodes, auth


def make_client(url: str, options: LinkOptions, client_name: str = "symram") -> Client:
    """A redis-py client for `url` with symram's timeouts, pool size, ACL and TLS.

    Raises ValueError for a URL that cannot be parsed. Never connects."""
    check_url(url)
    kwargs = _client_kwargs(url, options, client_name)
    if not is_cluster(url, options):
        return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **kwargs)
    # The cluster client follows MOVED/ASK itself; one retry (after it re-reads the
    # slot map) rides out a finished failover, a longer outage opens the breaker.
    cluster_kwargs: dict[str, Any] = {
        **kwargs,
        "retry": Retry(NoBackoff(), 1),
        "require_full_coverage": False,
    }
    if url.startswith(CLUSTER_SCHEMES):
        nodes, auth = _cluster_nodes(url)
        for name, value in auth.items():
            if name.startswith("ssl_"):
                cluster_kwargs[name] = value  # like a single-node URL's query: it wins
            else:
                cluster_kwargs.setdefault(name, value)
        return RedisCluster(startup_nodes=nodes, **cluster_kwargs)
    return RedisCluster.from_url(url, **cluster_kwargs)


def make_async_client(url: str, options: LinkOptions, client_name: str = "symram") -> Any:
    """`make_client` for asyncio (the gateway): redis.asyncio's single-node or cluster
    client with the same timeouts, pool size, ACL and TLS. Never connects."""
    from redis.asyncio import Redis as AsyncRedis
    from redis.asyncio.cluster import ClusterNode as AsyncNode
    from redis.asyncio.cluster import RedisCluster as AsyncCluster
    from redis.asyncio.retry import Retry as AsyncRetry

    check_url(url)
    kwargs = _client_kwargs(url, options, client_name)
    if not is_cluster(url, options):
        return AsyncRedis.from_url(url, retry=AsyncRetry(NoBackoff(), 0), **kwargs)
    kwargs.pop("health_check_interval", None)
    cluster_kwargs: dict[str, Any] = {**kwargs, "retry": AsyncRetry(NoBackoff(), 1),
                                      "require_full_coverage": False}
    if url.startswith(CLUSTER_SCHEMES):
        nodes, auth = _cluster_nodes(url)
        for name, value in auth.items():
            cluster_kwargs[name] = value if name.startswith("ssl_") else \
                cluster_kwargs.get(name, value)
        return AsyncCluster(startup_nodes=[AsyncNode(n.host, n.port) for n in nodes],
                            **cluster_kwargs)
    return AsyncCluster.from_url(url, **cluster_kwargs)


def classify(exc: BaseException, url: str) -> RedisConfigError | None:
    """The misconfiguration `exc` reveals, or None when it is just an outage."""
    text = str(exc)
    chain = [exc, exc.__cause__, exc.__context__]
    if isinstance(exc, redis.exceptions.AuthenticationError | redis.exceptions.NoPermissionError) \
            or any(word in text for word in ("WRONGPASS", "NOAUTH", "NOPERM", "invalid username")):
        return RedisAuthError(
            f"Redis {redact(url)} rejected symram's credentials ({text}): set the ACL user "
            "and password (redis.username / redis.password, or user:password@ in the URL) "
            "to a user allowed to run +@read +@write +@scripting +ping +info +cluster"
        )
    if any(isinstance(e, ssl.SSLError) for e in chain if e is not None) or \
            "[SSL" in text or "CERTIFICATE_VERIFY_FAILED" in text:
        return RedisTLSError(
            f"TLS to Redis {redact(url)} failed ({text}): point redis.tls_ca_file at the CA "
            "that signed the server certificate (and check the host name matches it)"
        )
    if isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError):
        return RedisTLSError(f"a TLS file for Redis {redact(url)} cannot be read: {exc}")
    return None


class _ClusterNotYet:
    """Stands in for a cluster client that could not be built because no node answered
    (redis-py's cluster client reads the slot map in its constructor). Scripts can be
    registered on it; every command is an outage until the reconnect loop builds the
    real client."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def get_encoder(self) -> Encoder:
        return Encoder("utf-8", "strict", False)

    def register_script(self, script: str) -> Script:
        return Script(self, script)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        raise redis.exceptions.ConnectionError(f"Redis Cluster not reachable: {self.error}")


class RedisLink:
    def __init__(
        self,
        url: str,
        *,
        options: LinkOptions | None = None,
        client_name: str = "symram",
        verify: bool = True,
    ) -> None:
        self.url = check_url(url)
        self.options = options or LinkOptions()
        self.cluster = is_cluster(url, self.options)
        self._client_name = client_name
        # make_client validates the rest of the URL (port, db...) and raises ValueError.
        self.client: Any
        try:
            self.client = make_client(url, self.options, client_name)
        except redis.exceptions.RedisClusterException as exc:  # no node answered: start degraded
            self.client = _ClusterNotYet(exc)
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
        if verify:
            self.verify()

    def verify(self) -> bool:
        """One probe now (at most a connect timeout): True when Redis answers, False
        on an outage (the breaker opens; the link serves misses until Redis is back).
        Raises RedisAuthError / RedisTLSError when retrying cannot help."""
        try:
            self._probe()
            return True
        except redis.RedisError as exc:
            problem = classify(exc, self.url)
            if problem is not None:
                self.close()
                raise problem from exc
            self._trip(exc)
        except OSError as exc:  # a TLS file that cannot be opened
            problem = classify(exc, self.url) or RedisTLSError(f"Redis {redact(self.url)}: {exc}")
            self.close()
            raise problem from exc
        return False

    def _probe(self) -> None:
        """PING; on a cluster every master, and every slot served (CLUSTER INFO ok)."""
        if isinstance(self.client, _ClusterNotYet):
            try:
                self.client = make_client(self.url, self.options, self._client_name)
            except redis.exceptions.RedisClusterException as exc:
                raise redis.exceptions.ConnectionError(str(exc)) from exc
        if not self.cluster:
            self.client.ping()
            return
        # Every master of the slot map: a random node answers long before a dead
        # master's slots have moved, and closing the breaker then would only trip it
        # again. A failed probe re-reads the map (_drop_connections).
        self.client.ping(target_nodes=RedisCluster.PRIMARIES)
        info = self.client.cluster_info()
        if isinstance(info, dict) and info.get("cluster_state") not in (None, "ok"):
            raise redis.exceptions.ClusterDownError(f"cluster_state is {info.get('cluster_state')}")

    # -- calls -----------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self._available

    def call(self, op: Callable[[Any], T], fallback: T) -> T:
        """Run a read (or a write whose result matters now); `fallback` on any failure."""
        if not self._available:
            self.short_circuits += 1
            return fallback
        try:
            return op(self.client)
        except redis.exceptions.MaxConnectionsError as exc:
            self._error(exc)
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
        except redis.exceptions.MaxConnectionsError as exc:
            self._error(exc)
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
            if self.cluster:
                # Forget the slot map too: after a failover a replica owns the slots.
                self.client.disconnect_connection_pools()
                self.client.nodes_manager.initialize()
            else:
                self.client.connection_pool.disconnect()

    def _reconnect_loop(self) -> None:
        delay = self.options.backoff_initial_s
        while not self._closed.wait(delay * random.uniform(0.5, 1.0)):
            try:
                self._probe()
                if self._replay_queue():
                    logger.warning("symram: Redis %s is back", redact(self.url))
                    return
            except OUTAGE_ERRORS:
                self._drop_connections()
            except redis.RedisError as exc:  # e.g. a password changed under us
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

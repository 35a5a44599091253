"""The ``redis:`` config section: how symram talks to the shared directory's Redis and
to the Redis page tier (connection, security, timeouts, batching, leases).

One pydantic model, meant to be a field of ``SymramConfig`` (``redis: RedisSettings``),
so YAML ``redis: {password: ..., tls_ca_file: ...}`` and env ``SYMRAM_REDIS__PASSWORD``
both work. It turns itself into the option objects of the classes that use it:
``link_options()`` for ``RedisLink``, ``directory_options()`` for ``RedisDirectory``
and ``async_options()`` for ``AsyncDirectory``. Which Redis is still
``directory_url`` / ``redis_pages_url``; every setting here applies to both.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from symram_vllm.directory.async_directory import AsyncDirectoryOptions
from symram_vllm.directory.redis_directory import RedisDirectoryOptions
from symram_vllm.redis_link import LinkOptions


class RedisSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cluster: bool = Field(
        default=False,
        description="The URL names one node of a Redis Cluster (redis+cluster://h:p,h:p "
        "implies it). Every key of one namespace lives in one hash slot: the layout "
        "with the lowest lookup p95 (docs/directory.md).",
    )
    username: str | None = Field(default=None, description="ACL user (default: the URL's).")
    password: SecretStr | None = Field(
        default=None, description="ACL password (default: the URL's). Env: SYMRAM_REDIS__PASSWORD."
    )
    tls_ca_file: Path | None = Field(
        default=None, description="CA certificate that signed the server's (rediss:// URLs)."
    )
    tls_cert_file: Path | None = Field(
        default=None, description="Client certificate, when the server requires one."
    )
    tls_key_file: Path | None = Field(default=None, description="Key of tls_cert_file.")
    tls_check_hostname: bool = Field(
        default=True, description="The server certificate must name the host in the URL."
    )
    # Who waits on it: the scheduler's background directory thread (AsyncDirectory) and
    # the reconnect probe's thread, never the scheduling path (it reads memory; a waiting
    # request waits at most connectors/scheduler.py's FLEET_WAIT_S for a fleet answer,
    # however late it is). The page tier has page_timeout_s, the gateway
    # routing.directory_timeout_s. So a false outage is the expensive mistake (no fleet
    # answers, writes queued until a probe succeeds); a long wait on a dead Redis costs
    # one thread one timeout (tests/test_directory_timeout.py).
    socket_timeout_s: float = Field(
        default=2.0, gt=0, le=60,
        description="Directory reads/writes; past it Redis counts as down (breaker "
        "opens: misses and queued writes until a probe answers). Only a background "
        "thread waits on it, never the scheduler loop, so it is long: a busy Redis or "
        "host (0.25 s tripped at load 10) is not an outage, and a dead Redis costs that "
        "thread one timeout per outage.",
    )
    connect_timeout_s: float = Field(default=0.25, gt=0, le=60)
    page_timeout_s: float = Field(
        default=2.0, gt=0, le=60, description="Page tier reads/writes (pages are large)."
    )
    pool_size: int | None = Field(
        default=None, ge=1, le=4096,
        description="Most connections per node; unset = as many as callers need.",
    )
    backoff_max_s: float = Field(
        default=5.0, gt=0, description="Longest pause between reconnect probes."
    )
    queue_max_ops: int = Field(
        default=10_000, ge=1, description="Writes kept for replay while Redis is down."
    )
    entry_ttl_s: float = Field(
        default=3600.0, ge=0.001,
        description="A location lives this long after it was added or last hit.",
    )
    lease_ttl_s: float = Field(
        default=30.0, ge=0.001,
        description="A promised load protects its shared pages at most this long "
        "(released when the load ends). The one lease TTL of the whole product.",
    )
    batch_interval_s: float = Field(
        default=0.005, gt=0, le=1,
        description="The directory's background thread sends what is queued at least "
        "this often (at once when the scheduler ends a step).",
    )
    fleet_answer_ttl_s: float = Field(
        default=2.0, gt=0,
        description="A fleet lookup's answer is used for this long; then asked again.",
    )
    dedupe_interval_s: float = Field(
        default=1.0, gt=0, description="Fleet dedupe counters are read this often."
    )

    @model_validator(mode="after")
    def _check(self) -> RedisSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("redis.tls_cert_file and redis.tls_key_file go together")
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"redis.{name}: {path} is not a readable file")
        if self.lease_ttl_s > self.entry_ttl_s:
            raise ValueError("redis.lease_ttl_s must not exceed redis.entry_ttl_s")
        if self.fleet_answer_ttl_s >= self.lease_ttl_s:
            raise ValueError("redis.fleet_answer_ttl_s must be below redis.lease_ttl_s (an "
                             "answer is used only while its lease surely holds)")
        return self

    def link_options(self, *, pages: bool = False) -> LinkOptions:
        """Connection options; `pages` gives the page tier's longer socket timeout."""
        return LinkOptions(
            socket_timeout_s=self.page_timeout_s if pages else self.socket_timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            backoff_max_s=max(self.backoff_max_s, 0.05),
            queue_max_ops=self.queue_max_ops,
            pool_size=self.pool_size,
            cluster=self.cluster,
            username=self.username,
            password=self.password.get_secret_value() if self.password else None,
            tls_ca_file=str(self.tls_ca_file) if self.tls_ca_file else None,
            tls_cert_file=str(self.tls_cert_file) if self.tls_cert_file else None,
            tls_key_file=str(self.tls_key_file) if self.tls_key_file else None,
            tls_check_hostname=self.tls_check_hostname,
        )

    def directory_options(self) -> RedisDirectoryOptions:
        return RedisDirectoryOptions(
            ttl_s=self.entry_ttl_s, lease_ttl_s=self.lease_ttl_s, link=self.link_options()
        )

    def async_options(self) -> AsyncDirectoryOptions:
        return AsyncDirectoryOptions(
            interval_s=self.batch_interval_s,
            lease_ttl_s=self.lease_ttl_s,
            answer_ttl_s=self.fleet_answer_ttl_s,
            dedupe_interval_s=self.dedupe_interval_s,
        )

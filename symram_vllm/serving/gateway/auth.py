"""API keys, tenants and cache namespaces.

Each key maps to a tenant. Every request of a tenant carries vLLM's ``cache_salt``
derived from the tenant's secret salt, so its KV blocks (in vLLM's prefix cache and in
symram's tiers, both keyed by the salted block hash) can only ever be hit by the same
tenant. A client's own ``cache_salt`` is kept as a sub-namespace *inside* its
tenant's (hashed together with the tenant salt), so it cannot name another tenant's
namespace. With no keys configured, auth is off and a client's ``cache_salt`` passes
through unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from starlette.datastructures import Headers

from symram_vllm.serving.gateway.config import GatewayConfig
from symram_vllm.serving.gateway.errors import GatewayError


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the key's id (never the key), its tenant and limits."""

    key_id: str
    tenant: str | None
    salt: bytes | None
    requests_per_minute: float | None
    tokens_per_minute: float | None

    def cache_salt(self, client_salt: str | None) -> str | None:
        """The cache_salt sent to vLLM (<= 128 chars of [0-9a-f-], as vLLM requires)."""
        if self.salt is None:
            return client_salt
        h = hashlib.blake2b(self.salt, digest_size=24, person=b"symram-tenant")
        if client_salt is not None:
            h.update(b"\x00" + client_salt.encode())
        return "t-" + h.hexdigest()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Authenticator:
    def __init__(self, config: GatewayConfig) -> None:
        self.enabled = config.auth_enabled
        self._limits = config.limits
        self._by_digest: dict[bytes, Principal] = {}
        for entry in config.api_keys:
            secret = entry.key.get_secret_value()
            tenant = config.tenants[entry.tenant]
            salt = (tenant.salt.get_secret_value() if tenant.salt is not None
                    else f"tenant:{entry.tenant}")
            digest = _digest(secret)
            self._by_digest[digest] = Principal(
                key_id="key-" + digest.hex()[:10],
                tenant=entry.tenant,
                salt=salt.encode(),
                requests_per_minute=entry.requests_per_minute or config.limits.requests_per_minute,
                tokens_per_minute=entry.tokens_per_minute or config.limits.tokens_per_minute,
            )

    def describe(self) -> str:
        if not self.enabled:
            return ("auth OFF: no api_keys configured, every client is accepted and cache_salt "
                    "passes through unchanged")
        tenants = sorted({p.tenant or "" for p in self._by_digest.values()})
        return f"auth ON: {len(self._by_digest)} API keys, tenants {', '.join(tenants)}"

    def authenticate(self, headers: Headers, client: str | None) -> Principal:
        if not self.enabled:
            return Principal(f"ip-{client or 'unknown'}", None, None,
                             self._limits.requests_per_minute, self._limits.tokens_per_minute)
        header = headers.get("authorization")
        if not header:
            raise GatewayError(
                401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                code="missing_api_key", reason="auth_missing",
                headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise GatewayError(
                401, "Malformed Authorization header: expected 'Bearer KEY'.",
                code="invalid_api_key", reason="auth_invalid",
                headers={"WWW-Authenticate": "Bearer"})
        digest = _digest(token)
        # Compare digests in constant time: the key itself never meets a branch.
        match = next((p for d, p in self._by_digest.items() if hmac.compare_digest(d, digest)),
                     None)
        if match is None:
            shown = f"{token[:3]}...{token[-4:]}" if len(token) > 10 else "***"
            raise GatewayError(
                401, f"Incorrect API key provided: {shown}.",
                code="invalid_api_key", reason="auth_invalid",
                headers={"WWW-Authenticate": "Bearer"})
        return match

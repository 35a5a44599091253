"""API keys, tenants and cache namespaces.

Each key maps to a tenant. Every request of a tenant carries vLLM's ``cache_salt``
derived from the tenant's secret salt, so its KV blocks (in vLLM's prefix cache and in
symram's tiers, both keyed by the salted block hash) can only ever be hit by the same
tenant. A tenant's salt is its configured ``salt``, or else an HMAC-SHA256 of its name
under the gateway's ``tenant_salt_secret``: never computable from public data (the
tenant name), so nobody who reaches an engine directly can name a tenant's namespace.
Without a configured secret each gateway process draws a random one.

A client's own ``cache_salt`` is kept as a sub-namespace *inside* its tenant's (an
HMAC under the tenant salt), so it cannot name another tenant's namespace. With no keys
configured, auth is off and a client's ``cache_salt`` passes through unchanged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
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
    admin: bool = False

    def cache_salt(self, client_salt: str | None) -> str | None:
        """The cache_salt sent to vLLM (<= 128 chars of [0-9a-f-], as vLLM requires)."""
        if self.salt is None:
            return client_salt
        h = hmac.new(self.salt, b"symram-cache-salt", hashlib.sha256)
        if client_salt is not None:
            # The gateway rejected lone surrogates at parse time; utf-8 is total here.
            h.update(b"\x00" + client_salt.encode("utf-8", "surrogatepass"))
        return "t-" + h.hexdigest()[:48]



def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def tenant_salt(secret: bytes, tenant: str) -> bytes:
    """A tenant's default salt: HMAC-SHA256(secret, tenant name), hex."""
    mac = hmac.new(secret, b"symram-tenant-salt\x00" + tenant.encode(), hashlib.sha256)
    return mac.hexdigest().encode()


class Authenticator:
    def __init__(self, config: GatewayConfig) -> None:
        self.enabled = config.auth_enabled
        self._limits = config.limits
        self._by_digest: dict[bytes, Principal] = {}
        self._admins = any(entry.admin for entry in config.api_keys)
        self.random_secret = False
        if config.tenant_salt_secret is not None:
            salt_secret = config.tenant_salt_secret.get_secret_value().encode()
        else:
            salt_secret = secrets.token_bytes(32)
            self.random_secret = any(config.tenants[e.tenant].salt is None
                                     for e in config.api_keys)
        for entry in config.api_keys:
            secret = entry.key.get_secret_value()
            tenant = config.tenants[entry.tenant]
            salt = (tenant.salt.get_secret_value().encode() if tenant.salt is not None
                    else tenant_salt(salt_secret, entry.tenant))
            digest = _digest(secret)
            self._by_digest[digest] = Principal(
                key_id="key-" + digest.hex()[:10],
                tenant=entry.tenant,
                salt=salt,
                requests_per_minute=entry.requests_per_minute or config.limits.requests_per_minute,
                tokens_per_minute=entry.tokens_per_minute or config.limits.tokens_per_minute,
                admin=entry.admin,
            )

    def describe(self) -> str:
        if not self.enabled:
            return ("auth OFF: no api_keys configured, every client is accepted and cache_salt "
                    "passes through unchanged")
        tenants = sorted({p.tenant or "" for p in self._by_digest.values()})
        text = f"auth ON: {len(self._by_digest)} API keys, tenants {', '.join(tenants)}"
        if self.random_secret:
            text += ("; WARNING: no tenant_salt_secret is set, so tenant cache salts are "
                     "random for this process: cached prefixes do not survive a gateway "
                     "restart and differ between gateway replicas")
        return text

    def authenticate_viewer(self, headers: Headers, client: str | None) -> Principal:
        """/metrics and /dashboard: a Bearer key, or HTTP Basic with the key as password
        (what a browser sends after its login prompt); an admin key when any key is
        admin."""
        header = headers.get("authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                _, _, key = base64.b64decode(value.strip(), validate=True).decode(
                    "utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                key = ""
            headers = Headers({"authorization": f"Bearer {key}"})
        try:
            principal = self.authenticate(headers, client)
        except GatewayError as exc:
            exc.headers["WWW-Authenticate"] = 'Basic realm="symram gateway"'
            raise
        if self._admins and not principal.admin:
            raise GatewayError(403, "This API key may not read metrics or the dashboard; use "
                               "an admin key.", code="permission_denied", reason="auth_scope")
        return principal

    def authenticate(self, headers: Headers, client: str | None) -> Principal:
        if not self.enabled:
            return Principal(f"ip-{client or 'unknown'}", None, None,
                             self._limits.requests_per_minute, self._limits.tokens_per_minute)
        header = headers.get("authorization")
        if not header and headers.get("x-api-key"):
            # The Anthropic SDK (and /v1/messages clients generally) send the key here.
            header = f"Bearer {headers['x-api-key']}"
        if not header:
            raise GatewayError(
                401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' "
                "(or 'x-api-key: KEY').",
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

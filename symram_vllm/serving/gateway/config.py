"""GatewayConfig: defaults < YAML file < ``SYMRAM_GATEWAY_*`` env < command line.

Nested fields come from the environment with ``__``:
``SYMRAM_GATEWAY_LIMITS__MAX_BODY_BYTES=1MiB``, ``SYMRAM_GATEWAY_ROUTING__LOAD_PENALTY_TOKENS=256``;
lists and maps as JSON: ``SYMRAM_GATEWAY_API_KEYS='[{"key": "sk-1", "tenant": "a"}]'``.

Secrets (``api_keys``, ``control_token``, ``tenant_salt_secret``) can also be files in a
secrets directory (``SYMRAM_GATEWAY_SECRETS_DIR``, e.g. ``/run/secrets``), one file per
field named like its environment variable in lower case:
``/run/secrets/symram_gateway_control_token``. The environment wins over the files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from symram_vllm.config import parse_bytes

DEFAULT_CONTROL_PORT_OFFSET = 1100  # engine :8000 -> control :9100, as in deploy/
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"  # vLLM's NONE_HASH seed for sha256_cbor
# The engine's control endpoint refuses longer key lists (symram_vllm.control.MAX_KEYS;
# not imported: the gateway stays free of the engine's modules).
MAX_LOOKUP_KEYS = 1024


class ConfigError(ValueError):
    """The gateway config is invalid; the message names the field and the problem."""


def _normalise_url(value: str, what: str) -> str:
    value = value.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} {value!r} is not an http(s)://host[:port] URL")
    if parts.path.endswith("/v1"):
        value = urlunsplit(parts._replace(path=parts.path[:-3]))
    return value


class BackendConfig(BaseModel):
    """One vLLM + symram engine."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="OpenAI base URL of the engine, e.g. http://10.0.0.5:8000")
    control_url: str | None = Field(
        default=None,
        description="symram control endpoint of its rank 0 (rank r: port + r); default: same "
        "host, port + control_port_offset; 'none': the engine has none",
    )
    name: str | None = Field(
        default=None, description="Label in headers and metrics; default host:port"
    )
    max_inflight: int | None = Field(default=None, ge=1, description="Override of the default")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _normalise_url(value, "backend url")

    @field_validator("control_url")
    @classmethod
    def _control(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # "none" (or empty): this engine has no control endpoint, whatever the offset.
        return "" if value.strip().lower() in ("", "none") else _normalise_url(value,
                                                                               "control url")

    @classmethod
    def parse(cls, spec: str) -> BackendConfig:
        """``URL[,control=URL][,name=N][,max_inflight=N]`` (the --backend syntax)."""
        url, *options = [part.strip() for part in spec.split(",")]
        values: dict[str, Any] = {"url": url}
        for option in options:
            name, sep, value = option.partition("=")
            name = {"control": "control_url", "control_url": "control_url"}.get(name, name)
            if not sep or name not in ("control_url", "name", "max_inflight"):
                raise ValueError(
                    f"backend option {option!r} in {spec!r}: expected control=URL, name=N or "
                    "max_inflight=N"
                )
            values[name] = value
        return cls(**values)


class TenantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    salt: SecretStr | None = Field(
        default=None,
        description="Cache namespace of this tenant (default: HMAC of the tenant name under "
        "tenant_salt_secret). Injected into every request as vLLM's cache_salt.",
    )


class ApiKeyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: SecretStr = Field(description="The bearer token clients send")
    tenant: str = Field(default="default", min_length=1)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    admin: bool = Field(
        default=False,
        description="May read /metrics and /dashboard (when any key is admin, only those may)",
    )

    @field_validator("key")
    @classmethod
    def _key(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 8:
            raise ValueError("API keys must be at least 8 characters")
        return value


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lookup_timeout_s: float = Field(default=0.15, gt=0, description="Per-instance lookup budget")
    directory_url: str | None = Field(
        default=None, description="The engines' shared Redis directory (redis://, rediss://, "
        "redis+cluster://): prefix lookups read it in one round trip; the control endpoints "
        "are the fallback. Unset = ask the control endpoints.")
    directory_timeout_s: float = Field(default=0.25, gt=0, description="Directory lookup budget")
    tokenize_timeout_s: float = Field(default=2.0, gt=0)
    load_penalty_tokens: float = Field(
        default=512, ge=0,
        description="How many matched prefix tokens one in-flight request on an instance "
        "is worth: an instance wins on prefix only if matched - penalty x in-flight is higher",
    )
    disk_weight: float = Field(
        default=0.8, ge=0, le=1, description="Worth of a block on disk relative to one in DRAM"
    )
    min_prefix_blocks: int = Field(default=1, ge=1)
    max_lookup_blocks: int = Field(default=MAX_LOOKUP_KEYS, ge=1, le=MAX_LOOKUP_KEYS)
    session_header: str = Field(default="x-session-id")
    none_hash_seed: str = Field(
        default=DEFAULT_NONE_HASH_SEED,
        description="vLLM's NONE_HASH seed: set to the engines' PYTHONHASHSEED if they set one",
    )
    prefetch: bool = True
    prefetch_wait_s: float = Field(default=0.5, ge=0, le=10)
    min_prefetch_blocks: int = Field(default=1, ge=1)
    max_retries: int = Field(default=1, ge=0, description="Other instances tried on failure")


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_body_bytes: int = Field(default=8 << 20, ge=1024)
    max_tokens_cap: int | None = Field(
        default=8192, ge=1, description="Reject max_tokens above this (400); null: no cap"
    )
    max_n: int = Field(default=8, ge=1, description="Reject n (choices) above this (400)")
    max_inflight_per_instance: int = Field(default=64, ge=1)
    retry_after_s: int = Field(default=1, ge=1)
    requests_per_minute: float | None = Field(
        default=None, gt=0, description="Per-key default (per client address when auth is off)"
    )
    tokens_per_minute: float | None = Field(default=None, gt=0)
    default_completion_tokens: int = Field(
        default=256, ge=1, description="Token-bucket charge for a request without max_tokens"
    )

    @field_validator("max_body_bytes", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> int:
        return parse_bytes(value)


class TimeoutsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    connect_s: float = Field(default=5.0, gt=0)
    read_s: float = Field(
        default=600.0, gt=0, description="Longest silence from an engine (between stream chunks)"
    )
    health_interval_s: float = Field(default=2.0, gt=0)
    health_timeout_s: float = Field(default=2.0, gt=0)
    eject_after_failures: int = Field(default=2, ge=1)
    readmit_after_successes: int = Field(default=1, ge=1)
    stats_interval_s: float = Field(default=2.0, gt=0)
    shutdown_grace_s: float = Field(default=10.0, ge=0)


class DiscoveryConfig(BaseModel):
    """Engines behind one DNS name: every address it resolves to is a backend."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="OpenAI base URL with the DNS name, e.g. "
                     "http://symram-engine.ns.svc.cluster.local:8000")
    control_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="Control port on each address (default: engine port + control_port_offset)",
    )
    interval_s: float = Field(default=10.0, gt=0, description="How often the name is resolved")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _normalise_url(value, "discovery url")


_YAML_PATH: list[Path | None] = [None]


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _YAML_PATH[0]
        if path is None:
            return {}
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read gateway config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"gateway config {path} must be a mapping, got {type(data).__name__}")
        return data


class GatewayConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SYMRAM_GATEWAY_", env_nested_delimiter="__", extra="forbid",
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    backends: list[BackendConfig] = Field(default_factory=list)
    control_port_offset: int | None = Field(
        default=DEFAULT_CONTROL_PORT_OFFSET,
        description="Control URL of a backend without one: same host, port + offset "
        "(None: no control endpoint, so no prefix routing or prefetch)",
    )
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    tenant_salt_secret: SecretStr | None = Field(
        default=None,
        description="Key of the HMAC that turns a tenant name into its cache salt; unset: a "
        "random one per gateway process (caches do not survive a restart)",
    )
    control_token: SecretStr | None = Field(
        default=None, description="Shared token sent to the engines' control endpoints"
    )
    discover: list[DiscoveryConfig] = Field(
        default_factory=list,
        description="DNS names (e.g. a Kubernetes headless service) whose addresses are "
        "engines; re-resolved every interval_s",
    )
    protect_metrics: bool = Field(default=True, description="With auth on, /metrics needs a key")
    protect_dashboard: bool = Field(
        default=True, description="With auth on, /dashboard and /dashboard/data need a key"
    )
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    log_level: str = "info"
    dashboard_history: int = Field(default=300, ge=10, description="Timeline points kept")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, file_secret_settings, _YamlSource(settings_cls)

    @field_validator("backends", mode="before")
    @classmethod
    def _backend_specs(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [BackendConfig.parse(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.lower()
        if value not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError("log_level must be one of critical, error, warning, info, debug")
        return value

    @model_validator(mode="after")
    def _check(self) -> GatewayConfig:
        for entry in self.api_keys:
            if entry.tenant not in self.tenants:
                self.tenants[entry.tenant] = TenantConfig()
        seen: dict[str, str] = {}
        for key in self.api_keys:
            secret = key.key.get_secret_value()
            if secret in seen:
                raise ValueError(f"the same API key is listed twice (tenants {seen[secret]!r} "
                                 f"and {key.tenant!r})")
            seen[secret] = key.tenant
        names: set[str] = set()
        for backend in self.backends:
            if backend.control_url is None and self.control_port_offset is not None:
                backend.control_url = _offset_url(backend.url, self.control_port_offset)
            elif backend.control_url == "":
                backend.control_url = None
            backend.name = backend.name or _host_port(backend.url)
            if backend.name in names:
                raise ValueError(f"two backends are named {backend.name!r}; give them name=...")
            names.add(backend.name)
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def _offset_url(url: str, offset: int) -> str:
    parts = urlsplit(url)
    port = (parts.port or (443 if parts.scheme == "https" else 80)) + offset
    if not 0 < port < 65536:
        raise ValueError(f"control port of {url} with offset {offset} is {port}, not a port")
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    return f"http://{host}:{port}"


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = re.sub(r"^Value error, ", "", err.get("msg", "invalid"))
        lines.append(f"  {loc or '(config)'}: {msg}")
    return "\n".join(lines)


def load_gateway_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> GatewayConfig:
    """Build the config from defaults, the YAML file `path`, the environment and
    `overrides` (highest). Raises ConfigError with one line per problem."""
    _YAML_PATH[0] = Path(path) if path else None
    secrets = os.environ.get("SYMRAM_GATEWAY_SECRETS_DIR") or None
    if secrets and not Path(secrets).is_dir():
        raise ConfigError(f"SYMRAM_GATEWAY_SECRETS_DIR={secrets} is not a directory")
    try:
        return GatewayConfig(**(overrides or {}), _secrets_dir=secrets)
    except ValidationError as exc:
        source = f" (file {path})" if path else ""
        raise ConfigError(f"invalid gateway config{source}:\n{_describe(exc)}") from exc
    except ValueError as exc:  # e.g. a JSON env value that does not parse
        raise ConfigError(f"invalid gateway config: {exc}") from exc
    finally:
        _YAML_PATH[0] = None

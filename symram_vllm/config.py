"""Typed configuration: defaults < YAML file < environment (SYMRAM_*) < explicit overrides.

The connector passes vLLM's ``kv_connector_extra_config`` as explicit overrides, so
``--kv-transfer-config '{"kv_connector":"symram","kv_role":"kv_both",
"kv_connector_extra_config":{"dram_bytes":"8GiB"}}'`` works without any file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from symram_vllm.policy import PolicyConfig
from symram_vllm.tiers.disk import DiskTierConfig

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "KI": 1024,
    "KIB": 1024,
    "M": 1000**2,
    "MB": 1000**2,
    "MI": 1024**2,
    "MIB": 1024**2,
    "G": 1000**3,
    "GB": 1000**3,
    "GI": 1024**3,
    "GIB": 1024**3,
    "T": 1000**4,
    "TB": 1000**4,
    "TI": 1024**4,
    "TIB": 1024**4,
}


def parse_bytes(value: Any) -> int:
    """Parse 4096, "512MiB", "8GB", "1.5GiB" into a byte count."""
    if isinstance(value, bool):
        raise ValueError(f"expected a byte size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"byte size must be >= 0, got {value}")
        return value
    if isinstance(value, float):
        return parse_bytes(int(value))
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(
            f"cannot parse byte size {value!r}; use an integer or a string like '512MiB' or '8GB'"
        )
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").upper()])


class SymramConfig(BaseSettings):
    # Nested fields from the environment: SYMRAM_POLICY__WRITE_POLICY=write_through_selective
    model_config = SettingsConfigDict(
        env_prefix="SYMRAM_", extra="forbid", env_nested_delimiter="__"
    )

    dram_bytes: int = Field(
        default=4 * 1024**3, description="Host-DRAM tier budget (bytes or '4GiB')."
    )
    save_decode_blocks: bool = Field(
        default=True,
        description="Also save full blocks of generated tokens (helps multi-turn chat).",
    )
    min_load_blocks: int = Field(
        default=1, ge=1, description="Ignore store hits shorter than this many blocks."
    )
    transfer_threads: int = Field(
        default=1, ge=1, le=16, description="Host threads copying pages on CPU hosts."
    )
    kv_layout: Literal["auto", "LBHNC", "BLHNC"] = Field(
        default="auto",
        description="Physical KV cache layout symram asks vLLM for. auto: BLHNC "
        "(block-outermost: a page is one contiguous span, one copy per block run) on CUDA, "
        "LBHNC on CPU, whose attention backend accepts nothing else. Pages are the same "
        "bytes under either layout.",
    )
    fail_on_load_error: bool = Field(
        default=False,
        description="Keep vLLM's kv_load_failure_policy=fail instead of recomputing.",
    )
    stats_path: Path | None = Field(
        default=None, description="Write a JSON stats snapshot here (for `symram stats`)."
    )
    instance_id: str = Field(default="", description="Name of this engine in shared tiers.")
    codec: Literal["none", "int8", "fp8"] = Field(
        default="none",
        description="How pages are stored: none (exact), int8 or fp8 (half the bytes, "
        "quantized with per-token scales on the way out).",
    )
    disk_path: Path | None = Field(
        default=None,
        description="NVMe tier directory (one subdirectory per model signature and rank); "
        "unset = DRAM only.",
    )
    disk_bytes: int = Field(default=16 * 1024**3, description="NVMe tier budget per rank.")
    disk: DiskTierConfig = Field(default_factory=DiskTierConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    flush_on_exit_s: float = Field(
        default=20.0,
        ge=0,
        description="On shutdown, copy DRAM pages to the disk tier for up to this long "
        "(warm restart).",
    )
    control_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Control endpoint (lookup/prefetch/stats) for the gateway; rank r "
        "listens on control_port + r. 0 = off.",
    )
    control_host: str = Field(default="127.0.0.1", description="Control endpoint bind address.")
    # Control-plane security (issue J); the gateway sends the same token.
    control_token: SecretStr | None = Field(
        default=None,
        description="Shared token the gateway sends to the control endpoint (>= 16 chars); "
        "without it (or control_token_file) the endpoint does not start.",
    )
    control_token_file: Path | None = Field(
        default=None, description="File holding control_token (a mounted secret)."
    )
    control_rate_per_client: float = Field(
        default=100.0, gt=0, description="Control requests per second per client address."
    )
    control_cpu_share: float = Field(
        default=0.05, gt=0, le=1,
        description="Share of wall time the control endpoint's handlers may run in the "
        "worker process (over it, requests wait).",
    )
    directory_url: str | None = Field(
        default=None,
        description="Shared block directory, e.g. redis://host:6379/0; unset = in-process.",
    )
    disk_share: bool = Field(
        default=True,
        description="Engines given the same disk_path share it: each writes its own "
        "slot directory and reads the others' pages (verified, read-only); with a Redis "
        "directory they find each other's disk pages through it.",
    )
    redis_pages_bytes: int = Field(
        default=0,
        description="Fleet-wide budget of the Redis page tier (pages written on save, "
        "read on a local miss); 0 = off. Needs redis_pages_url or directory_url.",
    )
    redis_pages_url: str | None = Field(
        default=None,
        description="Redis for the page tier; unset = directory_url.",
    )
    redis_pages_queue: int = Field(
        default=64, ge=1, description="Pages waiting to be written to Redis (then dropped)."
    )
    # Pages at rest (disk, peer disk, Redis pages): AES-256-GCM, docs/security.md.
    encryption: Literal["off", "optional", "required"] = Field(
        default="optional",
        description="Seal pages at rest with AES-256-GCM: required (refuse to start without "
        "a key; refuse plaintext pages), optional (seal when a key is set; still read "
        "plaintext pages), off.",
    )
    encryption_key_file: Path | None = Field(
        default=None,
        description="File holding the 32-byte master key (hex, base64 or raw); chmod 600.",
    )
    encryption_key: str | None = Field(
        default=None,
        repr=False,  # never in logs, reprs or `symram doctor`
        exclude=True,
        description="The master key itself (hex or base64); normally from "
        "$SYMRAM_ENCRYPTION_KEY. encryption_key_file wins when both are set.",
    )

    @field_validator("dram_bytes", "disk_bytes", "redis_pages_bytes", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> int:
        return parse_bytes(value)


class ConfigError(ValueError):
    """A config file, env var or override is invalid; the message says which and why."""


def load_config(
    overrides: dict[str, Any] | None = None, path: str | Path | None = None
) -> SymramConfig:
    """Build the config. `path` (or $SYMRAM_CONFIG) names an optional YAML file."""
    file_values: dict[str, Any] = {}
    path = path or os.environ.get("SYMRAM_CONFIG")
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read symram config file {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"symram config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"symram config file {path} must hold a mapping, got {type(loaded).__name__}"
            )
        file_values = loaded
    explicit = {k: v for k, v in (overrides or {}).items() if k != "config_file"}
    if overrides and overrides.get("config_file") and not path:
        return load_config(explicit, overrides["config_file"])
    try:
        # Env vars fill what the file and overrides leave unset.
        env_only = SymramConfig()
        merged = {**env_only.model_dump(exclude_unset=True), **file_values, **explicit}
        return SymramConfig(**merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid symram config: {problems}") from exc

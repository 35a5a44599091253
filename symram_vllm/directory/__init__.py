"""Block directories: which chain keys are held, and in which tier."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from symram_vllm.directory.base import DedupeStats, Directory
from symram_vllm.directory.embedded import EmbeddedDirectory
from symram_vllm.redis_keys import namespace_for

if TYPE_CHECKING:
    from symram_vllm.directory.async_directory import AsyncDirectory
    from symram_vllm.directory.redis_directory import RedisDirectoryOptions
    from symram_vllm.directory.redis_settings import RedisSettings

__all__ = [
    "DedupeStats", "Directory", "EmbeddedDirectory", "make_directory", "namespace_for",
    "open_fleet_directory",
]

logger = logging.getLogger(__name__)


def make_directory(
    url: str | None,
    *,
    namespace: bytes | str,
    instance_id: str,
    shared_tiers: Iterable[str] = frozenset({"redis"}),
    options: RedisDirectoryOptions | None = None,
) -> Directory:
    """The embedded directory when `url` is None or empty, else a `RedisDirectory`
    (redis://, rediss://, unix://, redis+cluster://). A URL symram cannot use raises
    ValueError naming it. A Redis that rejects the credentials or the TLS setup gives
    the embedded directory, with the reason logged as an error: the engine serves
    without the shared directory rather than not at all."""
    if not url or not url.strip():
        return EmbeddedDirectory()
    url = url.strip()
    from symram_vllm.redis_link import SUPPORTED_SCHEMES, RedisConfigError, redact

    if not url.startswith(SUPPORTED_SCHEMES):
        raise ValueError(
            f"unsupported directory URL {redact(url)!r}: use redis://host:port/db, "
            "rediss://... (TLS), unix:///path/to/redis.sock or redis+cluster://host:port,... "
            "(or leave it unset for the in-process directory)"
        )
    # Imported here so the embedded default never needs redis-py.
    from symram_vllm.directory.redis_directory import RedisDirectory

    try:
        return RedisDirectory(
            url, namespace=namespace, instance_id=instance_id, shared_tiers=shared_tiers,
            options=options,
        )
    except RedisConfigError as exc:
        logger.error("symram: shared directory off, serving with the in-process one: %s", exc)
        return EmbeddedDirectory()
    except ValueError as exc:
        raise ValueError(f"bad directory URL {redact(url)!r}: {exc}") from exc


def open_fleet_directory(
    url: str | None,
    *,
    namespace: bytes | str,
    instance_id: str,
    shared_tiers: Iterable[str] = frozenset({"redis"}),
    settings: RedisSettings | None = None,
) -> AsyncDirectory:
    """What the scheduler uses: `make_directory` wrapped in an `AsyncDirectory`, with
    every knob from the ``redis:`` config section (defaults when None)."""
    from symram_vllm.directory.async_directory import AsyncDirectory
    from symram_vllm.directory.redis_settings import RedisSettings

    settings = settings or RedisSettings()
    inner = make_directory(
        url, namespace=namespace, instance_id=instance_id, shared_tiers=shared_tiers,
        options=settings.directory_options() if url and url.strip() else None,
    )
    return AsyncDirectory(inner, settings.async_options())

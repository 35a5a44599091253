"""Block directories: which chain keys are held, and in which tier."""

from __future__ import annotations

from collections.abc import Iterable

from symram_vllm.directory.base import DedupeStats, Directory
from symram_vllm.directory.embedded import EmbeddedDirectory
from symram_vllm.directory.redis_keys import namespace_for

__all__ = ["DedupeStats", "Directory", "EmbeddedDirectory", "make_directory", "namespace_for"]


def make_directory(
    url: str | None,
    *,
    namespace: bytes | str,
    instance_id: str,
    shared_tiers: Iterable[str] = frozenset({"redis"}),
) -> Directory:
    """The embedded directory when `url` is None or empty, else a `RedisDirectory`
    (redis://, rediss:// or unix://). Anything else raises ValueError naming it."""
    if not url or not url.strip():
        return EmbeddedDirectory()
    url = url.strip()
    from symram_vllm.redis_link import SUPPORTED_SCHEMES

    if not url.startswith(SUPPORTED_SCHEMES):
        raise ValueError(
            f"unsupported directory URL {url!r}: use redis://host:port/db, rediss://... "
            "or unix:///path/to/redis.sock (or leave it unset for the in-process directory)"
        )
    # Imported here so the embedded default never needs redis-py.
    from symram_vllm.directory.redis_directory import RedisDirectory

    try:
        return RedisDirectory(
            url, namespace=namespace, instance_id=instance_id, shared_tiers=shared_tiers
        )
    except ValueError as exc:
        raise ValueError(f"bad directory URL {url!r}: {exc}") from exc

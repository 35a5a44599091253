"""The disk tier's settings, apart from the tier so that reading a config (the CLI, the
gateway, ``symram doctor``) does not import torch.

One knob, one place: the eviction sample size is ``policy.victim_window`` (the tier stack
hands it to both tiers) and the page codec is the top-level ``codec`` (the engine hands it
to ``DiskTier(codec=...)``). Their old copies here, ``disk.victim_window`` and
``disk.codec`` (which the engine silently overwrote with ``codec``), are refused in a
config, naming the setting to use instead (``config.REMOVED_SETTINGS``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class DiskTierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    write_workers: int = Field(2, ge=1, le=32, description="Threads writing pages.")
    write_queue: int = Field(
        16, ge=0, description="Staged writes allowed to wait beyond the running ones."
    )
    when_queue_full: Literal["block", "drop"] = Field(
        "block", description="set_async on a full queue: wait (back-pressure) or skip."
    )
    block_timeout_s: float | None = Field(
        None, ge=0, description="With 'block', wait at most this long, then drop."
    )
    read_workers: int = Field(2, ge=1, le=32, description="Threads serving get_async.")
    fsync: bool = Field(True, description="fdatasync each page before it becomes visible.")
    direct_io: Literal["auto", "on", "off"] = "auto"
    io_backend: Literal["auto", "posix", "kvikio"] = "auto"
    retry_backoff_s: float = Field(5.0, gt=0, description="First retry after a write error.")
    retry_backoff_max_s: float = Field(300.0, gt=0)
    manifest: bool = Field(True, description="Write a manifest on close, use it on start.")
    quarantine_max_files: int = Field(256, ge=0)
    progress_min_files: int = Field(2000, ge=0, description="Show a progress bar above this.")
    compress: Literal["none", "zstd"] = Field(
        "none",
        description="Lossless stage for pages on disk: zstd compresses each page in the "
        "writer threads (kept only if it saves a 4 KiB block); reads decompress.",
    )
    zstd_level: int = Field(1, ge=-7, le=22, description="zstd level (not 0; negative = fast).")

    @field_validator("zstd_level")
    @classmethod
    def _zstd_level(cls, value: int) -> int:
        if value == 0:
            raise ValueError("zstd level must be in [-7, -1] or [1, 22], not 0")
        return value

"""What the scheduler side remembers about one live request between engine steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.v1.request import Request


@dataclass
class RequestState:
    request: Request
    keys: list[bytes] = field(default_factory=list)
    local_computed_tokens: int = 0
    # Leading blocks already handled for saving (saved, scheduled, or present).
    save_cursor: int = 0
    has_jobs: bool = False
    # Keys leased in the directory for this request's pending load.
    leased: list[bytes] = field(default_factory=list)
    # When this request first waited for a fleet answer (monotonic seconds).
    fleet_wait_since: float | None = None

"""When the worker restarts its control endpoint's process (``control_child``) after it
died, and when it stops trying.

The control endpoint carries the bypass kill switch, the stats the gateway's dashboard
plots, and the gateway's lookups and prefetches: an engine without it serves, but
blind to the fleet and without an emergency brake. So a child that dies (an OOM kill,
a crash) is started again on the same port. Two bounds keep that from becoming a
problem of its own:

* **Exponential backoff.** The n-th consecutive failure waits ``first_delay_s * 2**(n-1)``
  (at most ``max_delay_s``) before the next start, so a child that keeps dying costs
  the worker a few process starts, not a fork loop beside the engine.
* **Giving up.** ``max_fast_failures`` consecutive failures, each a child that died
  within ``stable_after_s`` of coming up or never came up at all, end the restarts:
  something is wrong that another start will not fix (a bad install, the port taken
  by another process, memory too tight to start Python). The reason is logged; the
  engine serves on without a control endpoint.

A child that served for ``stable_after_s`` or longer resets the count: its death is a
new incident, not the same one again.

Pure bookkeeping, no threads or processes: ``ControlServer`` applies it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    # A child that served this long before it died counts as healthy: the count resets.
    stable_after_s: float = 60.0
    # The consecutive fast failure (died young, or never came up) that ends the restarts;
    # with the defaults 5 restarts, 0.5 + 1 + 2 + 4 + 8 = 15.5 s of backoff in all (plus
    # the starts themselves), before giving up on the 6th death.
    max_fast_failures: int = 6

    def __post_init__(self) -> None:
        if not 0 < self.first_delay_s <= self.max_delay_s:
            raise ValueError("RestartPolicy needs 0 < first_delay_s <= max_delay_s")
        if self.max_fast_failures < 1:  # 1: the first death ends it (no restarts)
            raise ValueError("RestartPolicy.max_fast_failures must be >= 1")


class RestartBackoff:
    """Counts consecutive fast failures under a ``RestartPolicy``."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.failures = 0  # consecutive fast failures

    def after_failure(self, served_s: float | None) -> float | None:
        """Seconds to wait before the next start, or None: give up. `served_s` is how long
        the child served before it died; None when it never came up."""
        if served_s is not None and served_s >= self.policy.stable_after_s:
            self.failures = 0
        self.failures += 1
        if self.failures >= self.policy.max_fast_failures:
            return None
        return min(self.policy.first_delay_s * 2 ** (self.failures - 1),
                   self.policy.max_delay_s)


def describe_exit(returncode: int | None) -> str:
    """'killed by SIGKILL', 'exit code 3', 'still running' (for the log)."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"

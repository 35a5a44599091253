"""The kill switch: stop symram's loads and saves in a running engine, no restart.

``symram bypass on`` asks a rank's control endpoint to set it; every process of that
engine (the scheduler's and each worker's) sees it within ``REFRESH_S``; ``symram
bypass off`` clears it. While it is on, the connector answers "no external hit" to the
scheduler and saves nothing, so vLLM runs as if symram were absent; the tiers keep
their pages for when it is turned off.

Where to check it (connectors/): ``bypass_active()`` before promising a hit
(scheduler side, ``get_num_new_matched_tokens``) and before queueing a save (scheduler
side, and the worker's ``save_kv_layer`` / ``wait_for_save`` as a second guard). It is a
``stat`` at most every ``REFRESH_S`` and a cached bool otherwise: cheap enough for the
scheduling path.

The state crosses processes as a flag file named after the engine's control port (the
one value every process of an engine shares and no two engines on a host can), under
``$SYMRAM_RUNTIME_DIR`` (default ``<tmp>/symram-<uid>``). It therefore survives an
engine restart on the same host, as a kill switch should; the connector logs it at
start (``describe()``). Each change is logged at WARNING with who asked and why
(the audit trail), and ``symram:bypass_active`` shows it in the metrics.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("symram.bypass")

REFRESH_S = 0.25
RUNTIME_DIR_ENV = "SYMRAM_RUNTIME_DIR"


def runtime_dir() -> Path:
    given = os.environ.get(RUNTIME_DIR_ENV)
    return Path(given) if given else Path(tempfile.gettempdir()) / f"symram-{os.getuid()}"


class BypassSwitch:
    """One engine's switch. ``key`` names the engine (its control port); None keeps the
    state in this process only (no control endpoint, tests)."""

    def __init__(self, key: str | None, *, clock: Any = time.monotonic) -> None:
        self.key = key
        self.path = runtime_dir() / f"bypass-{key}.json" if key else None
        self._clock = clock
        self._lock = threading.Lock()
        self._local: dict[str, Any] | None = None
        self._cached: dict[str, Any] | None = None
        self._checked_at = float("-inf")

    def _read(self) -> dict[str, Any] | None:
        if self.path is None:
            return self._local
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # A flag file we cannot read still means someone turned the switch on.
            return {"active": True, "by": "unknown", "reason": "unreadable flag file"}
        return data if isinstance(data, dict) and data.get("active") else None

    def state(self) -> dict[str, Any] | None:
        """The record of who turned bypass on (``active``, ``by``, ``reason``, ``since``),
        or None when it is off. Re-read at most every REFRESH_S."""
        now = self._clock()
        if now - self._checked_at >= REFRESH_S:
            with self._lock:
                self._cached = self._read()
                self._checked_at = now
        return self._cached

    def active(self) -> bool:
        return self.state() is not None

    def set(self, active: bool, *, by: str = "unknown", reason: str = "") -> dict[str, Any]:
        """Turn the switch on or off; logged at WARNING (the audit trail). Returns the
        new state as the control endpoint reports it."""
        record = {"active": True, "by": by, "reason": reason, "since": time.time()}
        with self._lock:
            previous = self._read()
            if self.path is None:
                self._local = record if active else None
            elif active:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(record))
                os.replace(tmp, self.path)  # readers see the old or the new file, whole
            else:
                self.path.unlink(missing_ok=True)
            self._cached = record if active else None
            self._checked_at = self._clock()
        changed = (previous is not None) != active
        logger.warning(
            "symram bypass %s%s by %s%s: symram loads and saves are %s",
            "ON" if active else "OFF", "" if changed else " (unchanged)", by,
            f" ({reason})" if reason else "", "stopped" if active else "running",
        )
        return {"active": active, "changed": changed, "by": by, "reason": reason}

    def describe(self) -> str:
        state = self.state()
        if state is None:
            return "symram bypass is off"
        return (f"symram bypass is ON (set by {state.get('by')}: {state.get('reason') or '-'}; "
                f"flag {self.path}); `symram bypass off` resumes loads and saves")


_SWITCH = BypassSwitch(None)


def configure(control_port: int) -> BypassSwitch:
    """Bind this process to its engine's switch (call once per process, with the
    config's ``control_port``; 0 = no control endpoint, switch local to the process)."""
    global _SWITCH
    _SWITCH = BypassSwitch(str(control_port) if control_port else None)
    if _SWITCH.active():
        logger.warning(_SWITCH.describe())
    return _SWITCH


def switch() -> BypassSwitch:
    return _SWITCH


def bypass_active() -> bool:
    """True while symram must neither load nor save (the kill switch is on)."""
    return _SWITCH.active()

"""Run one A/B point: Locust headless as a subprocess against one arm.

A subprocess rather than Locust in-process: Locust monkey-patches the interpreter for
gevent on import, which the runner (it manages engine processes, signals and a rich
display) must not inherit; each point also starts from fresh Locust state, and the
command is exactly what a person would type (it is logged with the point). The
per-request records (JSON lines written by loadtest/locustfile.py) are the source of
every figure; Locust's own CSVs are kept next to them.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.workloads import WorkloadSpec, scenario_of, spec_to_dict, turns_for
from symram_vllm.serving.engine_process import die_with_parent

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
REPO = LOCUSTFILE.parent.parent
# The user class per scenario in locustfile.py (not imported here: importing Locust
# monkey-patches this process for gevent).
USER_CLASS_NAMES = {"chat": "ChatUser", "docqa": "DocQAUser", "noreuse": "NoReuseUser"}


@dataclass
class PointRun:
    records: list[dict[str, Any]]
    expected: int
    completed: bool
    returncode: int | None
    wall_s: float
    command: str


def expected_requests(spec: WorkloadSpec, users: int) -> int:
    return sum(len(turns_for(spec, u)) for u in range(users))


def locust_command(url: str, spec: WorkloadSpec, users: int, *, records: Path,
                   csv_prefix: Path, run_time_s: int, think_time_s: float,
                   spawn_rate: float | None = None) -> list[str]:
    user_class = USER_CLASS_NAMES[scenario_of(spec)]
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", url, "--headless",
        "-u", str(users), "-r", str(spawn_rate or users), "--run-time", f"{run_time_s}s",
        # Final totals go to CSV_PREFIX_locust.json at shutdown; the periodic CSVs
        # (kept for the history) can miss the last second.
        "--stop-timeout", "5", "--csv", str(csv_prefix), "--json-file",
        f"{csv_prefix}_locust", "--only-summary",
        "--loglevel", "WARNING", "--exit-code-on-error", "0",
        "--records", str(records), "--think-time", str(think_time_s), "--no-warm-docs",
        "--workload", json.dumps(spec_to_dict(spec), separators=(",", ":")),
        user_class,
    ]


class LocustProcess:
    """The running Locust child, so Ctrl-C in the runner can stop it."""

    current: subprocess.Popen[bytes] | None = None

    @classmethod
    def kill(cls) -> None:
        process = cls.current
        if process is not None and process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def run_point(
    url: str, spec: WorkloadSpec, users: int, out_prefix: Path, *, timeout_s: int,
    think_time_s: float, spawn_rate: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PointRun:
    """Run the workload with `users` users until every user is done or `timeout_s`."""
    records = out_prefix.with_suffix(".jsonl")
    records.unlink(missing_ok=True)
    log = out_prefix.with_suffix(".locust.log")
    expected = expected_requests(spec, users)
    cmd = locust_command(url, spec, users, records=records, csv_prefix=out_prefix,
                         run_time_s=timeout_s, think_time_s=think_time_s,
                         spawn_rate=spawn_rate)
    start = time.monotonic()
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            start_new_session=True, preexec_fn=die_with_parent,
        )
        LocustProcess.current = process
        try:
            # Locust enforces --run-time itself; the margin covers start and shutdown.
            while process.poll() is None:
                if time.monotonic() - start > timeout_s + 60:
                    LocustProcess.kill()
                    break
                if on_progress is not None:
                    on_progress(_count_lines(records), expected)
                time.sleep(0.5)
        finally:
            LocustProcess.kill()
            LocustProcess.current = None
    done = read_records(records)
    if on_progress is not None:
        on_progress(len(done), expected)
    return PointRun(done, expected, len(done) >= expected, process.returncode,
                    time.monotonic() - start, shlex.join(cmd))


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0

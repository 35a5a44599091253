"""A real redis-server for tests: free 127.0.0.1 port, nothing persisted, killed at
teardown. The `redis_server` fixture in conftest.py wraps `RedisServer`; tests that
need an outage call `kill()` and `restart()` (same port, empty data)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from symram_vllm.serving.engine_process import free_port

START_TIMEOUT_S = 10.0


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.settimeout(0.5)
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, workdir: Path, binary: str) -> None:
        self.workdir = workdir
        self.binary = binary
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> RedisServer:
        """Start on `port` (a fresh free one by default); retried once on a port race."""
        for attempt in range(3):
            self.port = port or free_port()
            cmd = [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                "--protected-mode", "yes", "--loglevel", "warning",
            ]
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and self.process.poll() is None:
                if _answers_ping(self.port):
                    return self
                time.sleep(0.02)
            self.kill()
            if port is not None and attempt == 0:
                time.sleep(0.5)  # the old socket may still be closing
        raise RuntimeError(f"redis-server did not start; log: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: the abrupt outage (no shutdown, no reply to in-flight commands)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> RedisServer:
        """Kill (if running) and start again on the same port, with no data."""
        self.kill()
        return self.start(self.port)

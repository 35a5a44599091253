"""The gateway as its own process in front of real engines, for the engine tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from symram_vllm.serving.engine_process import EngineServer, free_port

# The control endpoint shares 2 busy cores with the engine here; the 150 ms production
# lookup budget would turn slow lookups into misroutes. So would a slow /tokenize (an
# engine's first chat template render), past its 2 s budget.
TEST_GATEWAY_ENV = {"SYMRAM_GATEWAY_TIMEOUTS__HEALTH_INTERVAL_S": "0.5",
                    "SYMRAM_GATEWAY_ROUTING__LOOKUP_TIMEOUT_S": "3",
                    "SYMRAM_GATEWAY_ROUTING__TOKENIZE_TIMEOUT_S": "10"}


def code(tag: str, lines: int) -> str:
    """Python-looking prompt text, distinct per tag."""
    return " ".join(f"def {tag}_{i}(x): return x * {i} + {len(tag)}" for i in range(lines))


def route(response: httpx.Response) -> dict[str, str]:
    """The gateway's routing decision for a response (``x-symram-route``)."""
    return dict(p.split("=", 1) for p in response.headers["x-symram-route"].split(";"))


class GatewayProcess:
    """`symram gateway` over `engines` (name, engine, control port or None); waits until
    it is healthy and, with `wait_engines`, until it sees every engine healthy."""

    def __init__(self, engines: list[tuple[str, EngineServer, int | None]], log: Path, *,
                 control_token: str, env: dict[str, str] | None = None,
                 wait_engines: bool = False) -> None:
        self.engines = engines
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "symram_vllm.cli", "gateway", "--port", str(self.port)]
        for name, engine, control in engines:
            cmd += ["--backend", f"{engine.base_url},name={name}",
                    "--control", f"http://127.0.0.1:{control}" if control else "none"]
        full_env = {**os.environ, **TEST_GATEWAY_ENV,
                    "SYMRAM_GATEWAY_CONTROL_TOKEN": control_token, **(env or {})}
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=full_env)
        deadline = time.monotonic() + 60
        while not self._healthy(len(engines) if wait_engines else None):
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited; see {log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not healthy; see {log}")
            time.sleep(0.2)

    def _healthy(self, engines: int | None) -> bool:
        try:
            health = httpx.get(f"{self.url}/health", timeout=2)
        except httpx.HTTPError:
            return False
        return health.status_code == 200 and (
            engines is None or health.json().get("healthy") == engines)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the gateway's /metrics (0 when absent)."""
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            series = line.split(" ", 1)[0]
            if series.split("{", 1)[0] == name and all(
                    f'{k}="{v}"' in series for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()

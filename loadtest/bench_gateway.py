"""Gateway benchmark (not a timed test): what the gateway costs in front of an engine.

A fast OpenAI-shaped stub engine (raw asyncio HTTP/1.1, its own process) answers
``/v1/chat/completions`` at once, as JSON or as an SSE stream. Two gateways run in
their own processes, exactly as deployed (``python -m symram_vllm.serving.gateway``,
uvicorn):

* **proxy**: ``--no-control``: auth, validation, routing and byte-faithful forwarding;
  the gateway's own overhead;
* **routed**: the stub also answers ``/tokenize`` and the symram control endpoint
  (``/symram/info``, ``/symram/lookup``), so every request also pays the engine
  tokenize call and the prefix lookup a real deployment makes.

Phase 1, latency: the same request is sent directly to the stub and through each
gateway, in rotation (direct, proxy, routed; the order rotates every round), one at a
time over keep-alive connections, non-streaming and streaming (to the last byte). Per
repeat: p50/p95 of each arm; added = gateway percentile - direct percentile; reported
as the median over repeats. The headline ``added_p50_ms`` / ``added_p95_ms`` is the
proxy gateway, the worse of its streaming and non-streaming figures.

Phase 2, concurrency: ``--streams`` (1,000) streaming requests through the proxy
gateway, all open at once: the stub sends one SSE event per ``--interval-s`` for
``--hold-s`` seconds, so every stream stays open while the others open. Each stream
must end with status 200, every event, and ``data: [DONE]``; the stub reports the peak
number of streams it was serving at once, which must reach ``--streams``.

Writes loadtest/results/gateway.json (``--out``) with the machine it ran on.

    python -m loadtest.bench_gateway [--pairs 300] [--repeats 5] [--streams 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
MODEL = "stub"
SIGNATURE = "5a" * 32
ARMS = ("direct", "proxy", "routed")
KINDS = ("json", "stream")
REPLY_TOKENS = 8


# -- the stub engine ---------------------------------------------------------------------
class StubEngine:
    """Just enough of vLLM's OpenAI server (and of symram's control endpoint) for the
    gateway, answering at once. A stream sends ``max_tokens`` events, one every
    ``stub_interval_s`` seconds (a field of the request body; 0 by default)."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.streams = 0
        self.completed = 0
        self.aborted = 0
        self.requests = 0

    def stats(self) -> dict[str, int]:
        return {"active": self.active, "peak": self.peak, "streams": self.streams,
                "completed": self.completed, "aborted": self.aborted,
                "requests": self.requests}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                await self.route(method, path, body, writer)
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _json(writer: asyncio.StreamWriter, obj: Any, status: int = 200) -> None:
        data = json.dumps(obj).encode()
        writer.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (
                         status, b"OK" if status == 200 else b"Error", len(data), data))

    async def route(self, method: str, path: str, body: bytes,
                    writer: asyncio.StreamWriter) -> None:
        self.requests += 1
        if path == "/health":
            self._json(writer, {})
        elif path == "/v1/models":
            self._json(writer, {"object": "list", "data": [
                {"id": MODEL, "object": "model", "created": 1, "owned_by": "bench"}]})
        elif path == "/stub/stats":
            self._json(writer, self.stats())
        elif path == "/stub/reset" and method == "POST":
            self.peak = self.active
            self.streams = self.completed = self.aborted = 0
            self._json(writer, self.stats())
        elif path == "/tokenize":
            req = json.loads(body)
            text = json.dumps(req.get("messages") or req.get("prompt"))
            tokens = list(text.encode())
            self._json(writer, {"count": len(tokens), "max_model_len": 4096, "tokens": tokens})
        elif path == "/symram/info":
            self._json(writer, {"instance_id": "stub", "signature_digest": SIGNATURE,
                                "block_size": 16, "tp_size": 1, "codec": "none",
                                "model": MODEL, "rank": 0})
        elif path == "/symram/lookup":
            self._json(writer, {"dram": 0, "disk": 0, "any": 0})
        elif path == "/symram/stats":
            self._json(writer, {"dram_puts": 0.0, "stack_misses": 0.0})
        elif path in ("/v1/chat/completions", "/v1/completions") and method == "POST":
            await self.complete(json.loads(body), writer)
        else:
            self._json(writer, {"error": {"message": f"no {path}"}}, 404)
        await writer.drain()

    async def complete(self, req: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        n = int(req.get("max_tokens") or REPLY_TOKENS)
        words = [f" w{i}" for i in range(n)]
        if not req.get("stream"):
            self._json(writer, {
                "id": "cmpl-stub", "object": "chat.completion", "created": 1, "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": "".join(words)},
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}})
            return
        interval = float(req.get("stub_interval_s") or 0.0)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
        self.streams += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            for i, word in enumerate(words):
                if interval and i:
                    await asyncio.sleep(interval)
                event = {"id": "chatcmpl-stub", "object": "chat.completion.chunk",
                         "created": 1, "model": MODEL,
                         "choices": [{"index": 0, "delta": {"content": word},
                                      "finish_reason": None}]}
                writer.write(_chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
                await writer.drain()
            writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
            self.completed += 1
        except (ConnectionError, asyncio.CancelledError):
            self.aborted += 1
            raise
        finally:
            self.active -= 1


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def run_stub(port: int) -> None:
    raise_fd_limit()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    stub = StubEngine()

    async def main() -> None:
        server = await asyncio.start_server(stub.serve, "127.0.0.1", port, backlog=4096,
                                            limit=1 << 20)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# -- processes ------------------------------------------------------------------------------
def raise_fd_limit(want: int = 65536) -> int:
    """Raise the soft open-files limit towards `want` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(port: int, path: str, timeout: float = 5.0) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {data[:200]!r}")
        return json.loads(data)
    finally:
        conn.close()


def _post_json(port: int, path: str, body: Any = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=json.dumps(body or {}),
                     headers={"content-type": "application/json"})
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


@dataclass
class Process:
    name: str
    port: int
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def _wait_ready(proc: Process, path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; log "
                               f"{proc.log}:\n{proc.log.read_text()[-3000:]}")
        try:
            _get_json(proc.port, path, timeout=2)
            return
        except (OSError, RuntimeError, ValueError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} not ready after {timeout}s; log {proc.log}"
                                   ) from None
            time.sleep(0.1)


def start_stub(logdir: Path) -> Process:
    port = free_port()
    log = logdir / "stub.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "loadtest.bench_gateway", "--serve-stub", str(port)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    proc = Process("stub", port, popen, log)
    _wait_ready(proc, "/health")
    return proc


def gateway_command(port: int, stub_port: int, routed: bool) -> list[str]:
    backend = f"http://127.0.0.1:{stub_port},name=stub"
    cmd = [sys.executable, "-m", "symram_vllm.serving.gateway", "--port", str(port),
           "--log-level", "warning"]
    if routed:
        return [*cmd, "--backend", backend, "--control", f"http://127.0.0.1:{stub_port}"]
    return [*cmd, "--no-control", "--backend", backend]


GATEWAY_ENV = {
    # The concurrency phase holds --streams requests on one instance.
    "SYMRAM_GATEWAY_LIMITS__MAX_INFLIGHT_PER_INSTANCE": "100000",
    "SYMRAM_GATEWAY_TIMEOUTS__READ_S": "120",
}


def start_gateway(name: str, stub_port: int, routed: bool, logdir: Path) -> Process:
    port = free_port()
    log = logdir / f"gateway_{name}.log"
    env = {**os.environ, **GATEWAY_ENV}
    with log.open("wb") as out:
        popen = subprocess.Popen(gateway_command(port, stub_port, routed), cwd=ROOT, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
    proc = Process(f"gateway ({name})", port, popen, log)
    _wait_ready(proc, "/health")
    if routed:  # wait until the gateway has the stub's control info (prefix lookups on)
        deadline = time.monotonic() + 30
        while not all(b["control_ok"]
                      for b in _get_json(port, "/dashboard/data")["instances"]):
            if time.monotonic() > deadline:
                raise RuntimeError("routed gateway never reached the stub's control endpoint")
            time.sleep(0.1)
    return proc


@contextlib.contextmanager
def running_stack(logdir: Path) -> Iterator[dict[str, Process]]:
    procs: dict[str, Process] = {}
    try:
        procs["direct"] = start_stub(logdir)
        procs["proxy"] = start_gateway("proxy", procs["direct"].port, False, logdir)
        procs["routed"] = start_gateway("routed", procs["direct"].port, True, logdir)
        yield procs
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()


# -- phase 1: latency -------------------------------------------------------------------------
def request_body(stream: bool, tokens: int = REPLY_TOKENS, interval_s: float = 0.0
                 ) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL, "max_tokens": tokens, "stream": stream,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Say eight words about KV caches."}]}
    if interval_s:
        body["stub_interval_s"] = interval_s
    return json.dumps(body).encode()


class Caller:
    """One keep-alive connection; times a request to its last byte."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(self, body: bytes, stream: bool) -> float:
        t0 = time.perf_counter()
        self.conn.request("POST", "/v1/chat/completions", body=body,
                          headers={"content-type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - t0
        if response.status != 200:
            raise RuntimeError(f"port {self.port}: HTTP {response.status}: {data[:300]!r}")
        if stream and not data.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"port {self.port}: stream did not end with [DONE]")
        return elapsed

    def close(self) -> None:
        self.conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds a process used so far (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_latency(ports: dict[str, int], pairs: int, repeats: int, warmup: int,
                    progress: bool = True, pids: dict[str, int] | None = None
                    ) -> dict[str, Any]:
    from tqdm import tqdm

    pids = pids or {}
    cpu = {kind: dict.fromkeys(ports, 0.0) for kind in KINDS}

    callers = {arm: Caller(port) for arm, port in ports.items()}
    bodies = {kind: request_body(kind == "stream") for kind in KINDS}
    arms = list(ports)
    try:
        for kind in KINDS:
            for _ in range(warmup):
                for arm in arms:
                    callers[arm].call(bodies[kind], kind == "stream")
        runs: list[dict[str, Any]] = []
        total = repeats * len(KINDS) * pairs
        with tqdm(total=total, desc="latency rounds", unit="round", disable=not progress,
                  mininterval=0.5) as bar:
            for repeat in range(repeats):
                run: dict[str, Any] = {"repeat": repeat}
                for kind in KINDS:
                    samples: dict[str, list[float]] = {arm: [] for arm in arms}
                    before = {arm: process_cpu_s(pids.get(arm)) for arm in arms}
                    for i in range(pairs):
                        shift = i % len(arms)  # rotate who goes first
                        for arm in arms[shift:] + arms[:shift]:
                            samples[arm].append(callers[arm].call(bodies[kind],
                                                                  kind == "stream"))
                        bar.update()
                    for arm in arms:
                        cpu[kind][arm] += process_cpu_s(pids.get(arm)) - before[arm]
                    stats = {arm: {"p50_ms": ms(percentile(v, 0.5)),
                                   "p95_ms": ms(percentile(v, 0.95))}
                             for arm, v in samples.items()}
                    for arm in arms[1:]:
                        stats[arm]["added_p50_ms"] = round(
                            stats[arm]["p50_ms"] - stats["direct"]["p50_ms"], 4)
                        stats[arm]["added_p95_ms"] = round(
                            stats[arm]["p95_ms"] - stats["direct"]["p95_ms"], 4)
                        diffs = [g - d for g, d in zip(samples[arm], samples["direct"],
                                                        strict=True)]
                        stats[arm]["paired_diff_p50_ms"] = ms(percentile(diffs, 0.5))
                    run[kind] = stats
                runs.append(run)
    finally:
        for caller in callers.values():
            caller.close()

    summary: dict[str, Any] = {}
    for kind in KINDS:
        summary[kind] = {}
        for arm in arms:
            keys = ["p50_ms", "p95_ms"] + (
                ["added_p50_ms", "added_p95_ms", "paired_diff_p50_ms"] if arm != "direct"
                else [])
            summary[kind][arm] = {k: round(statistics.median(r[kind][arm][k] for r in runs), 4)
                                  for k in keys}
    # CPU per request of each server process, over all repeats: what scheduling noise on
    # a shared host cannot inflate (it includes the background health and stats polls).
    cpu_ms = {kind: {arm: round(1e3 * cpu[kind][arm] / (pairs * repeats), 4)
                     for arm in arms[1:] if arm in pids} for kind in KINDS}
    return {"pairs_per_repeat": pairs, "repeats": repeats, "warmup": warmup,
            "median_over_repeats": summary, "cpu_ms_per_request": cpu_ms, "runs": runs}


# -- phase 2: concurrent streams -------------------------------------------------------------
@dataclass
class StreamResults:
    requested: int
    opened: int = 0
    completed: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    client_peak_open: int = 0
    open_seconds: float = 0.0
    wall_seconds: float = 0.0
    gateway_peak_inflight: int = 0
    stub: dict[str, int] = field(default_factory=dict)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(out)
        out += (await reader.readexactly(size + 2))[:-2]


async def _first_chunk(reader: asyncio.StreamReader) -> bytes:
    size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
    if size == 0:
        await reader.readuntil(b"\r\n")
        return b""
    return (await reader.readexactly(size + 2))[:-2]


async def hold_streams(port: int, stub_port: int, streams: int, events: int,
                       interval_s: float, opening: int = 64, progress: bool = True
                       ) -> StreamResults:
    """`streams` streaming requests through the gateway on `port`, all open at once."""
    from tqdm import tqdm

    results = StreamResults(requested=streams)
    body = request_body(True, events, interval_s)
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
               b"content-type: application/json\r\naccept: text/event-stream\r\n"
               b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
    gate = asyncio.Semaphore(opening)
    open_now = 0
    counts: Counter[str] = Counter()
    opened_all = asyncio.Event()
    bar = tqdm(total=streams, desc="streams open", unit="stream", disable=not progress,
               mininterval=0.5)

    def fail(kind: str, detail: str) -> None:
        counts[kind] += 1
        if len(results.error_samples) < 10:
            results.error_samples.append(f"{kind}: {detail[:300]}")

    async def one() -> None:
        nonlocal open_now
        writer = None
        counted = False
        try:
            async with gate:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, limit=1 << 20), 60)
                writer.write(request)
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
                status = int(head.split(b" ", 2)[1])
                if status != 200:
                    fail(f"http_{status}", head.decode("latin-1"))
                    return
                if b"transfer-encoding: chunked" not in head.lower():
                    fail("not_chunked", head.decode("latin-1"))
                    return
                first = await asyncio.wait_for(_first_chunk(reader), 60)
            open_now += 1
            counted = True
            results.opened += 1
            results.client_peak_open = max(results.client_peak_open, open_now)
            bar.update()
            if results.opened == streams:
                opened_all.set()
            rest = await asyncio.wait_for(_read_chunked(reader), events * interval_s + 120)
            text = first + rest
            got = text.count(b'"content"')
            if not text.rstrip().endswith(b"data: [DONE]") or got != events:
                fail("incomplete_stream", f"{got}/{events} events, tail {text[-120:]!r}")
                return
            results.completed += 1
        except Exception as exc:  # every failure is counted and reported
            fail(type(exc).__name__, repr(exc))
        finally:
            if counted:
                open_now -= 1
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def watch_gateway() -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(Exception):
                health = await loop.run_in_executor(None, _get_json, port, "/dashboard/data",
                                                    5.0)
                inflight = sum(b["inflight"] for b in health["instances"])
                results.gateway_peak_inflight = max(results.gateway_peak_inflight, inflight)
            await asyncio.sleep(0.5)

    _post_json(stub_port, "/stub/reset")
    started = time.monotonic()
    watcher = asyncio.ensure_future(watch_gateway())
    tasks = [asyncio.ensure_future(one()) for _ in range(streams)]
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(opened_all.wait(), events * interval_s + 120)
    results.open_seconds = round(time.monotonic() - started, 3)
    bar.close()
    with tqdm(total=streams, desc="streams done", unit="stream", disable=not progress,
              mininterval=0.5) as done_bar:
        for task in asyncio.as_completed(tasks):
            await task
            done_bar.update()
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    results.wall_seconds = round(time.monotonic() - started, 3)
    results.errors = sum(counts.values())
    results.error_kinds = dict(counts)
    results.stub = _get_json(stub_port, "/stub/stats")
    return results


# -- the whole run ----------------------------------------------------------------------------
def run_bench(pairs: int = 300, repeats: int = 5, warmup: int = 50, streams: int = 1000,
              hold_s: float = 30.0, interval_s: float = 1.0, opening: int = 64,
              logdir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    fd_limit = raise_fd_limit()
    need = 3 * streams + 256
    if fd_limit < need:
        raise SystemExit(f"open-files limit {fd_limit} is below the {need} this run needs; "
                         "raise the hard limit (ulimit -Hn) or lower --streams")
    logdir = logdir or RESULTS / "logs" / "bench_gateway"
    logdir.mkdir(parents=True, exist_ok=True)
    events = max(2, round(hold_s / interval_s))
    load_before = [round(x, 2) for x in os.getloadavg()]
    with running_stack(logdir) as procs:
        ports = {arm: procs[arm].port for arm in ARMS}
        pids = {arm: procs[arm].popen.pid for arm in ARMS}
        latency = measure_latency(ports, pairs, repeats, warmup, progress, pids)
        held = asyncio.run(hold_streams(procs["proxy"].port, procs["direct"].port, streams,
                                        events, interval_s, opening, progress))
    proxy = latency["median_over_repeats"]
    headline = {
        "added_p50_ms": max(proxy[k]["proxy"]["added_p50_ms"] for k in KINDS),
        "added_p95_ms": max(proxy[k]["proxy"]["added_p95_ms"] for k in KINDS),
    }
    ok = (held.errors == 0 and held.completed == streams and held.stub.get("peak", 0) >= streams)
    return {
        "benchmark": "gateway",
        **headline,
        "target_added_p50_ms": 2.0,
        "added_p50_ok": headline["added_p50_ms"] <= 2.0,
        "routed_added_p50_ms": max(proxy[k]["routed"]["added_p50_ms"] for k in KINDS),
        "routed_added_p95_ms": max(proxy[k]["routed"]["added_p95_ms"] for k in KINDS),
        "gateway_cpu_ms_per_request": latency["cpu_ms_per_request"],
        "concurrent_streams_ok": ok,
        "concurrent_streams": streams,
        "concurrent": asdict(held),
        "stream_events": events,
        "stream_interval_s": interval_s,
        "latency": latency,
        "setup": {
            "stub": "raw asyncio HTTP/1.1 OpenAI-shaped stub (uvloop when installed), own "
                    "process; replies at once",
            "gateways": {"proxy": " ".join(gateway_command(0, 0, False)[1:]),
                         "routed": " ".join(gateway_command(0, 0, True)[1:])},
            "gateway_env": GATEWAY_ENV,
            "client": "http.client keep-alive, one request at a time, timed to the last byte; "
                      "concurrency phase: raw asyncio connections",
            "open_files_limit": fd_limit,
            # Other jobs on a shared host: what the p95 figures mostly measure.
            "load_average_1_5_15": {"before": load_before,
                                    "after": [round(x, 2) for x in os.getloadavg()]},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=300, help="rounds per repeat and kind")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--hold-s", type=float, default=30.0,
                        help="how long each stream of the concurrency phase lasts")
    parser.add_argument("--interval-s", type=float, default=1.0, help="between SSE events")
    parser.add_argument("--opening", type=int, default=64,
                        help="streams being opened at once (the rest are held open)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gateway.json")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--serve-stub", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_stub:
        run_stub(args.serve_stub)
        return 0

    from loadtest.machine import describe_machine

    started = time.monotonic()
    result = run_bench(args.pairs, args.repeats, args.warmup, args.streams, args.hold_s,
                       args.interval_s, args.opening, progress=not args.no_progress)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["command"] = " ".join(["python -m loadtest.bench_gateway", shlex.join(
        sys.argv[1:] if argv is None else argv)]).strip()
    result["machine"] = describe_machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    med = result["latency"]["median_over_repeats"]
    print(f"\nlatency added by the gateway (median of {args.repeats} repeats of "
          f"{args.pairs} rounds):")
    for kind in KINDS:
        d = med[kind]["direct"]
        for arm in ("proxy", "routed"):
            g = med[kind][arm]
            print(f"  {kind:6s} {arm:6s}: p50 +{g['added_p50_ms']:.3f} ms, p95 "
                  f"+{g['added_p95_ms']:.3f} ms (direct p50 {d['p50_ms']:.3f} ms, "
                  f"gateway p50 {g['p50_ms']:.3f} ms)")
    c = result["concurrent"]
    print(f"concurrent streams: {c['completed']}/{c['requested']} complete, {c['errors']} "
          f"errors, stub peak {c['stub'].get('peak')}, gateway peak in flight "
          f"{c['gateway_peak_inflight']}, all open after {c['open_seconds']} s "
          f"-> concurrent_streams_ok={result['concurrent_streams_ok']}")
    cpu = result["gateway_cpu_ms_per_request"]
    print("CPU per request: " + ", ".join(
        f"{kind} {arm} {cpu[kind][arm]:.3f} ms" for kind in KINDS for arm in ARMS
        if arm in cpu[kind]))
    print(f"added_p50_ms={result['added_p50_ms']} (target <= 2) added_p95_ms="
          f"{result['added_p95_ms']}; wrote {args.out}")
    return 0 if result["concurrent_streams_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

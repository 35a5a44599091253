"""The engine-side control endpoint the gateway talks to.

Each TP rank's worker runs one (on ``control_port + rank``). It answers, for a list of
chain keys (the gateway computes them exactly as the connector does), how long a
prefix this rank holds in DRAM, on disk, and in any tier; it promotes pages from disk
to DRAM on request ahead of the prompt that needs them; and it reports the tier stats
the gateway's dashboard plots.

It knows the ``TierStack`` and nothing of vLLM. Endpoints (JSON):

* ``GET  /symram/info``      the engine's identity (instance, key namespace, layout) + rank
* ``POST /symram/lookup``    ``{"keys": [hex, ...]}`` -> ``{"dram": n, "disk": n, "any": n}``
* ``POST /symram/prefetch``  ``{"keys": [...], "wait_s": 0.5}`` ->
  ``{"requested", "dram_resident", "promoted", "done"}``
* ``GET  /symram/stats``     ``TierStack.stats()``
* ``POST /symram/pin``       ``{"keys": [...], "ttl_s": 600}`` -> ``{"requested", "pinned"}``
* ``POST /symram/unpin``     ``{"keys": [...]}`` -> ``{"requested"}``
* ``GET|POST /symram/bypass`` the kill switch (``symram_vllm.bypass``):
  ``{"active": true, "reason": "..."}`` -> ``{"active", "changed", "by", "reason"}``
* ``GET  /health``           ``{"ok": true}`` (the only path open without the token)

Every other path needs the shared control token, and all of them sit behind
``control_guard.ControlGuard`` (body size, per-client rate, CPU budget).

**Where it runs.** Not in the worker. ``ControlServer.start`` binds the port in the
worker, then hands the socket to a child process (``control_child``) started at low
CPU priority (``nice``): uvicorn, the guard, JSON parsing and validation all run
there, so a flood of requests holds no GIL of the worker's and, while the engine is
busy, gets little of its CPU. The child asks the worker only what the worker alone
knows, over a local socket with raw 32-byte keys (``control_link``): a small budgeted
thread in the worker answers with dict lookups, prefetch queueing, pin/unpin, and the
bypass switch (never queued behind key work). A child that dies takes the endpoint
down, not the engine, and the worker starts another on the same port, with backoff,
until it gives up on a child that keeps dying (``control_restart``); an engine that
stops or dies takes its child with it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from symram_vllm import control_link as wire
from symram_vllm.control_guard import ControlLimits, check_token
from symram_vllm.control_restart import RestartBackoff, RestartPolicy, describe_exit
from symram_vllm.keys import KEY_BYTES, BlockKey

logger = logging.getLogger(__name__)

# 16k tokens at block size 16, 128k at vLLM's CPU block size of 128: enough to pick the
# engine holding a prompt's head. The gateway sends at most this many (max_lookup_blocks).
MAX_KEYS = 1024
MAX_WAIT_S = 10.0
INFO_FIELDS = ("instance_id", "signature_digest", "block_size", "tp_size", "codec", "model")
# The control child's CPU priority: the engine's threads come first when both want a
# core (10: a weight of about a tenth of a nice-0 thread's). Its CPU use is bounded by
# the guard's budget anyway; this orders who runs first. +19 (1.5 %) starved it on a
# busy host: the gateway's lookups (150 ms budget) timed out and routing fell back to
# least-loaded.
CHILD_NICE = 10
START_TIMEOUT_S = 30.0  # a cold Python importing FastAPI on a loaded 2-core host
DEFAULT_RESTART = RestartPolicy()


class StackLike(Protocol):
    """What the control endpoint needs of ``symram_vllm.tiers.stack.TierStack``."""

    def where(self, key: BlockKey) -> str | None: ...

    def prefetch(self, keys: Any) -> Any: ...

    def stats(self) -> dict[str, float]: ...


class EngineLike(Protocol):
    """What the app asks of the engine (``RemoteEngine``: over the control link)."""

    async def lookup(self, chains: list[bytes]) -> dict[str, int]: ...

    async def prefetch(self, chains: list[bytes], wait_s: float) -> dict[str, Any]: ...

    async def stats(self) -> dict[str, float]: ...

    async def pin(self, chains: list[bytes], ttl_s: float) -> dict[str, Any]: ...

    async def unpin(self, chains: list[bytes]) -> dict[str, Any]: ...

    async def bypass_state(self) -> dict[str, Any]: ...

    async def set_bypass(self, active: bool, by: str, reason: str) -> dict[str, Any]: ...


def _check_keys(keys: list[str]) -> list[str]:
    if len(keys) > MAX_KEYS:
        raise ValueError(f"at most {MAX_KEYS} keys per call, got {len(keys)}")
    for i, key in enumerate(keys):
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            raw = b""
        if len(raw) != KEY_BYTES:
            raise ValueError(
                f"keys[{i}] = {key[:80]!r} is not a chain key ({2 * KEY_BYTES} hex digits)"
            )
    return keys


class LookupBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[str] = Field(description="Chain keys of a prompt's full blocks, in order.")

    _keys = field_validator("keys")(_check_keys)


class PrefetchBody(LookupBody):
    wait_s: float = Field(default=0.5, ge=0, le=MAX_WAIT_S)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}},
        status_code=status,
    )


class EngineError(RuntimeError):
    """The worker could not answer (its handler raised, or the link is gone)."""


async def _ask(request: Request, call: Any) -> Any:
    """Await the engine; the time spent waiting holds no CPU or GIL of this process,
    so it is not charged to the guard's time budget (the worker budgets its own)."""
    t0 = time.perf_counter()
    try:
        return await call
    finally:
        state = request.state
        state.symram_waited_s = getattr(state, "symram_waited_s", 0.0) + (
            time.perf_counter() - t0)


def build_control_app(engine: EngineLike, rank: int, info: dict[str, Any]) -> FastAPI:
    app = FastAPI(title="symram control", docs_url=None, redoc_url=None, openapi_url=None)
    identity = {**info, "rank": rank}

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
        return _error(422, "; ".join(problems), param="keys")

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        return _error(503, f"The engine did not answer: {exc}")

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/symram/info")
    async def get_info() -> dict[str, Any]:
        return identity

    @app.post("/symram/lookup")
    async def lookup(body: LookupBody, request: Request) -> dict[str, int]:
        return await _ask(request, engine.lookup([bytes.fromhex(k) for k in body.keys]))

    @app.post("/symram/prefetch")
    async def prefetch(body: PrefetchBody, request: Request) -> dict[str, Any]:
        return await _ask(request, engine.prefetch([bytes.fromhex(k) for k in body.keys],
                                                   body.wait_s))

    @app.get("/symram/stats")
    async def stats(request: Request) -> dict[str, float]:
        return await _ask(request, engine.stats())

    add_operator_routes(app, engine)
    return app


# -- operator routes (`symram pin` / `symram bypass`) ------------------------------------
MAX_PIN_TTL_S = 30 * 24 * 3600.0


class PinBody(LookupBody):
    ttl_s: float = Field(default=3600.0, gt=0, le=MAX_PIN_TTL_S,
                         description="Seconds the prefix stays resident.")


class BypassBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    active: bool
    reason: str = Field(default="", max_length=500)
    by: str = Field(default="", max_length=200, description="Who asked (for the audit log).")


def add_operator_routes(app: FastAPI, engine: EngineLike) -> None:
    """Pin/unpin a prefix for a TTL, and the bypass kill switch."""

    @app.post("/symram/pin")
    async def pin(body: PinBody, request: Request) -> dict[str, Any]:
        got = await _ask(request, engine.pin([bytes.fromhex(k) for k in body.keys],
                                             body.ttl_s))
        return {**got, "ttl_s": body.ttl_s}

    @app.post("/symram/unpin")
    async def unpin(body: LookupBody, request: Request) -> dict[str, Any]:
        return await _ask(request, engine.unpin([bytes.fromhex(k) for k in body.keys]))

    @app.get("/symram/bypass")
    async def bypass_state(request: Request) -> dict[str, Any]:
        return await _ask(request, engine.bypass_state())

    @app.post("/symram/bypass")
    async def set_bypass(body: BypassBody, request: Request) -> dict[str, Any]:
        client = request.client.host if request.client else "unknown"
        who = f"{body.by} from {client}" if body.by else client
        return await _ask(request, engine.set_bypass(body.active, who, body.reason))


class RemoteEngine:
    """``EngineLike`` over the control link (the child's end, on its event loop)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._next_id = 1

    async def call(self, op: int, payload: bytes = b"") -> bytes:
        rid = self._next_id
        self._next_id += 1
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            self.writer.write(wire.frame(op, rid, payload))
            op_back, body = await future
        finally:
            self._pending.pop(rid, None)
        if op_back & wire.ERROR:
            raise EngineError(json.loads(body) if body else "failed")
        return body

    async def serve(self, on_request: Any) -> None:
        """Read frames until the worker's end closes: replies complete ``call``s, the
        worker's own requests go to ``on_request(op, rid, payload)``."""
        buffer = bytearray()
        try:
            while True:
                chunk = await self.reader.read(1 << 20)
                if not chunk:
                    return
                buffer += chunk
                for op, rid, payload in wire.split_frames(buffer):
                    if op & (wire.REPLY | wire.ERROR):
                        future = self._pending.get(rid)
                        if future is not None and not future.done():
                            future.set_result((op, payload))
                    else:
                        await on_request(op, rid, payload)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_result((wire.ERROR, b'"the engine\'s control link closed"'))

    def reply(self, op: int, rid: int, body: Any) -> None:
        self.writer.write(wire.frame(op | wire.REPLY, rid, json.dumps(body).encode()))

    async def lookup(self, chains: list[bytes]) -> dict[str, int]:
        dram, disk, held = wire.LOOKUP_REPLY.unpack(
            await self.call(wire.LOOKUP, wire.pack_keys(chains)))
        return {"dram": dram, "disk": disk, "any": held}

    async def prefetch(self, chains: list[bytes], wait_s: float) -> dict[str, Any]:
        body = await self.call(wire.PREFETCH, wire.WAIT.pack(wait_s) + wire.pack_keys(chains))
        return json.loads(body)

    async def stats(self) -> dict[str, float]:
        return json.loads(await self.call(wire.STATS))

    async def pin(self, chains: list[bytes], ttl_s: float) -> dict[str, Any]:
        return json.loads(await self.call(wire.PIN, wire.WAIT.pack(ttl_s)
                                          + wire.pack_keys(chains)))

    async def unpin(self, chains: list[bytes]) -> dict[str, Any]:
        return json.loads(await self.call(wire.UNPIN, wire.pack_keys(chains)))

    async def bypass_state(self) -> dict[str, Any]:
        return json.loads(await self.call(wire.BYPASS_GET))

    async def set_bypass(self, active: bool, by: str, reason: str) -> dict[str, Any]:
        ask = {"active": active, "by": by, "reason": reason}
        return json.loads(await self.call(wire.BYPASS_SET, json.dumps(ask).encode()))


class ControlServer:
    """The control endpoint of one rank: the port bound here, the HTTP side in a child
    process, the answers from a ``control_link.LinkServer`` thread here.

    A child that dies is started again on the same port under `restart`
    (``control_restart``; None: never) by a supervisor thread that sleeps until the
    link reports the loss; ``restarts`` counts the children started again (a metric),
    ``gave_up`` says why restarts stopped, once they have.

    `token` is required (ValueError naming the setting otherwise)."""

    def __init__(self, stack: StackLike, *, token: str | None, rank: int = 0,
                 info: dict[str, Any] | None = None, limits: ControlLimits | None = None,
                 nice: int = CHILD_NICE, restart: RestartPolicy | None = DEFAULT_RESTART):
        info = dict(info or {})
        missing = [name for name in INFO_FIELDS if name not in info]
        if missing:
            logger.warning("symram control: info lacks %s", ", ".join(missing))
        self.stack = stack
        self.rank = rank
        self.info = info
        self.token = check_token(token)
        self.limits = limits or ControlLimits()
        self.nice = nice
        self.restart = restart
        # The child's program; its fds and identity are appended as options.
        self.child_command = [sys.executable, "-m", "symram_vllm.control_child"]
        self.process: subprocess.Popen[bytes] | None = None
        self.link: wire.LinkServer | None = None
        self.url: str | None = None
        self.restarts = 0
        self.gave_up: str | None = None
        self._address: tuple[str, int] = ("127.0.0.1", 0)  # as bound: what a restart reuses
        self._ready_at = 0.0
        self._lock = threading.Lock()  # the supervisor's swaps vs. stop()
        self._wake = threading.Event()  # the link lost, or stop() asked
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def child_pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None else None

    @property
    def alive(self) -> bool:
        """The child serves and the link to it is up."""
        process, link = self.process, self.link
        return (process is not None and process.poll() is None
                and link is not None and not link.lost.is_set())

    def start(self, host: str = "127.0.0.1", port: int = 0,
              timeout_s: float = START_TIMEOUT_S) -> str:
        """Listen on host:port (0 = any free port); returns the base URL once accepting.

        Raises ``OSError`` naming the address when the port is taken, RuntimeError when
        the child does not come up."""
        if self.process is not None:
            raise RuntimeError("control server already started")
        self._stopping.clear()
        _LIVE.add(self)
        try:
            bound_port = self._launch(host, port, timeout_s)
        except BaseException:
            _LIVE.discard(self)
            raise
        self._address = (host, bound_port)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound_port}"
        if self.restart is not None:
            self._supervisor = threading.Thread(
                target=self._supervise, args=(self.restart,), daemon=True,
                name=f"symram-control-watch-r{self.rank}")
            self._supervisor.start()
        return self.url

    def _launch(self, host: str, port: int, timeout_s: float) -> int:
        """Bind host:port, start a child on it and wait until it accepts; the bound port.
        On failure nothing is left running (OSError: the port; RuntimeError: the child)."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"symram control endpoint cannot listen on {host}:{port}: "
                f"{exc.strerror or exc} (is another engine or rank using this port?)"
            ) from exc
        sock.listen(64)
        bound_port = sock.getsockname()[1]
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        try:
            process = subprocess.Popen(
                [*self.child_command,
                 "--listen-fd", str(sock.fileno()), "--link-fd", str(theirs.fileno()),
                 "--parent-pid", str(os.getpid()), "--nice", str(self.nice),
                 "--rank", str(self.rank)],
                pass_fds=(sock.fileno(), theirs.fileno()), stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError:
            ours.close()
            raise
        finally:
            sock.close()  # the child holds the listening socket now
            theirs.close()
        link = wire.LinkServer(ours, self.stack, self.rank,
                               cpu_share=self.limits.cpu_share,
                               cpu_burst_s=self.limits.cpu_burst_s,
                               name=f"symram-control-r{self.rank}", on_lost=self._wake.set)
        with self._lock:
            self.process, self.link = process, link
        link.start()
        config = {"token": self.token, "limits": asdict(self.limits), "rank": self.rank,
                  "info": self.info}
        link.send(wire.CONFIG, 0, json.dumps(config).encode())
        deadline = time.monotonic() + timeout_s
        while not link.ready.wait(0.05):
            if (process.poll() is not None or link.lost.is_set() or self._stopping.is_set()
                    or time.monotonic() > deadline):
                code = process.poll()
                self._teardown()
                why = ("stopping" if self._stopping.is_set() else
                       "timed out" if code is None else describe_exit(code))
                raise RuntimeError(f"symram control endpoint on {host}:{port} did not "
                                   f"start (control process {why})")
        self._ready_at = time.monotonic()
        return bound_port

    def _supervise(self, policy: RestartPolicy) -> None:
        """Sleeps until the link is lost; then restarts the child under `policy`."""
        backoff = RestartBackoff(policy)
        host, port = self._address
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set():
                return
            process, link = self.process, self.link
            if process is None or link is None or not link.lost.is_set():
                continue  # a late wake from a link already replaced
            served_s = time.monotonic() - self._ready_at
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(2.0)  # its link closes as it exits: collect the status
            why = f"process {process.pid} {describe_exit(process.poll())} after " \
                  f"{served_s:.1f} s"
            self._teardown()
            delay = backoff.after_failure(served_s)
            while delay is not None:
                logger.warning(
                    "symram rank %d: control endpoint %s; restarting it on %s:%d in %.1f s "
                    "(failure %d in a row; gives up at %d)", self.rank, why, host, port,
                    delay, backoff.failures, policy.max_fast_failures)
                if self._stopping.wait(delay):
                    return
                try:
                    self._launch(host, port, START_TIMEOUT_S)
                except Exception as exc:  # a failed start, whatever broke, is bounded too
                    if self._stopping.is_set():
                        return
                    why = f"restart failed ({exc})"
                    delay = backoff.after_failure(None)
                    continue
                self.restarts += 1
                logger.warning("symram rank %d: control endpoint restarted on %s:%d "
                               "(process %s; restart %d)", self.rank, host, port,
                               self.child_pid, self.restarts)
                break
            else:  # no break: the backoff ran out of failures
                self.gave_up = (f"{why}; {backoff.failures} failures in a row, each within "
                                f"{policy.stable_after_s:.0f} s of starting")
                logger.error(
                    "symram rank %d: control endpoint on %s:%d given up: %s. The engine "
                    "serves on without it (no bypass switch, stats, or gateway lookups and "
                    "prefetches) until it restarts", self.rank, host, port, self.gave_up)
                return

    def guard_stats(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The child's guard counters: ``refused`` by reason, the time ``budget``
        (``charged_s``, ``throttled_s``, ``waiting``), the serving thread's ``tid`` and
        the child's ``pid``."""
        link = self.link
        if link is None:
            raise RuntimeError("control server not started")
        return link.request(wire.GUARD_STATS, timeout_s=timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop restarting, then stop the child (asked, then terminated, then killed) and
        the link thread."""
        self._stopping.set()
        self._wake.set()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not threading.current_thread():
            # At most one start in progress, which sees _stopping within 50 ms.
            supervisor.join(timeout_s + 10.0)
        self._teardown(timeout_s)
        _LIVE.discard(self)

    def _teardown(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            process, link = self.process, self.link
            self.process = self.link = None
        if process is None:
            return
        if link is not None:
            link.stopping = True
        if link is not None and process.poll() is None and not link.lost.is_set():
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                link.request(wire.STOP, timeout_s=min(timeout_s, 2.0))
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(2.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if link is not None:
            link.close()


_LIVE: weakref.WeakSet[ControlServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:  # no control process outlives its engine
    for server in list(_LIVE):
        with contextlib.suppress(Exception):  # exiting anyway
            server.stop(timeout_s=2.0)

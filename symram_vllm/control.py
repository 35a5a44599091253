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
``control_guard.ControlGuard`` (body size, per-client rate, CPU budget). Handlers are
``async``: they run on the server's one event-loop thread, whose CPU time the guard
budgets, instead of on a pool of threads competing with the worker for the GIL.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from symram_vllm.control_guard import ControlGuard, ControlLimits
from symram_vllm.keys import KEY_BYTES, BlockKey

logger = logging.getLogger(__name__)

# 16k tokens at block size 16, 128k at vLLM's CPU block size of 128: enough to pick the
# engine holding a prompt's head. The gateway sends at most this many (max_lookup_blocks).
MAX_KEYS = 1024
MAX_WAIT_S = 10.0
INFO_FIELDS = ("instance_id", "signature_digest", "block_size", "tp_size", "codec", "model")


class StackLike(Protocol):
    """What the control endpoint needs of ``symram_vllm.tiers.stack.TierStack``."""

    def where(self, key: BlockKey) -> str | None: ...

    def prefetch(self, keys: Any) -> Any: ...

    def stats(self) -> dict[str, float]: ...


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


def build_control_app(stack: StackLike, rank: int, info: dict[str, Any]) -> FastAPI:
    app = FastAPI(title="symram control", docs_url=None, redoc_url=None, openapi_url=None)
    identity = {**info, "rank": rank}

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
        return _error(422, "; ".join(problems), param="keys")

    def keys_of(body: LookupBody) -> list[BlockKey]:
        return [BlockKey(bytes.fromhex(k), rank) for k in body.keys]

    def dram_run(keys: list[BlockKey]) -> int:
        n = 0
        for key in keys:
            if stack.where(key) != "dram":
                break
            n += 1
        return n

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/symram/info")
    async def get_info() -> dict[str, Any]:
        return identity

    @app.post("/symram/lookup")
    async def lookup(body: LookupBody) -> dict[str, int]:
        keys = keys_of(body)
        disk_tier = getattr(stack, "disk", None)
        dram = disk = held = 0
        dram_open = disk_open = True
        for key in keys:
            tier = stack.where(key)
            if tier is None:
                break
            held += 1
            if dram_open and tier == "dram":
                dram += 1
            else:
                dram_open = False
            # The stack is inclusive: a DRAM page may have its disk copy too.
            on_disk = tier == "disk" or (disk_tier is not None and disk_tier.exists(key))
            if disk_open and on_disk:
                disk += 1
            else:
                disk_open = False
        return {"dram": dram, "disk": disk, "any": held}

    @app.post("/symram/prefetch")
    async def prefetch(body: PrefetchBody, request: Request) -> dict[str, Any]:
        keys = keys_of(body)
        tiers = [stack.where(k) for k in keys]
        before = tiers.count("dram")
        # Only pages on disk go to the prefetch pool: keys held nowhere cost nothing
        # there (its threads are outside the guard's CPU budget).
        on_disk = [k for k, tier in zip(keys, tiers, strict=True) if tier == "disk"]
        started = time.monotonic()
        done = True
        resident = before
        if on_disk:
            waiting = asyncio.wrap_future(stack.prefetch(on_disk))
            # asyncio.wait, not wait_for: a timeout must not cancel the promotion.
            t0 = time.perf_counter()
            finished, _ = await asyncio.wait({waiting}, timeout=body.wait_s)
            # Waiting holds no GIL: not charged to the guard's time budget.
            waited = getattr(request.state, "symram_waited_s", 0.0)
            request.state.symram_waited_s = waited + time.perf_counter() - t0
            done = bool(finished)
            # Unfinished, it keeps running; the load that follows finds what it finished.
            resident = (before + int(waiting.result()) if done
                        else sum(stack.where(k) == "dram" for k in keys))
        return {
            "requested": len(keys),
            "dram_resident": resident,
            "promoted": max(resident - before, 0),
            "done": done,
            "seconds": round(time.monotonic() - started, 6),
        }

    @app.get("/symram/stats")
    async def stats() -> dict[str, float]:
        return stack.stats()

    add_operator_routes(app, stack, keys_of)
    return app


class ControlServer:
    """Runs the control app, behind its guard, under uvicorn in a daemon thread.

    `token` is required (ValueError naming the setting otherwise)."""

    def __init__(self, stack: StackLike, *, token: str | None, rank: int = 0,
                 info: dict[str, Any] | None = None, limits: ControlLimits | None = None):
        info = dict(info or {})
        missing = [name for name in INFO_FIELDS if name not in info]
        if missing:
            logger.warning("symram control: info lacks %s", ", ".join(missing))
        self.rank = rank
        self.app = build_control_app(stack, rank, info)
        self.guard = ControlGuard(self.app, token or "", limits)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 10.0) -> str:
        """Listen on host:port (0 = any free port); returns the base URL once accepting.

        Raises ``OSError`` naming the address when the port is taken."""
        import uvicorn

        if self._thread is not None:
            raise RuntimeError("control server already started")
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
        sock.setblocking(False)
        bound_port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.guard, loop="asyncio", http="h11", lifespan="off", log_level="warning",
            access_log=False, limit_concurrency=128, timeout_keep_alive=5,
        )
        server = uvicorn.Server(config)
        # uvicorn installs signal handlers only on the main thread: the engine's stay.
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"symram-control-r{self.rank}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"symram control endpoint on {host}:{port} did not start")
            time.sleep(0.01)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound_port}"
        return self.url

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._server = None
        self._thread = None


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


def add_operator_routes(app: FastAPI, stack: Any, keys_of: Any) -> None:
    """Pin/unpin a prefix for a TTL, and the bypass kill switch."""
    from symram_vllm import bypass

    @app.post("/symram/pin")
    async def pin(body: PinBody) -> dict[str, Any]:
        keys = keys_of(body)
        pinned = sum(bool(stack.pin(key, body.ttl_s)) for key in keys)
        logger.info("symram control: pinned %d of %d blocks for %.0f s", pinned, len(keys),
                    body.ttl_s)
        return {"requested": len(keys), "pinned": pinned, "ttl_s": body.ttl_s}

    @app.post("/symram/unpin")
    async def unpin(body: LookupBody) -> dict[str, Any]:
        keys = keys_of(body)
        for key in keys:
            stack.unpin(key)
        return {"requested": len(keys)}

    @app.get("/symram/bypass")
    async def bypass_state() -> dict[str, Any]:
        state = bypass.switch().state()
        return {"active": state is not None, **(state or {})}

    @app.post("/symram/bypass")
    async def set_bypass(body: BypassBody, request: Request) -> dict[str, Any]:
        client = request.client.host if request.client else "unknown"
        who = f"{body.by} from {client}" if body.by else client
        return bypass.switch().set(body.active, by=who, reason=body.reason)

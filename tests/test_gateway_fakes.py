"""Fake vLLM engines for the gateway's unit tests (no test functions here).

A ``FakeEngine`` speaks the parts of vLLM's OpenAI server the gateway uses (health,
models, tokenize, completions and chat, streaming or not) over real HTTP, and runs a
real symram ``ControlServer`` over a real ``TierStack``. After serving a prompt it
stores a page for each of the prompt's full blocks under the keys the connector would
use, so prefix lookups answer from real tier state. Its tokenizer is one token per
character; its replies are deterministic, so bytes through the gateway can be compared
with bytes straight from the engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from symram_vllm.control import ControlServer
from symram_vllm.keys import BlockKey
from symram_vllm.serving.gateway import GatewayConfig, create_app
from symram_vllm.serving.gateway.keys import tier_keys
from symram_vllm.tiers.disk import DiskTier, DiskTierConfig
from symram_vllm.tiers.page_format import HEADER_BYTES
from symram_vllm.tiers.policy import PolicyConfig
from symram_vllm.tiers.stack import TierStack

PAGE = 4096
BLOCK = 4
SIGNATURE = "5a" * 32
CONTROL_TOKEN = "fake-control-token-0123456789"  # shared by fake engines and gateways


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """An ASGI app under uvicorn on a free port, in a daemon thread."""

    def __init__(self, app: Any, lifespan: str = "off", port: int | None = None) -> None:
        self.port = port or free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan=lifespan,
                                log_level="warning", loop="asyncio", http="h11")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def render_chat(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    text = "".join(f"<{m.get('role')}>{m.get('content')}" for m in messages)
    return text + ("<assistant>" if add_generation_prompt else "")


def tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]


class FakeEngine:
    def __init__(
        self,
        name: str,
        *,
        models: tuple[str, ...] = ("demo",),
        dram_pages: int = 256,
        disk_path: Path | None = None,
        signature: str = SIGNATURE,
        control: bool = True,
    ) -> None:
        self.name = name
        self.models = models
        self.signature = signature
        disk = None
        if disk_path is not None:
            disk = DiskTier(disk_path, 512 * (HEADER_BYTES + PAGE), config=DiskTierConfig())
        policy = PolicyConfig(recompute={"block_tokens": BLOCK, "seconds_per_token": 1e-3})
        self.stack = TierStack(PAGE, dram_pages * PAGE, disk, config=policy, pin_memory=False)
        self.control = ControlServer(self.stack, token=CONTROL_TOKEN, rank=0, info={
            "instance_id": name, "signature_digest": signature, "block_size": BLOCK,
            "tp_size": 1, "codec": "none", "model": "demo"}) if control else None
        self.healthy = True
        self.fail_status: int | None = None  # answer completions with this status
        self.break_after_chunks: int | None = None  # drop the connection mid-stream
        self.chunk_delay = 0.0
        self.after_done_delay = 0.0  # keep the body open after `[DONE]`
        self.max_reply_tokens: int | None = None  # stop early, as on an EOS token
        self.prefill_delay = 0.0
        self.tokenize_delay = 0.0
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.active = 0
        self.aborted = 0
        self.completed = 0
        self.tokenize_calls = 0
        self.app = self._build()
        self.server = ServerThread(self.app)
        self.url = self.server.url
        self.control_url: str | None = None

    # -- tier simulation -----------------------------------------------------------------
    def prompt_ids(self, path: str, body: dict[str, Any]) -> list[int]:
        if path.endswith("chat/completions"):
            return tokenize(render_chat(body["messages"], body.get("add_generation_prompt", True)))
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        return prompt if isinstance(prompt, list) else tokenize(prompt)

    def keys(self, tokens: list[int], cache_salt: str | None) -> list[bytes]:
        return tier_keys(tokens, self.signature, BLOCK, cache_salt)

    def store_prompt(self, tokens: list[int], cache_salt: str | None) -> list[bytes]:
        """What the connector does after a prefill: one page per full block."""
        keys = self.keys(tokens, cache_salt)
        for i, key in enumerate(keys):
            self.stack.put(BlockKey(key, 0), torch.full((PAGE,), i % 251, dtype=torch.uint8),
                           position=i)
        return keys

    # -- the fake OpenAI server ----------------------------------------------------------
    def reply_text(self, body: dict[str, Any]) -> list[str]:
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 8)
        if self.max_reply_tokens is not None:
            n = min(n, self.max_reply_tokens)
        seed = hashlib.sha256(json.dumps(body.get("messages") or body.get("prompt")).encode())
        return [f" t{seed.hexdigest()[i % 60:i % 60 + 2]}" for i in range(n)]

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200 if self.healthy else 503)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1, "owned_by": "vllm", "root": m}
                for m in self.models]}

        def invalid(exc: Exception) -> JSONResponse:
            # What vLLM answers for a body its input processing rejects.
            return JSONResponse({"error": {"message": f"invalid request: {exc!r}",
                                           "type": "BadRequestError", "param": None,
                                           "code": 400}}, status_code=400)

        @app.post("/tokenize")
        async def tokenize_endpoint(request: Request) -> Any:
            self.tokenize_calls += 1
            await asyncio.sleep(self.tokenize_delay)
            body = await request.json()
            try:
                if "messages" in body:
                    ids = tokenize(render_chat(body["messages"],
                                               body.get("add_generation_prompt", True)))
                else:
                    ids = tokenize(body["prompt"])
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                return invalid(exc)
            return {"count": len(ids), "max_model_len": 4096, "tokens": ids, "token_strs": None}

        async def generate(request: Request, kind: str) -> Response:
            body = await request.json()
            self.received.append(body)
            self.headers.append(dict(request.headers))
            if self.fail_status is not None:
                return JSONResponse({"error": {"message": "fake failure", "type": "x",
                                               "param": None, "code": self.fail_status}},
                                    status_code=self.fail_status)
            salt = body.get("cache_salt")
            try:
                tokens = self.prompt_ids(request.url.path, body)
                self.keys(tokens, salt)
                pieces = self.reply_text(body)
            except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
                return invalid(exc)
            rid = "cmpl-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()
                                           ).hexdigest()[:12]
            usage = {"prompt_tokens": len(tokens), "completion_tokens": len(pieces),
                     "total_tokens": len(tokens) + len(pieces)}
            self.active += 1
            if not body.get("stream"):
                try:
                    waited = 0.0
                    while waited < self.prefill_delay:
                        if await request.is_disconnected():
                            self.aborted += 1
                            return Response(status_code=499)
                        await asyncio.sleep(0.02)
                        waited += 0.02
                finally:
                    self.active -= 1
                self.store_prompt(tokens, salt)
                self.completed += 1
                if kind == "chat":
                    choice = {"index": 0, "message": {"role": "assistant",
                                                      "content": "".join(pieces)},
                              "finish_reason": "length", "custom_vllm_field": [1, 2]}
                else:
                    choice = {"index": 0, "text": "".join(pieces), "finish_reason": "length"}
                return JSONResponse({"id": rid, "object": kind, "created": 7, "model":
                                     body["model"], "choices": [choice], "usage": usage,
                                     "kv_transfer_params": None})

            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def events() -> Any:
                try:
                    if kind == "chat":
                        first = {"id": rid, "object": "chat.completion.chunk", "created": 7,
                                 "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                    "content": ""}}]}
                        yield f"data: {json.dumps(first)}\n\n"
                    for i, piece in enumerate(pieces):
                        if self.break_after_chunks is not None and i >= self.break_after_chunks:
                            # Let the chunks already yielded leave first: uvicorn drops
                            # what is still buffered when a stream raises, and on a busy
                            # host that was all of it (the client then saw no chunk).
                            await asyncio.sleep(0.2)
                            raise RuntimeError("fake engine crashed mid-stream")
                        await asyncio.sleep(self.chunk_delay)
                        if kind == "chat":
                            choice = {"index": 0, "delta": {"content": piece},
                                      "logprobs": None, "finish_reason": None}
                        else:
                            choice = {"index": 0, "text": piece, "logprobs": None,
                                      "finish_reason": None}
                        chunk = {"id": rid, "created": 7, "choices": [choice]}
                        if include_usage:
                            chunk["usage"] = None
                        # Irregular spacing on purpose: the gateway must not re-frame.
                        yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
                    if include_usage:
                        yield f"data: {json.dumps({'id': rid, 'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                    await asyncio.sleep(self.after_done_delay)
                    self.store_prompt(tokens, salt)
                    self.completed += 1
                except asyncio.CancelledError:
                    self.aborted += 1
                    raise
                finally:
                    self.active -= 1

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"x-engine": self.name})

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await generate(request, "text_completion")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await generate(request, "chat")

        return app

    def start(self) -> FakeEngine:
        self.server.start()
        if self.control is not None:
            self.control_url = self.control.start(port=0)
        return self

    def stop(self) -> None:
        self.server.stop()
        if self.control is not None:
            self.control.stop()
        self.stack.close()

    def backend_spec(self) -> str:
        control = self.control_url or "none"
        return f"{self.url},control={control},name={self.name}"


def gateway_config(engines: list[FakeEngine], **overrides: Any) -> GatewayConfig:
    # Health checks poll often and eject on one failure (fast tests); their timeout is
    # long: fake engines answer from this busy process, and one check slower than 1 s
    # on a loaded host ejected a healthy engine (or turned its control endpoint off).
    # An unhealthy fake answers 503 and a stopped one refuses, both at once.
    timeouts = {"health_interval_s": 0.2, "stats_interval_s": 0.2, "health_timeout_s": 5.0,
                "eject_after_failures": 1, **overrides.pop("timeouts", {})}
    # A 2 s lookup budget (default 0.15 s): the fake engines' control servers share this
    # process, so on a busy CI host a lookup can miss 0.15 s, and an engine that does
    # not answer in time counts as holding nothing (a prefix route turns least-loaded).
    routing = {"lookup_timeout_s": 2.0, **overrides.pop("routing", {})}
    overrides.setdefault("control_token", CONTROL_TOKEN)
    return GatewayConfig(backends=[e.backend_spec() for e in engines], timeouts=timeouts,
                         routing=routing, **overrides)


@contextmanager
def running_gateway(config: GatewayConfig, **kwargs: Any) -> Iterator[tuple[str, Any]]:
    app = create_app(config, **kwargs)
    server = ServerThread(app, lifespan="on").start()
    try:
        yield server.url, app.state.gateway
    finally:
        server.stop()


@contextmanager
def engines(*names: str, **kwargs: Any) -> Iterator[list[FakeEngine]]:
    started: list[FakeEngine] = []
    try:
        for name in names:
            started.append(FakeEngine(name, **kwargs).start())
        yield started
    finally:
        for engine in started:
            engine.stop()


def wait_for(predicate: Any, timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def route_of(response: httpx.Response) -> dict[str, str]:
    value = response.headers["x-symram-route"]
    return dict(part.split("=", 1) for part in value.split(";"))

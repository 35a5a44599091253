"""Byte-faithful forwarding of an engine's reply, and client-disconnect propagation.

Streams are passed through chunk by chunk as the engine sent them (``aiter_raw``: no
re-encoding, no re-framing); the gateway only *reads* the SSE events on the side to
time the first content chunk and pick up ``usage``. When the client goes away, the
upstream response is closed, which closes its connection: vLLM notices and aborts the
generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

# Headers that describe one hop, or that the gateway sets itself.
DROP_RESPONSE_HEADERS = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "server", "date",
    "x-request-id", "proxy-connection", "upgrade", "trailer", "te",
})


def response_headers(upstream: httpx.Response, extra: dict[str, str]) -> dict[str, str]:
    out = {k: v for k, v in upstream.headers.items() if k.lower() not in DROP_RESPONSE_HEADERS}
    out.update(extra)
    return out


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n")  # SSE event boundaries, leftmost first
MAX_EVENT_BYTES = 1 << 20


# Event types that end a Responses / Anthropic Messages stream (chat ends with [DONE]).
FINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete",
                          "message_stop"})
CONTENT_EVENTS = frozenset({"response.output_text.delta", "response.reasoning_text.delta",
                            "response.function_call_arguments.delta", "content_block_delta"})


@dataclass
class StreamObserver:
    """Reads SSE events out of the byte stream without touching it: chat/completions
    chunks, OpenAI Responses events and Anthropic Messages events alike."""

    started: float
    first_content_at: float | None = None
    usage: dict[str, Any] | None = None
    content_events: int = 0
    done: bool = False
    error: bool = False
    response_id: str | None = None  # a Responses stream's response id
    _buffer: bytes = field(default=b"", repr=False)

    def feed(self, chunk: bytes) -> None:
        # One linear pass whatever the chunk size: a chunk may hold thousands of events
        # (a burst buffered while the client was slow), and re-scanning the rest of the
        # buffer for each one is quadratic, which stalls the event loop for seconds.
        *events, self._buffer = _EVENT_END.split(self._buffer + chunk)
        if len(self._buffer) > MAX_EVENT_BYTES:  # not SSE: nothing to observe
            self._buffer = b""
        for event in events:
            self._event(event)

    def _event(self, event: bytes) -> None:
        data = b"\n".join(
            line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:")
        ).strip()
        if not data:
            return
        if data == b"[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if obj.get("error"):
            self.error = True
        kind = obj.get("type")
        if isinstance(kind, str) and kind != "error":  # Responses / Messages events
            self._typed_event(kind, obj)
            return
        if obj.get("usage"):
            self.usage = obj["usage"]
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") or {}
            if choice.get("text") or delta.get("content") or delta.get("reasoning_content") \
                    or delta.get("tool_calls"):
                self._content()
                break


    def _typed_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind in CONTENT_EVENTS:
            self._content()
        response = obj.get("response")
        if isinstance(response, dict):  # Responses: the id, and usage at the end
            if self.response_id is None and isinstance(response.get("id"), str):
                self.response_id = response["id"]
            if isinstance(response.get("usage"), dict):
                self.usage = response["usage"]
        message = obj.get("message")
        if kind == "message_start" and isinstance(message, dict) and \
                isinstance(message.get("usage"), dict):
            self.usage = dict(message["usage"])
        if kind == "message_delta" and isinstance(obj.get("usage"), dict):
            # Anthropic: input tokens at the start, output tokens at the end
            self.usage = {**(self.usage or {}), **obj["usage"]}
        if kind in FINAL_EVENTS:
            self.done = True

    def _content(self) -> None:
        self.content_events += 1
        if self.first_content_at is None:
            self.first_content_at = time.monotonic()


class StreamProxyResponse(Response):
    """An ASGI response that streams `upstream` to the client and, whatever happens
    (end of stream, client gone, engine gone), closes `upstream` and calls `on_finish`
    once with the outcome: "complete", "disconnect" or "upstream_error"."""

    def __init__(
        self,
        upstream: httpx.Response,
        headers: dict[str, str],
        observer: StreamObserver,
        on_finish: Callable[[str], None],
    ) -> None:
        self.upstream = upstream
        self.status_code = upstream.status_code
        self.observer = observer
        self.on_finish = on_finish
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = "complete"
        ended = False

        async def watch_disconnect(cancel: anyio.CancelScope) -> None:
            nonlocal outcome
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    # uvicorn also reports a disconnect once the response is complete,
                    # and clients may hang up right after `[DONE]`, before the upstream
                    # body has formally ended: neither is an abandoned generation.
                    if outcome == "complete" and not ended and not self.observer.done:
                        outcome = "disconnect"
                    cancel.cancel()
                    return

        async def pump() -> None:
            nonlocal outcome, ended
            try:
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
                try:
                    async for chunk in self.upstream.aiter_raw():
                        self.observer.feed(chunk)
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                except httpx.HTTPError as exc:
                    # Bytes were sent already: no retry is possible, say so in-band.
                    outcome = "upstream_error"
                    error = {"error": {"message": "upstream engine failed mid-stream: "
                                       f"{type(exc).__name__}", "type": "upstream_error",
                                       "param": None, "code": 502}}
                    await send({"type": "http.response.body",
                                "body": f"data: {json.dumps(error)}\n\n".encode(),
                                "more_body": True})
                ended = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the client went away while we were writing
                if outcome == "complete" and not self.observer.done:
                    outcome = "disconnect"

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(watch_disconnect, group.cancel_scope)
                await pump()
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()
                self.on_finish(outcome)


class ClientGone(Exception):
    """The client disconnected before the reply was ready."""


async def until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so closing its upstream connection) if the client
    disconnects first; then raise ClientGone."""
    task: asyncio.Task[T] = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone()


async def read_raw(upstream: httpx.Response) -> bytes:
    """The whole body exactly as sent (no content decoding); closes `upstream`."""
    try:
        return b"".join([chunk async for chunk in upstream.aiter_raw()])
    finally:
        await upstream.aclose()

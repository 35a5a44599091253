"""The gateway's aiohttp request-path client (upstream.py) against a real asyncio HTTP
server: raw bytes (no content decoding), no cookie replay, connection reuse after a
full body and close after an abandoned one, and httpx's exception types for the
gateway's retry / 504 / in-band error handling."""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
import httpx
import pytest

from symram_vllm.serving.gateway.upstream import FastUpstream, translate


class Server:
    """HTTP/1.1 keep-alive server: records each request's headers and the connection
    it came on; /gzip answers a gzip body, /slow streams forever, /hang never answers,
    /cookie sets a cookie."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, dict[str, str]]] = []
        self.connections = 0
        self.closed = 0
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> Server:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:] if line)}
                if int(headers.get("content-length", 0)):
                    await reader.readexactly(int(headers["content-length"]))
                self.requests.append((conn, headers))
                if path == "/hang":
                    await asyncio.sleep(30)
                if path == "/slow":
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    while True:
                        writer.write(b"6\r\ndata: \r\n")
                        await writer.drain()
                        await asyncio.sleep(0.02)
                body = gzip.compress(b'{"ok": 1}') if path == "/gzip" else b'{"ok": 1}'
                extra = b"content-encoding: gzip\r\n" if path == "/gzip" else b""
                if path == "/cookie":
                    extra = b"set-cookie: tenant=a; Path=/\r\n"
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n%s"
                             b"content-length: %d\r\n\r\n%s" % (extra, len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed += 1
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


def run(coro):
    return asyncio.run(coro)


def test_raw_bytes_no_cookie_replay_and_keepalive():
    async def scenario() -> None:
        server = await Server().start()
        client = FastUpstream(read_s=5, connect_s=2)
        base = f"http://127.0.0.1:{server.port}"
        try:
            got = await client.send(client.build_request(
                "POST", f"{base}/gzip", content=b"{}",
                headers={"accept-encoding": "identity"}), stream=True)
            raw = b"".join([c async for c in got.aiter_raw()])
            await got.aclose()
            assert got.status_code == 200 and got.headers["content-encoding"] == "gzip"
            assert gzip.decompress(raw) == b'{"ok": 1}'  # passed on as received
            first = await client.post(f"{base}/cookie", json={"a": 1}, timeout=5)
            assert first.json() == {"ok": 1}
            await client.post(f"{base}/plain", json={}, timeout=5)
            # One connection for all three (reused after each full body) ...
            assert {conn for conn, _ in server.requests} == {1}
            # ... and the cookie one engine set is not sent back on the next request.
            assert "cookie" not in server.requests[-1][1]
            assert server.requests[1][1]["content-type"] == "application/json"
        finally:
            await client.aclose()
            await server.stop()

    run(scenario())


def test_abandoned_stream_closes_its_connection():
    async def scenario() -> None:
        server = await Server().start()
        client = FastUpstream(read_s=5, connect_s=2)
        try:
            got = await client.send(client.build_request(
                "POST", f"http://127.0.0.1:{server.port}/slow", content=b"{}", headers={}))
            chunks = got.aiter_raw()
            assert (await chunks.__anext__()).startswith(b"data")
            await got.aclose()  # the client went away: the engine must notice
            for _ in range(100):
                if server.closed:
                    break
                await asyncio.sleep(0.02)
            assert server.closed == 1
        finally:
            await client.aclose()
            await server.stop()

    run(scenario())


def test_failures_raise_httpx_types():
    async def scenario() -> None:
        server = await Server().start()
        port = server.port
        await server.stop()
        await asyncio.sleep(0.05)
        client = FastUpstream(read_s=0.2, connect_s=1)
        try:
            with pytest.raises(httpx.ConnectError):
                await client.post(f"http://127.0.0.1:{port}/x", json={}, timeout=2)
            hang = await Server().start()
            with pytest.raises(httpx.ReadTimeout):  # no headers within read_s
                await client.send(client.build_request(
                    "POST", f"http://127.0.0.1:{hang.port}/hang", content=b"{}", headers={}))
            with pytest.raises(httpx.ReadTimeout):  # a post's overall deadline
                await client.post(f"http://127.0.0.1:{hang.port}/hang", json={}, timeout=0.1)
            await hang.stop()
        finally:
            await client.aclose()

    run(scenario())


@pytest.mark.parametrize("exc,expected", [
    (aiohttp.ConnectionTimeoutError("connect"), httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError("read"), httpx.ReadTimeout),
    (asyncio.TimeoutError(), httpx.ReadTimeout),
    (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError("Response payload is not completed"),
     httpx.RemoteProtocolError),
    (aiohttp.ClientOSError(104, "reset"), httpx.ReadError),
])
def test_translate(exc, expected):
    out = translate(exc)
    assert type(out) is expected and type(exc).__name__ in str(out)


def test_json_of_a_post_reply():
    async def scenario() -> None:
        server = await Server().start()
        client = FastUpstream(read_s=5, connect_s=2)
        try:
            reply = await client.post(f"http://127.0.0.1:{server.port}/x", json={"k": [1]},
                                      timeout=5, headers={"x-request-id": "r1"})
            reply.raise_for_status()
            assert reply.json() == json.loads(b'{"ok": 1}')
            assert server.requests[0][1]["x-request-id"] == "r1"
        finally:
            await client.aclose()
            await server.stop()

    run(scenario())


def test_stream_observer_is_linear_in_a_burst():
    # A whole generation can arrive in one read (buffered while the client was slow):
    # parsing it must not rescan the buffer per event (that stalled the event loop for
    # seconds with a real engine), and boundaries split across reads must still count.
    import time

    from symram_vllm.serving.gateway.proxy import StreamObserver

    event = b'data: {"id":"x","choices":[{"index":0,"text":" tok","finish_reason":null}]}'
    burst = b"\n\n".join([event] * 20000) + b"\n\ndata: [DONE]\n\n"
    observer = StreamObserver(started=0.0)
    t0 = time.perf_counter()
    observer.feed(burst)
    assert time.perf_counter() - t0 < 1.0
    assert observer.content_events == 20000 and observer.done
    split = StreamObserver(started=0.0)
    data = (b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"total_tokens":3}}'
            b"\r\n\r\n") * 3 + b"data: [DONE]\r\n\r\n"
    for i in range(0, len(data), 5):
        split.feed(data[i:i + 5])
    assert split.content_events == 3 and split.done and split.usage == {"total_tokens": 3}

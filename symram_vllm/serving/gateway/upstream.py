"""The HTTP client of the request path (forwarding, tokenize, prefix lookups), on
aiohttp.

httpx costs about 0.9 ms of CPU per request on the 2-core test hosts, aiohttp about
0.15 ms (``make bench-gateway``, docs/gateway.md): on the request path that is most of
what the gateway adds. ``FastUpstream`` offers the part of ``httpx.AsyncClient`` the
gateway uses (``build_request`` / ``send(stream=True)`` / ``post`` / ``aclose``) and
raises httpx's exception types, so the callers handle one set of errors whichever
client runs. Health checks and stats polls stay on httpx (off the request path).

Bytes are passed as received: no content decoding (``auto_decompress=False``), and no
cookie jar, so nothing one engine sets is replayed on another tenant's request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx

# Below uvicorn's 5 s keep-alive timeout (vLLM's server), so the gateway never reuses a
# connection the engine is closing at that moment.
KEEPALIVE_S = 4.0
READ_CHUNK = 64 * 1024


def translate(exc: BaseException) -> httpx.HTTPError:
    """The httpx exception the gateway's handlers expect for an aiohttp failure."""
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, asyncio.TimeoutError):  # includes aiohttp's socket read timeouts
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError |
                  aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(message)
    return httpx.ReadError(message)


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    url: str
    content: bytes
    headers: Mapping[str, str]


class UpstreamResponse:
    """An engine's response whose headers arrived; the body is read with
    ``aiter_raw`` (or ``aread``) and the connection released with ``aclose``."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status
        self.headers = response.headers
        self._done = False
        self._body = b""

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        # At most READ_CHUNK bytes a step, as httpx: a burst the engine sent while the
        # client was slow is passed on in bounded pieces.
        try:
            async for chunk in self._response.content.iter_chunked(READ_CHUNK):
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise translate(exc) from exc
        self._done = True

    async def aread(self) -> bytes:
        try:
            self._body = await self._response.read()
            self._done = True
            return self._body
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise translate(exc) from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        # A body read to its end leaves the connection for reuse; anything else closes
        # it, which is how an engine learns that its client went away.
        if self._response.content.at_eof() or self._done:
            self._response.release()
        else:
            self._response.close()

    @property
    def content(self) -> bytes:
        """The body, once ``aread`` (or ``post``) read it."""
        return self._body

    def json(self) -> Any:
        return json.loads(self.content)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise httpx.HTTPError(f"HTTP {self.status_code} from {self._response.url}")


class FastUpstream:
    """aiohttp behind the slice of ``httpx.AsyncClient`` the gateway uses."""

    def __init__(self, read_s: float, connect_s: float) -> None:
        self.timeout = aiohttp.ClientTimeout(total=None, connect=connect_s,
                                             sock_connect=connect_s, sock_read=read_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use, inside the server's event loop.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0,
                                             keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                skip_auto_headers=("User-Agent",))
        return self._session

    def build_request(self, method: str, url: str, *, content: bytes,
                      headers: Mapping[str, str]) -> UpstreamRequest:
        return UpstreamRequest(method, url, content, headers)

    async def _open(self, method: str, url: str, content: bytes, headers: Mapping[str, str],
                    timeout: aiohttp.ClientTimeout | None = None) -> UpstreamResponse:
        try:
            response = await self._client().request(
                method, url, data=content, headers=dict(headers), allow_redirects=False,
                timeout=timeout or self.timeout)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise translate(exc) from exc
        return UpstreamResponse(response)

    async def send(self, request: UpstreamRequest, *, stream: bool = True
                   ) -> UpstreamResponse:
        response = await self._open(request.method, request.url, request.content,
                                    request.headers)
        if not stream:
            await response.aread()
        return response

    async def post(self, url: str, *, json: Any = None, timeout: float | None = None,
                   headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        """A small JSON call (tokenize, prefix lookup) with an overall deadline."""
        body = _dumps(json)
        response = await self._open(
            "POST", url, body, {"content-type": "application/json", **(headers or {})},
            aiohttp.ClientTimeout(total=timeout) if timeout else None)
        await response.aread()
        return response

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()

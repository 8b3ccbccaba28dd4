"""The one shared upstream HTTP client, with connection pooling.

httpx keeps the API; the transport is chosen by ``CHITTYCAN_HTTP_TRANSPORT``. Measured here,
httpx's default transport collapses under concurrency, so ``aiohttp`` (httpx-aiohttp) is the
default. One client per event loop (held weakly by the loop: the benchmark and tests run several
loops in one process). ``use_transport`` swaps the transport, e.g. for an ``httpx.MockTransport``
that answers in an upstream's wire format, so providers are tested without a network.

Egress policy (``core.egress``, docs/security.md): every new upstream connection checks the
addresses it is about to connect to, after DNS resolution and including address literals, and
connects only to those (the ``Host`` header and TLS SNI stay the host name). The check runs where
the connection resolves its host (aiohttp's connector, with its DNS cache of 10 s; httpcore's
network backend), so a kept-alive connection costs nothing per request and no lookup is added to
the ``/v1`` path. A refused destination is a connection error (the upstream call fails over or
ends in 502).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import typing
import weakref
from collections.abc import Callable, Iterator, Sequence

import aiohttp
import httpcore
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.tracing import Trace
from django.conf import settings
from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient
from httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions

from core import egress

log = logging.getLogger(__name__)

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()
_last: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient] | None = None
_transport: Callable[[], httpx.AsyncBaseTransport] | None = None
_sessions: weakref.WeakKeyDictionary[httpx.AsyncClient, _Session] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def use_transport(factory: Callable[[], httpx.AsyncBaseTransport]) -> Iterator[None]:
    """Build every upstream client from ``factory``'s transport while the block runs."""
    global _transport, _last
    previous, _transport, _last = _transport, factory, None
    _clients.clear()
    try:
        yield
    finally:
        _transport, _last = previous, None
        _clients.clear()


class _NoCookies(httpx.Cookies):
    """Upstream cookies are neither kept nor sent.

    One client serves every tenant, so a cookie an upstream set on one request must never ride
    along on another's; skipping the cookie jar also saves ~14 us of parsing per response.
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None


class _EgressResolver(AbstractResolver):
    """aiohttp's DNS lookups through ``core.egress.resolve`` (getaddrinfo in a thread, as aiohttp's
    own threaded resolver does; tests substitute the answers)."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await asyncio.get_running_loop().run_in_executor(None, egress.resolve, host, port)
        if not addresses:
            raise OSError(f"cannot resolve {host}")
        flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=flags,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


class _EgressConnector(aiohttp.TCPConnector):
    """Checks what each new connection is about to connect to (names and address literals alike)."""

    async def _resolve_host(self, host: str, port: int, traces: Sequence[Trace] | None = None) -> list[ResolveResult]:
        hosts = await super()._resolve_host(host, port, traces)
        try:
            egress.vet_addresses(host, [h["host"] for h in hosts])
        except egress.EgressBlocked as exc:
            log.warning("upstream %s:%s %s", host, port, exc)
            raise  # an OSError: aiohttp makes it a connection error
        return hosts


def _unread(content: aiohttp.StreamReader) -> bytes:
    """What an aiohttp body reader still holds (private fields: aiohttp has no public accessor)."""
    buffered: typing.Iterable[bytes] = getattr(content, "_buffer", ())
    offset: int = getattr(content, "_buffer_offset", 0)
    return b"".join(buffered)[offset:]


class _WholeStream(AiohttpResponseStream):
    """A response body that yields every byte the upstream sent before its connection broke.

    aiohttp's body reader raises a connection failure before the bytes it already holds (bytes
    that arrived together with, or just before, the reset), so a stream cut mid-way would lose
    its last frames when the gateway reads them a moment late: the client would miss text the
    upstream billed for, and the usage row would count fewer output tokens than were sent.
    """

    def __aiter__(self) -> typing.AsyncIterator[bytes]:
        return _whole_body(self._aiohttp_response.content)


async def _whole_body(content: aiohttp.StreamReader) -> typing.AsyncIterator[bytes]:
    """A body's chunks as they arrive, then what was received before a broken connection
    (``_WholeStream``); aiohttp's failures raised as httpx's."""
    with map_aiohttp_exceptions():
        try:
            async for chunk in content.iter_chunked(_WholeStream.CHUNK_SIZE):
                yield chunk
        except aiohttp.ClientPayloadError:
            rest = _unread(content)
            if rest:
                yield rest
            raise


class _Session:
    """The aiohttp session under one upstream client, built on first use inside the running loop;
    shared by httpx-aiohttp's transport and the direct path (``open_stream``)."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        self._tls = tls
        self._session: aiohttp.ClientSession | None = None

    def __call__(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = _EgressConnector(
                limit=settings.CHITTYCAN_HTTP_MAX_CONNECTIONS,
                keepalive_timeout=30.0,
                ssl=self._tls,
                resolver=_EgressResolver(),
            )
            # aiohttp's default cookie jar would keep upstream cookies across tenants too.
            self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class _WholeTransport(AiohttpTransport):
    """httpx-aiohttp's transport with ``_WholeStream`` bodies."""

    async def aclose(self) -> None:
        if isinstance(self.client, _Session):  # only the fast path used it: the session is still ours
            await self.client.close()
        else:
            await super().aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        stream = response.stream
        if isinstance(stream, AiohttpResponseStream):
            response.stream = _WholeStream(stream._aiohttp_response)
        return response


class _EgressBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend for the ``httpx`` transport: resolve, check, connect to the
    checked address (httpcore still sends SNI and Host for the name)."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await asyncio.get_running_loop().run_in_executor(None, egress.resolve, host, port)
        try:
            vetted = egress.vet_addresses(host, addresses)
        except egress.EgressBlocked as exc:
            log.warning("upstream %s:%s %s", host, port, exc)
            raise httpcore.ConnectError(str(exc)) from exc
        last: Exception | None = None
        for address in vetted:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except httpcore.ConnectError as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not upstreams")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _build() -> httpx.AsyncClient:
    found = _build_client()
    found._cookies = _NoCookies()  # httpx has no public switch; its own cookie handling is bypassed
    return found


def _build_client() -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=settings.CHITTYCAN_HTTP_MAX_CONNECTIONS,
        max_keepalive_connections=settings.CHITTYCAN_HTTP_MAX_CONNECTIONS,
        keepalive_expiry=30.0,
    )
    timeout = httpx.Timeout(settings.CHITTYCAN_UPSTREAM_TIMEOUT, connect=settings.CHITTYCAN_UPSTREAM_CONNECT_TIMEOUT)
    if _transport is not None:
        return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False, transport=_transport())
    if settings.CHITTYCAN_HTTP_TRANSPORT == "aiohttp":
        # One TLS context (certifi's CAs, ~1.9 MiB loaded) for both: httpx-aiohttp's transport
        # would otherwise build its own, which the session it is given never uses.
        tls = httpx.create_ssl_context(trust_env=False)
        session = _Session(tls)
        transport = _WholeTransport(limits=limits, client=session, verify=tls)
        found = HttpxAiohttpClient(limits=limits, timeout=timeout, trust_env=False, transport=transport)
        _sessions[found] = session
        return found
    native = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    # httpx has no public switch for httpcore's network backend; the pool is httpcore's own.
    native._pool._network_backend = _EgressBackend(native._pool._network_backend)
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False, transport=native)


def client() -> httpx.AsyncClient:
    global _last
    loop = asyncio.get_running_loop()
    last = _last
    if last is not None and last[0] is loop and not last[1].is_closed:
        return last[1]  # the common case, without a weak reference per call
    found = _clients.get(loop)
    if found is None or found.is_closed:
        found = _clients[loop] = _build()
    _last = (loop, found)
    return found


def aiohttp_session() -> aiohttp.ClientSession | None:
    """This loop's aiohttp session when the upstream client runs on aiohttp (the default); None when
    it does not (``CHITTYCAN_HTTP_TRANSPORT=httpx``, or a transport put in by ``use_transport``)."""
    session = _sessions.get(client())
    return session() if session is not None else None


def _client_timeout(timeouts: httpx.Timeout) -> aiohttp.ClientTimeout:
    """httpx's timeouts as httpx-aiohttp maps them (connect, read between bytes, pool wait)."""
    return aiohttp.ClientTimeout(sock_connect=timeouts.connect, sock_read=timeouts.read, connect=timeouts.pool)


class Streamed:
    """An upstream answer read straight from aiohttp (the hot path, without httpx's request and
    response objects: ~0.1 ms of CPU per call): whole (``aread``) or as it arrives
    (``aiter_bytes``, every byte received before a broken connection included, as
    ``_WholeStream``); failures raised as the httpx exceptions httpx-aiohttp raises, so callers
    handle one family of errors whichever path served them."""

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status: int = response.status
        self.headers: typing.Mapping[str, str] = response.headers

    async def aread(self) -> bytes:
        with map_aiohttp_exceptions():
            return await self._response.read()

    def aiter_bytes(self) -> typing.AsyncIterator[bytes]:
        return _whole_body(self._response.content)

    async def aclose(self) -> None:
        """Give the connection back (closed instead if the body was not read to its end)."""
        with map_aiohttp_exceptions():
            self._response.release()
            await self._response.wait_for_close()


async def open_stream(
    session: aiohttp.ClientSession,
    url: str | httpx.URL,
    content: bytes,
    headers: typing.Mapping[str, str],
    timeouts: httpx.Timeout,
) -> Streamed:
    """POST ``content`` on aiohttp directly and return once the answer's headers are in; the caller
    reads the body and must ``aclose`` it. Timeouts as httpx-aiohttp maps them."""
    with map_aiohttp_exceptions():
        response = await session.post(
            str(url), data=content, headers=headers, allow_redirects=False, timeout=_client_timeout(timeouts)
        )
    return Streamed(response)


async def aclose() -> None:
    """Close this loop's client (server shutdown, tests)."""
    global _last
    _last = None
    found = _clients.pop(asyncio.get_running_loop(), None)
    if found is not None:
        await found.aclose()

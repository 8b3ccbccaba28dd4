"""The one shared upstream HTTP client, with connection pooling.

httpx keeps the API; the transport is chosen by ``CHITTYCAN_HTTP_TRANSPORT``. Measured here,
httpx's default transport collapses under concurrency, so ``aiohttp`` (httpx-aiohttp) is the
default. One client per event loop (held weakly by the loop: the benchmark and tests run several
loops in one process). ``use_transport`` swaps the transport, e.g. for an ``httpx.MockTransport``
that answers in an upstream's wire format, so providers are tested without a network.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable, Iterator

import aiohttp
import httpx
from django.conf import settings
from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()
_last: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient] | None = None
_transport: Callable[[], httpx.AsyncBaseTransport] | None = None


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

        def session() -> aiohttp.ClientSession:  # called inside the running loop, on first use
            connector = aiohttp.TCPConnector(
                limit=settings.CHITTYCAN_HTTP_MAX_CONNECTIONS,
                keepalive_timeout=30.0,
                ssl=httpx.create_ssl_context(trust_env=False),
            )
            # aiohttp's default cookie jar would keep upstream cookies across tenants too.
            return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

        transport = AiohttpTransport(limits=limits, client=session)
        return HttpxAiohttpClient(limits=limits, timeout=timeout, trust_env=False, transport=transport)
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)


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


async def aclose() -> None:
    """Close this loop's client (server shutdown, tests)."""
    global _last
    _last = None
    found = _clients.pop(asyncio.get_running_loop(), None)
    if found is not None:
        await found.aclose()

"""The one shared upstream HTTP client, with connection pooling.

httpx keeps the API; the transport is chosen by ``CHITTYCAN_HTTP_TRANSPORT``. Measured here,
httpx's default transport collapses under concurrency, so ``aiohttp`` (httpx-aiohttp) is the
default. One client per event loop: the benchmark and tests run several loops in one process.
"""

from __future__ import annotations

import asyncio

import httpx
from django.conf import settings

_clients: dict[int, httpx.AsyncClient] = {}


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
    if settings.CHITTYCAN_HTTP_TRANSPORT == "aiohttp":
        import aiohttp
        from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient

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
    loop_id = id(asyncio.get_running_loop())
    found = _clients.get(loop_id)
    if found is None or found.is_closed:
        found = _clients[loop_id] = _build()
    return found


async def aclose() -> None:
    """Close this loop's client (server shutdown, tests)."""
    found = _clients.pop(id(asyncio.get_running_loop()), None)
    if found is not None:
        await found.aclose()

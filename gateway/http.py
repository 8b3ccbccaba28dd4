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


def _build() -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=settings.CHITTYCAN_HTTP_MAX_CONNECTIONS,
        max_keepalive_connections=settings.CHITTYCAN_HTTP_MAX_CONNECTIONS,
        keepalive_expiry=30.0,
    )
    timeout = httpx.Timeout(settings.CHITTYCAN_UPSTREAM_TIMEOUT, connect=settings.CHITTYCAN_UPSTREAM_CONNECT_TIMEOUT)
    if settings.CHITTYCAN_HTTP_TRANSPORT == "aiohttp":
        from httpx_aiohttp import HttpxAiohttpClient

        return HttpxAiohttpClient(limits=limits, timeout=timeout, trust_env=False)
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

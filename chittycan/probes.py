"""Operational endpoints outside the API: ``/healthz`` (the process answers), ``/readyz`` (it can
serve: database, Redis and the usage writer) and ``/metrics`` (Prometheus). docs/observability.md.

Each is a Django view (the URLconf's, for Django's own servers and test client) and, for ``GET``
and ``HEAD``, an ASGI handler that ``chittycan.routing.HotRoutes`` reaches by exact path before
Django: an orchestrator probing a gateway every few seconds then never makes it load the URLconf
(the admin, the REST and management APIs: about 20 MiB that a data-plane process otherwise never
needs). Both answer from the same functions below.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST

from core import runtime
from gateway import metrics

PROBE_TIMEOUT = 2.0


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse(HEALTHY)


def _database_ok() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _check_database() -> str:
    try:
        await asyncio.wait_for(sync_to_async(_database_ok, thread_sensitive=False)(), PROBE_TIMEOUT)
    except Exception as exc:  # any failure means not ready; say which
        return f"unreachable: {type(exc).__name__}"
    return "ok"


async def _check_redis() -> str:
    if not settings.REDIS_URL:
        return "not configured"
    try:
        await asyncio.wait_for(runtime.redis_client().ping(), PROBE_TIMEOUT)
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}"
    return "ok"


HEALTHY: dict[str, Any] = {"status": "ok"}


async def readiness() -> tuple[int, dict[str, Any]]:
    """200 when the database and Redis answer and this process's usage writer runs, else 503."""
    runtime.ensure_started()  # the background tasks start with the first request; a probe is one
    database, redis_state = await asyncio.gather(_check_database(), _check_redis())
    checks = {
        "database": database,
        "redis": redis_state,
        "usage_writer": "ok" if runtime.running("usage-writer") else "not running",
    }
    ready = all(v in ("ok", "not configured") for v in checks.values())
    return (200 if ready else 503), {"status": "ready" if ready else "unavailable", "checks": checks}


async def readyz(request: HttpRequest) -> JsonResponse:
    status, body = await readiness()
    return JsonResponse(body, status=status)


METRICS_REFUSED: dict[str, Any] = {
    "error": {
        "message": "GET /metrics needs Authorization: Bearer <CHITTYCAN_METRICS_TOKEN>"
        " (without a token set, only loopback clients not behind a proxy may scrape).",
        "type": "authentication_error",
    }
}


def metrics_view(request: HttpRequest) -> HttpResponse:
    proxied = any(name in request.headers for name in metrics.PROXY_HEADERS)
    if not metrics.token_ok(request.headers.get("Authorization"), request.META.get("REMOTE_ADDR"), proxied):
        return JsonResponse(METRICS_REFUSED, status=401, headers={"WWW-Authenticate": "Bearer"})
    return HttpResponse(metrics.render(), content_type=CONTENT_TYPE_LATEST)


# --- the same probes straight from ASGI (chittycan.routing.HotRoutes, GET and HEAD only) ----------

_JSON = (b"content-type", b"application/json")
_PROXY_HEADERS = frozenset(name.lower().encode() for name in metrics.PROXY_HEADERS)


async def _answer(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HealthzProbe:
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await _answer(send, 200, orjson.dumps(HEALTHY), [_JSON])


class ReadyzProbe:
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        status, body = await readiness()
        await _answer(send, status, orjson.dumps(body), [_JSON])


class MetricsProbe:
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or ())
        proxied = any(name in headers for name in _PROXY_HEADERS)
        client = scope.get("client")
        given = headers.get(b"authorization")
        authorization = given.decode("latin-1") if given is not None else None
        if not metrics.token_ok(authorization, client[0] if client else None, proxied):
            refused = [_JSON, (b"www-authenticate", b"Bearer")]
            await _answer(send, 401, orjson.dumps(METRICS_REFUSED), refused)
            return
        rendered = await sync_to_async(metrics.render, thread_sensitive=False)()  # it reads the database
        await _answer(send, 200, rendered, [(b"content-type", CONTENT_TYPE_LATEST.encode())])

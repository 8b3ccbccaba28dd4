"""Operational endpoints outside the API: ``/healthz`` (the process answers), ``/readyz`` (it can
serve: database, Redis and the usage writer) and ``/metrics`` (Prometheus). docs/observability.md."""

from __future__ import annotations

import asyncio

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST

from core import runtime
from gateway import metrics

PROBE_TIMEOUT = 2.0


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


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


async def readyz(request: HttpRequest) -> JsonResponse:
    """200 when the database and Redis answer and this process's usage writer runs, else 503."""
    runtime.ensure_started()  # the background tasks start with the first request; a probe is one
    database, redis_state = await asyncio.gather(_check_database(), _check_redis())
    checks = {
        "database": database,
        "redis": redis_state,
        "usage_writer": "ok" if runtime.running("usage-writer") else "not running",
    }
    ready = all(v in ("ok", "not configured") for v in checks.values())
    return JsonResponse({"status": "ready" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)


def metrics_view(request: HttpRequest) -> HttpResponse:
    proxied = any(name in request.headers for name in metrics.PROXY_HEADERS)
    if not metrics.token_ok(request.headers.get("Authorization"), request.META.get("REMOTE_ADDR"), proxied):
        body = {
            "error": {
                "message": "GET /metrics needs Authorization: Bearer <CHITTYCAN_METRICS_TOKEN>"
                " (without a token set, only loopback clients not behind a proxy may scrape).",
                "type": "authentication_error",
            }
        }
        return JsonResponse(body, status=401, headers={"WWW-Authenticate": "Bearer"})
    return HttpResponse(metrics.render(), content_type=CONTENT_TYPE_LATEST)

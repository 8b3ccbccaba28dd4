"""The request log: ``GET /api/requests`` (one ledger row per request, newest first, cursor
paginated, as JSON, CSV or JSONL) and ``GET /api/requests/{request_id}``.

Who reads what:
- a management token or a session: the rows of the caller's tenant subtrees (control/permissions.py);
- a gateway key (``Authorization: Bearer chitty_...``) with the ``usage:read`` scope (every key
  whose ``endpoints`` scope is absent, or lists it): the rows of the key's own tenant, so a team
  finds its request by the ``x-request-id`` it received. A key narrowed without it gets 403.

A row carries the public model name the client asked for, the token counts and the cost charged
(``cost_usd`` is the ``X-ChittyCan-Cost`` header of the response, to the micro-dollar).
"""

from __future__ import annotations

import csv
import io
import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework import authentication, exceptions, permissions
from rest_framework.pagination import CursorPagination
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from control.permissions import HasTenantAccess, scope_of
from control.tokens import TOKEN_PREFIX, ManagementTokenAuthentication
from core.money import format_usd
from ledger.models import UsageRecord
from tenants import keys
from tenants.keyinfo import USAGE_READ, KeyInfo, load_key

# --- authentication by gateway key ----------------------------------------------------------------


class KeyUser:
    """The DRF user of a request authenticated by a gateway key (not a Django user)."""

    is_authenticated = True
    is_active = True
    is_staff = False
    pk = None

    def __init__(self, key: KeyInfo) -> None:
        self.key = key

    def get_username(self) -> str:
        return f"key:{self.key.prefix}"


class GatewayKeyAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer chitty_...`` (a gateway key); management tokens are left to theirs."""

    def authenticate(self, request: Request) -> tuple[KeyUser, KeyInfo] | None:
        header = authentication.get_authorization_header(request).split()
        if len(header) != 2 or header[0].lower() != b"bearer":
            return None
        try:
            token = header[1].decode("ascii")
        except UnicodeDecodeError:
            return None
        if token.startswith(TOKEN_PREFIX) or not token.startswith(keys.KEY_PREFIX):
            return None
        info = load_key(keys.key_prefix(token)) if keys.looks_valid(token) else None
        if info is None or not keys.verify_key(token, info.hashed):
            raise exceptions.AuthenticationFailed("Invalid API key.")
        if info.expires_at is not None and info.expires_at <= time.time():
            raise exceptions.AuthenticationFailed("This API key has expired.")
        return KeyUser(info), info

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"


class CanReadRequests(permissions.BasePermission):
    message = f"This API key's scopes do not include {USAGE_READ}."

    def has_permission(self, request: Request, view: Any) -> bool:
        if isinstance(request.auth, KeyInfo):
            return request.auth.can_read_usage
        return HasTenantAccess().has_permission(request, view)


# --- formats --------------------------------------------------------------------------------------

FIELDS = (
    "request_id",
    "created_at",
    "tenant",
    "key_id",
    "key_name",
    "route",
    "model",
    "served_model",
    "provider",
    "stream",
    "status",
    "http_status",
    "error_type",
    "cache",
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "usage_source",
    "cost_micro",
    "cost_usd",
    "latency_ms",
    "ttft_ms",
)


def row_dict(record: UsageRecord, detail: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {
        "request_id": record.request_id,
        "created_at": record.created_at.isoformat(),
        "tenant": record.tenant.slug if record.tenant_id else None,
        "key_id": record.api_key_id,
        "key_name": record.api_key.name if record.api_key_id and record.api_key else None,
        "route": record.endpoint,
        "model": record.requested_model,
        "served_model": record.served_model,
        "provider": record.provider,
        "stream": record.stream,
        "status": record.status,
        "http_status": record.http_status,
        "error_type": record.error_type,
        "cache": "hit" if record.cache_hit else "miss",
        "input_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens,
        "cache_write_tokens": record.cache_write_tokens,
        "output_tokens": record.completion_tokens,
        "reasoning_tokens": record.reasoning_tokens,
        "usage_source": record.usage_source,
        "cost_micro": record.cost_micro,
        "cost_usd": format_usd(record.cost_micro),
        "latency_ms": record.latency_ms,
        "ttft_ms": record.ttft_ms,
    }
    if detail:
        row["timings_ms"] = record.timings
        row["attempts"] = record.attempts
        decision = getattr(record, "route", None)  # the routing policy's decision, on ledgers that keep it
        if decision is not None:
            row["route_decision"] = decision
        row["end_user"] = record.end_user
    return row


class CsvRenderer(BaseRenderer):
    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(data)
        return out.getvalue().encode()


class JsonLinesRenderer(BaseRenderer):
    media_type = "application/jsonl"
    format = "jsonl"
    charset = "utf-8"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        return b"".join(orjson.dumps(row) + b"\n" for row in data)


class RequestCursor(CursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 100
    page_size_query_param = "limit"
    max_page_size = 1000


class DownloadCursor(RequestCursor):
    page_size = 1000
    max_page_size = 10_000


# --- views ----------------------------------------------------------------------------------------

STATUSES = tuple(UsageRecord.Status.values)


class RequestLogBase(APIView):
    authentication_classes = [
        GatewayKeyAuthentication,
        ManagementTokenAuthentication,
        authentication.SessionAuthentication,
    ]
    permission_classes = [CanReadRequests]

    def handle_exception(self, exc: Exception) -> Response:
        # Errors always in the API's JSON envelope, whatever ?format= asked for.
        self.request.accepted_renderer = JSONRenderer()
        self.request.accepted_media_type = JSONRenderer.media_type
        return super().handle_exception(exc)

    def scoped(self) -> QuerySet[UsageRecord]:
        qs = UsageRecord.objects.select_related("tenant", "api_key")
        if isinstance(self.request.auth, KeyInfo):
            return qs.filter(tenant_id=self.request.auth.tenant.id)
        ids = scope_of(self.request).visible_ids
        return qs if ids is None else qs.filter(tenant_id__in=ids)


class RequestListView(RequestLogBase):
    """``GET /api/requests?start=&end=&key=&model=&status=&cache=&limit=&cursor=&format=json|csv|jsonl``."""

    renderer_classes = [JSONRenderer, CsvRenderer, JsonLinesRenderer]

    def perform_content_negotiation(self, request: Request, force: bool = False) -> tuple[BaseRenderer, str]:
        fmt = request.query_params.get("format")
        if fmt is not None and fmt not in ("json", "csv", "jsonl"):
            raise exceptions.ValidationError({"format": ["json, csv or jsonl."]})
        return super().perform_content_negotiation(request, force)

    def get(self, request: Request) -> Response:
        qs = self.filtered(self.scoped(), request.query_params)
        download = request.accepted_renderer.format in ("csv", "jsonl")
        paginator = DownloadCursor() if download else RequestCursor()
        page = paginator.paginate_queryset(qs, request, view=self) or []
        rows = [row_dict(r) for r in page]
        next_link = paginator.get_next_link()
        if download:
            headers = {"Content-Disposition": f'attachment; filename="requests.{request.accepted_renderer.format}"'}
            if next_link:
                headers["Link"] = f'<{next_link}>; rel="next"'
            return Response(rows, headers=headers)
        return Response({"next": next_link, "previous": paginator.get_previous_link(), "results": rows})

    @staticmethod
    def filtered(qs: QuerySet[UsageRecord], params: Any) -> QuerySet[UsageRecord]:
        for name, lookup in (("start", "created_at__gte"), ("end", "created_at__lt")):
            raw = params.get(name)
            if raw:
                qs = qs.filter(**{lookup: _moment(name, raw)})
        key = params.get("key")
        if key:
            qs = qs.filter(api_key_id=int(key)) if key.isdigit() and len(key) < 19 else qs.filter(api_key__prefix=key)
        model = params.get("model")
        if model:
            qs = qs.filter(requested_model=model)
        status = params.get("status")
        if status:
            if status.isdigit() and len(status) == 3:
                qs = qs.filter(http_status=int(status))
            elif len(status) == 3 and status[0] in "12345" and status[1:] == "xx":
                base = int(status[0]) * 100
                qs = qs.filter(http_status__gte=base, http_status__lt=base + 100)
            elif status in STATUSES:
                qs = qs.filter(status=status)
            else:
                raise exceptions.ValidationError(
                    {"status": [f"An HTTP status (429), a class (4xx) or one of {', '.join(STATUSES)}."]}
                )
        cache = params.get("cache")
        if cache:
            if cache not in ("hit", "miss"):
                raise exceptions.ValidationError({"cache": ["hit or miss."]})
            qs = qs.filter(cache_hit=cache == "hit")
        return qs


def _moment(name: str, raw: str) -> datetime:
    moment = parse_datetime(raw)
    if moment is None:
        raise exceptions.ValidationError({name: ["An ISO 8601 date-time, e.g. 2026-11-01T00:00:00Z."]})
    if timezone.is_naive(moment):
        moment = moment.replace(tzinfo=ZoneInfo("UTC"))
    return moment


class RequestDetailView(RequestLogBase):
    """``GET /api/requests/{request_id}``: the row with its stage timings, upstream attempts and route
    decision; 404 outside your scope."""

    def get(self, request: Request, request_id: str) -> Response:
        record = self.scoped().filter(request_id=request_id).first()
        if record is None:
            raise exceptions.NotFound("No such request.")
        return Response(row_dict(record, detail=True))

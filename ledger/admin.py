"""Admin for the usage ledger and its rollups: read-only (rows are written by the usage writer).

The ledger's list filters by tenant and downloads as CSV (the "Download CSV" link: every row the
current filters and search select; or the action: the rows ticked), streamed, with exact integer
micro-USD amounts.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from datetime import UTC
from decimal import Decimal
from typing import Any, TypeVar

from django.contrib import admin
from django.db.models import Model, QuerySet
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.urls import URLPattern, path
from django.utils import timezone

from ledger.models import DailyUsage, Feedback, HourlyUsage, ProbeRecord, UsageRecord
from tenants.admin import ReadOnlyAdmin, usd
from tenants.models import ApiKey, Tenant

_M = TypeVar("_M", bound=Model)

CSV_FIELDS = [
    "id",
    "request_id",
    "created_at",
    "tenant_id",
    "api_key_id",
    "endpoint",
    "requested_model",
    "served_model",
    "provider",
    "prompt_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_micro",
    "usage_source",
    "latency_ms",
    "ttft_ms",
    "status",
    "http_status",
    "stream",
    "cache_hit",
]
# The CSV's columns: the ledger's, with the tenant's slug, the key's prefix and the cost in USD added.
CSV_HEADER = [
    *CSV_FIELDS[:4],
    "tenant",
    *CSV_FIELDS[4:5],
    "api_key_prefix",
    *CSV_FIELDS[5:15],
    "cost_usd",
    *CSV_FIELDS[15:],
]
_MICRO = Decimal(1_000_000)


class _Echo:
    """A file-like object whose ``write`` hands back the line (``csv.writer`` into a stream)."""

    def write(self, value: str) -> str:
        return value


def usage_csv(rows: QuerySet[UsageRecord]) -> Iterator[str]:
    """The rows as CSV lines: UTC ISO times, tenant slugs and key prefixes, ``cost_micro`` as the
    exact integer and ``cost_usd`` as its exact decimal (6 places), never through a float."""
    writer = csv.writer(_Echo())
    slugs = dict(Tenant.objects.values_list("id", "slug"))
    prefixes = dict(ApiKey.objects.values_list("id", "prefix"))
    yield writer.writerow(CSV_HEADER)
    for values in rows.order_by("created_at", "id").values_list(*CSV_FIELDS).iterator(chunk_size=2000):
        row = dict(zip(CSV_FIELDS, values, strict=True))
        key_id = row["api_key_id"]
        out = [row["id"], row["request_id"], row["created_at"].astimezone(UTC).isoformat(), row["tenant_id"]]
        out += [slugs.get(row["tenant_id"], ""), key_id, prefixes.get(key_id, "") if key_id is not None else ""]
        out += [row[f] for f in CSV_FIELDS[5:15]]
        out.append(f"{Decimal(row['cost_micro']) / _MICRO:.6f}")
        out += [row[f] for f in CSV_FIELDS[15:]]
        yield writer.writerow(out)


def csv_response(rows: QuerySet[UsageRecord]) -> StreamingHttpResponse:
    name = f"chittycan-usage-{timezone.now():%Y%m%d-%H%M%S}.csv"
    return StreamingHttpResponse(
        usage_csv(rows),
        content_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


class TenantFilter(admin.SimpleListFilter):
    """One tenant's own rows (its subtree's tenants are listed too, each by its slug)."""

    title = "tenant"
    parameter_name = "tenant"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(str(pk), slug) for pk, slug in Tenant.objects.order_by("slug").values_list("id", "slug")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value:
            return queryset
        if not value.isdigit():
            return queryset.none()
        return queryset.filter(tenant_id=int(value))


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin[UsageRecord]):
    list_display = [
        "request_id",
        "created_at",
        "tenant_slug",
        "key_prefix",
        "endpoint",
        "requested_model",
        "served_model",
        "provider",
        "total_tokens",
        "cost",
        "latency_ms",
        "status",
        "stream",
        "cache_hit",
    ]
    list_filter = [
        TenantFilter,
        "status",
        "endpoint",
        "stream",
        "cache_hit",
        "coalesced",
        "usage_source",
        "provider",
        "served_model",
        "experiment",
    ]
    date_hierarchy = "created_at"
    search_fields = ["request_id", "requested_model", "served_model", "end_user", "experiment"]
    show_full_result_count = False  # counting a big ledger is slow; the pager still works
    actions = ["download_csv"]

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view(self.csv_view)
        return [path("csv/", view, name="ledger_usagerecord_csv"), *super().get_urls()]

    def csv_view(self, request: HttpRequest) -> HttpResponseBase:
        """Every row the changelist's current filters, date drill-down and search select, as CSV."""
        if not self.has_view_permission(request):
            return HttpResponse("Forbidden", status=403, content_type="text/plain")
        changelist = self.get_changelist_instance(request)
        return csv_response(changelist.get_queryset(request))

    @admin.action(description="Download selected rows as CSV", permissions=["view"])
    def download_csv(self, request: HttpRequest, queryset: QuerySet[UsageRecord]) -> StreamingHttpResponse:
        return csv_response(queryset)

    def get_queryset(self, request: HttpRequest) -> QuerySet[UsageRecord]:
        # Tenants are never deleted (only deactivated), so joining them loses no ledger rows.
        return super().get_queryset(request).select_related("tenant", "api_key")

    @admin.display(description="tenant", ordering="tenant__slug")
    def tenant_slug(self, obj: UsageRecord) -> str:
        tenant = getattr(obj, "tenant", None) if obj.tenant_id else None
        return tenant.slug if tenant is not None else f"#{obj.tenant_id}"

    @admin.display(description="key")
    def key_prefix(self, obj: UsageRecord) -> str:
        return obj.api_key.prefix if obj.api_key_id and obj.api_key else "-"

    @admin.display(description="tokens")
    def total_tokens(self, obj: UsageRecord) -> int:
        return obj.prompt_tokens + obj.completion_tokens

    @admin.display(description="cost (USD)", ordering="cost_micro")
    def cost(self, obj: UsageRecord) -> str:
        return f"{usd(obj.cost_micro)} ({obj.cost_micro} µ$)"


class UsageTotalsAdmin(ReadOnlyAdmin[_M]):
    list_display_links = None
    list_filter = ["provider"]
    search_fields = ["model"]

    @admin.display(description="cost (USD)", ordering="cost_micro")
    def cost(self, obj: Any) -> str:
        return usd(obj.cost_micro)


@admin.register(HourlyUsage)
class HourlyUsageAdmin(UsageTotalsAdmin[HourlyUsage]):
    list_display = ["hour", "tenant_id", "api_key_id", "model", "provider", "calls", "errors", "cost"]
    date_hierarchy = "hour"


@admin.register(DailyUsage)
class DailyUsageAdmin(UsageTotalsAdmin[DailyUsage]):
    list_display = ["date", "tenant_id", "api_key_id", "model", "provider", "calls", "errors", "cost"]
    date_hierarchy = "date"


@admin.register(Feedback)
class FeedbackAdmin(ReadOnlyAdmin[Feedback]):
    """Outcomes clients reported with ``POST /v1/feedback`` (routing experiments read them)."""

    list_display = ["request_id", "created_at", "tenant_id", "score", "label"]
    list_filter = [TenantFilter, "label"]
    search_fields = ["request_id", "label"]
    date_hierarchy = "created_at"


@admin.register(ProbeRecord)
class ProbeRecordAdmin(ReadOnlyAdmin[ProbeRecord]):
    """Active health probes sent to providers, and what each cost the operator (no tenant's usage)."""

    list_display = ["created_at", "provider", "model", "upstream_model", "trigger", "result", "latency_ms", "cost"]
    list_filter = ["provider", "result", "trigger"]
    search_fields = ["provider", "model", "upstream_model", "error"]
    date_hierarchy = "created_at"

    @admin.display(description="cost (USD)", ordering="cost_micro")
    def cost(self, obj: ProbeRecord) -> str:
        return usd(obj.cost_micro)

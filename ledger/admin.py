"""Admin for the usage ledger and its rollups: read-only (rows are written by the usage writer)."""

from __future__ import annotations

from typing import Any, TypeVar

from django.contrib import admin
from django.db.models import Model, QuerySet
from django.http import HttpRequest

from ledger.models import DailyUsage, HourlyUsage, UsageRecord
from tenants.admin import ReadOnlyAdmin, usd

_M = TypeVar("_M", bound=Model)


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
    list_filter = ["status", "endpoint", "stream", "cache_hit", "usage_source", "provider", "served_model"]
    date_hierarchy = "created_at"
    search_fields = ["request_id", "requested_model", "served_model", "end_user"]
    show_full_result_count = False  # counting a big ledger is slow; the pager still works

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

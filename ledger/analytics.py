"""Read-only questions about spend and usage (selectors). Synchronous; call off the event loop.

Spend always comes from the ledger: raw ``UsageRecord`` rows, plus the hourly rollups of sealed
hours (whose raw rows were pruned past retention), so totals stay exact after pruning.
Calendar periods (day, month) are taken in the tenant's time zone.

Two things the ledger reports on belong to apps above it, which register them when they start:
the prices of the models the gateway serves (``use_price_history``, from ``gateway.apps``), which
price what cache hits saved, and a tenant's monthly budget (``use_monthly_budget``, from
``budgets.apps``), which the month report compares spend with. A budget's own spend from the
ledger is ``budgets.spend.budget_spend``.
"""

from __future__ import annotations

import calendar
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.db import connection
from django.db.models import Count, F, Q, QuerySet, Sum, Value
from django.db.models.functions import Coalesce, NullIf, TruncDate
from django.utils import timezone

from core import money
from core.money import PriceInfo, Usage
from ledger.models import HourlyUsage, RollupHour, UsageRecord
from tenants.models import Tenant

#: The prices of a public model name (or alias), newest first; empty if the name is unknown.
PriceHistory = Callable[[str], Sequence[PriceInfo]]


def _no_prices(name: str) -> Sequence[PriceInfo]:
    return ()


_price_history: PriceHistory = _no_prices


def use_price_history(history: PriceHistory) -> None:
    """Register where ``metrics`` finds prices when its caller passes none."""
    global _price_history
    _price_history = history


#: A tenant's monthly budget in integer micro-USD, or None if it has none.
MonthlyBudget = Callable[[Tenant], int | None]


def _no_budget(tenant: Tenant) -> int | None:
    return None


_monthly_budget: MonthlyBudget = _no_budget


def use_monthly_budget(lookup: MonthlyBudget) -> None:
    """Register where ``month_report`` finds a tenant's monthly budget."""
    global _monthly_budget
    _monthly_budget = lookup


#: Calendar periods (the periods of budgets, too): a day or a month in the tenant's time zone, or
#: all time.
DAY, MONTH, TOTAL = "day", "month", "total"


# --- scopes and periods -------------------------------------------------------------------------


def subtree_ids(tenant_id: int) -> list[int]:
    """A tenant and all its descendants."""
    ids = [tenant_id]
    seen = {tenant_id}
    frontier = [tenant_id]
    while frontier:
        frontier = [
            pk for pk in Tenant.objects.filter(parent_id__in=frontier).values_list("pk", flat=True) if pk not in seen
        ]
        seen.update(frontier)
        ids.extend(frontier)
    return ids


def month_bounds(year: int, month: int, time_zone: str) -> tuple[datetime, datetime]:
    zone = ZoneInfo(time_zone)
    start = datetime(year, month, 1, tzinfo=zone)
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=zone)
    return start.astimezone(UTC), end.astimezone(UTC)


def period_key(period: str, time_zone: str, when: datetime) -> str:
    """``2026-11-22`` (day), ``2026-11`` (month) or ``total``: the period ``when`` falls in, locally."""
    if period == TOTAL:
        return "total"
    local = when.astimezone(ZoneInfo(time_zone))
    return f"{local:%Y-%m-%d}" if period == DAY else f"{local:%Y-%m}"


def period_bounds(period: str, time_zone: str, when: datetime) -> tuple[datetime | None, datetime | None]:
    """UTC start (inclusive) and end (exclusive) of the calendar period ``when`` falls in."""
    if period == TOTAL:
        return None, None
    zone = ZoneInfo(time_zone)
    local = when.astimezone(zone)
    if period == DAY:
        start = datetime(local.year, local.month, local.day, tzinfo=zone)
        nxt = local.date() + timedelta(days=1)
        end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone)
        return start.astimezone(UTC), end.astimezone(UTC)
    return month_bounds(local.year, local.month, time_zone)


# --- spend --------------------------------------------------------------------------------------


def _raw(tenant_ids: list[int] | None, api_key_id: int | None) -> QuerySet[UsageRecord]:
    rows = UsageRecord.objects.all()
    if tenant_ids is not None:
        rows = rows.filter(tenant_id__in=tenant_ids)
    if api_key_id is not None:
        rows = rows.filter(api_key_id=api_key_id)
    return rows


def sealed_rollups(
    tenant_ids: list[int] | None, api_key_id: int | None, start: datetime | None, end: datetime | None
) -> QuerySet[HourlyUsage]:
    rows = HourlyUsage.objects.filter(hour__in=RollupHour.objects.filter(sealed=True).values("hour"))
    if tenant_ids is not None:
        rows = rows.filter(tenant_id__in=tenant_ids)
    if api_key_id is not None:
        rows = rows.filter(api_key_id=api_key_id)
    if start is not None:
        rows = rows.filter(hour__gte=start)
    if end is not None:
        rows = rows.filter(hour__lt=end)
    return rows


def spend_micro(
    *,
    tenant_ids: list[int] | None = None,
    api_key_id: int | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> int:
    """Integer micro-USD spent by the scope in [start, end)."""
    raw = _raw(tenant_ids, api_key_id)
    if start is not None:
        raw = raw.filter(created_at__gte=start)
    if end is not None:
        raw = raw.filter(created_at__lt=end)
    total = raw.aggregate(s=Sum("cost_micro"))["s"] or 0
    sealed = sealed_rollups(tenant_ids, api_key_id, start, end).aggregate(s=Sum("cost_micro"))["s"] or 0
    return int(total) + int(sealed)


# --- per day, grouped ---------------------------------------------------------------------------


def daily_costs(tenant: Tenant, start: datetime, end: datetime) -> dict[date, tuple[int, int]]:
    """{local date: (calls, cost_micro)} for the tenant's subtree in [start, end)."""
    zone = ZoneInfo(tenant.time_zone)
    ids = subtree_ids(tenant.pk)
    out: dict[date, tuple[int, int]] = {}
    raw = (
        _raw(ids, None)
        .filter(created_at__gte=start, created_at__lt=end)
        .annotate(day=TruncDate("created_at", tzinfo=zone))
        .values("day")
        .annotate(calls=Count("id"), cost=Coalesce(Sum("cost_micro"), Value(0)))
        .order_by()
    )
    sealed = (
        sealed_rollups(ids, None, start, end)
        .annotate(day=TruncDate("hour", tzinfo=zone))
        .values("day")
        .annotate(calls=Coalesce(Sum("calls"), Value(0)), cost=Coalesce(Sum("cost_micro"), Value(0)))
        .order_by()
    )
    for row in [*raw, *sealed]:
        calls, cost = out.get(row["day"], (0, 0))
        out[row["day"]] = (calls + int(row["calls"]), cost + int(row["cost"]))
    return out


GROUPS = {
    "model": "model_name",
    "key": "api_key_id",
    "provider": "provider",
    "tenant": "tenant_id",
}


def usage_breakdown(
    *, tenant_ids: list[int] | None, start: datetime | None, end: datetime | None, group_by: str
) -> list[dict[str, Any]]:
    """Calls, tokens and cost per model, key, provider or tenant in [start, end), from raw rows and
    sealed rollups alike. Sorted by cost, largest first."""
    if group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPS)}")
    raw = _raw(tenant_ids, None)
    if start is not None:
        raw = raw.filter(created_at__gte=start)
    if end is not None:
        raw = raw.filter(created_at__lt=end)
    column = GROUPS[group_by]
    raw_rows = (
        raw.annotate(model_name=Coalesce(NullIf(F("served_model"), Value("")), F("requested_model")))
        .values(column)
        .annotate(
            calls=Count("id"),
            errors=Count("id", filter=~Q(status=UsageRecord.Status.OK)),
            prompt_tokens=Coalesce(Sum("prompt_tokens"), Value(0)),
            completion_tokens=Coalesce(Sum("completion_tokens"), Value(0)),
            cost_micro=Coalesce(Sum("cost_micro"), Value(0)),
            cache_hits=Count("id", filter=Q(cache_hit=True)),
            saved_micro=Coalesce(Sum("saved_micro"), Value(0)),
        )
        .order_by()
    )
    sealed_column = "model" if column == "model_name" else column
    sealed_rows = (
        sealed_rollups(tenant_ids, None, start, end)
        .values(sealed_column)
        .annotate(
            calls=Coalesce(Sum("calls"), Value(0)),
            errors=Coalesce(Sum("errors"), Value(0)),
            prompt_tokens=Coalesce(Sum("prompt_tokens"), Value(0)),
            completion_tokens=Coalesce(Sum("completion_tokens"), Value(0)),
            cost_micro=Coalesce(Sum("cost_micro"), Value(0)),
            cache_hits=Coalesce(Sum("cache_hits"), Value(0)),
            saved_micro=Coalesce(Sum("saved_micro"), Value(0)),
        )
        .order_by()
    )
    merged: dict[Any, dict[str, Any]] = {}
    numbers = ("calls", "errors", "prompt_tokens", "completion_tokens", "cost_micro", "cache_hits", "saved_micro")
    for row, col in [*((r, column) for r in raw_rows), *((r, sealed_column) for r in sealed_rows)]:
        entry = merged.setdefault(row[col], {group_by: row[col], **dict.fromkeys(numbers, 0)})
        for n in numbers:
            entry[n] += int(row[n])
    for entry in merged.values():
        entry["cache_hit_rate"] = hit_rate(entry["cache_hits"], entry["calls"])
    return sorted(merged.values(), key=lambda e: (-e["cost_micro"], str(e[group_by])))


def hit_rate(hits: int, calls: int) -> float:
    """Cache hits as a share of calls, in percent with two decimals (0 without calls)."""
    return round(hits * 100 / calls, 2) if calls else 0.0


@dataclass(frozen=True)
class CacheSavings:
    calls: int
    cache_hits: int
    coalesced: int  # hits answered by an identical in-flight request (raw rows only: rollups keep no split)
    saved_micro: int  # what the hits would have cost at the prices of the day they were served

    @property
    def hit_rate(self) -> float:
        return hit_rate(self.cache_hits, self.calls)


def cache_savings(tenant_ids: list[int] | None, start: datetime | None, end: datetime | None) -> CacheSavings:
    """The response cache's effect in [start, end), from raw rows and sealed rollups alike."""
    raw = _raw(tenant_ids, None)
    if start is not None:
        raw = raw.filter(created_at__gte=start)
    if end is not None:
        raw = raw.filter(created_at__lt=end)
    got = raw.aggregate(
        calls=Count("id"),
        hits=Count("id", filter=Q(cache_hit=True)),
        coalesced=Count("id", filter=Q(coalesced=True)),
        saved=Coalesce(Sum("saved_micro"), Value(0)),
    )
    sealed = sealed_rollups(tenant_ids, None, start, end).aggregate(
        calls=Coalesce(Sum("calls"), Value(0)),
        hits=Coalesce(Sum("cache_hits"), Value(0)),
        saved=Coalesce(Sum("saved_micro"), Value(0)),
    )
    return CacheSavings(
        calls=int(got["calls"]) + int(sealed["calls"]),
        cache_hits=int(got["hits"]) + int(sealed["hits"]),
        coalesced=int(got["coalesced"]),
        saved_micro=int(got["saved"]) + int(sealed["saved"]),
    )


# --- metrics -------------------------------------------------------------------------------------


def _percentiles(rows: QuerySet[UsageRecord], points: tuple[float, ...]) -> list[int | None]:
    """Latency percentiles (ms), nearest-rank, computed by the database where it can."""
    if connection.vendor == "postgresql":
        sql, params = rows.values("latency_ms").query.sql_with_params()
        fractions = ", ".join(f"percentile_disc({p}) WITHIN GROUP (ORDER BY latency_ms)" for p in points)
        with connection.cursor() as cur:
            cur.execute(f"SELECT {fractions} FROM ({sql}) AS latencies", params)
            result = cur.fetchone()
        return [None if v is None else int(v) for v in result] if result else [None] * len(points)
    values = sorted(rows.values_list("latency_ms", flat=True))
    if not values:
        return [None] * len(points)
    return [values[max(0, min(len(values) - 1, -(-int(p * 1000) * len(values) // 1000) - 1))] for p in points]


def _price_savings(rows: QuerySet[UsageRecord], history: PriceHistory) -> int:
    """What cache hits would have cost at the prices in force when they were served."""
    total = 0
    prices: dict[str, Sequence[PriceInfo]] = {}
    for row in rows.filter(cache_hit=True).only(
        "requested_model", "created_at", "prompt_tokens", "cached_tokens", "cache_write_tokens", "completion_tokens"
    ):
        if row.requested_model not in prices:
            prices[row.requested_model] = history(row.requested_model)
        price = next((p for p in prices[row.requested_model] if p.effective_from <= row.created_at), None)
        if price is None:
            continue
        usage = Usage(
            prompt_tokens=row.prompt_tokens,
            cached_tokens=row.cached_tokens,
            cache_write_tokens=row.cache_write_tokens,
            completion_tokens=row.completion_tokens,
        )
        total += money.cost_micro(price, usage)
    return total


@dataclass(frozen=True)
class Metrics:
    requests: int
    errors: int
    cost_micro: int
    cached_requests: int
    cached_cost_micro: int
    uncached_requests: int
    uncached_cost_micro: int
    latency_p50_ms: int | None
    latency_p95_ms: int | None
    latency_p99_ms: int | None
    models: list[tuple[str, int, int]]  # (model, requests, cost_micro), most requests first
    savings_micro: int

    @property
    def cache_hit_rate(self) -> Decimal:
        if not self.requests:
            return Decimal(0)
        return (Decimal(self.cached_requests) * 100 / self.requests).quantize(Decimal("0.01"))

    @staticmethod
    def per_request(cost: int, requests: int) -> int | None:
        """Integer micro-USD per request, rounded half up; None without requests."""
        if not requests:
            return None
        return (2 * cost + requests) // (2 * requests)


def metrics(
    *,
    tenant_ids: list[int] | None,
    since: datetime,
    until: datetime | None = None,
    prices: PriceHistory | None = None,
) -> Metrics:
    """Requests, cost, latency and cache savings in [since, until); cache hits are priced by
    ``prices`` (default: the registered ``PriceHistory``)."""
    rows = _raw(tenant_ids, None).filter(created_at__gte=since)
    if until is not None:
        rows = rows.filter(created_at__lt=until)
    totals = rows.aggregate(
        n=Count("id"),
        err=Count("id", filter=~Q(status=UsageRecord.Status.OK)),
        cost=Coalesce(Sum("cost_micro"), Value(0)),
        hits=Count("id", filter=Q(cache_hit=True)),
        hit_cost=Coalesce(Sum("cost_micro", filter=Q(cache_hit=True)), Value(0)),
    )
    p50, p95, p99 = _percentiles(rows, (0.5, 0.95, 0.99))
    models = [
        (str(r["m"]), int(r["n"]), int(r["c"]))
        for r in rows.annotate(m=Coalesce(NullIf(F("served_model"), Value("")), F("requested_model")))
        .values("m")
        .annotate(n=Count("id"), c=Coalesce(Sum("cost_micro"), Value(0)))
        .order_by("-n", "m")
    ]
    savings = _price_savings(rows, prices or _price_history) - int(totals["hit_cost"])
    return Metrics(
        requests=int(totals["n"]),
        errors=int(totals["err"]),
        cost_micro=int(totals["cost"]),
        cached_requests=int(totals["hits"]),
        cached_cost_micro=int(totals["hit_cost"]),
        uncached_requests=int(totals["n"]) - int(totals["hits"]),
        uncached_cost_micro=int(totals["cost"]) - int(totals["hit_cost"]),
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        latency_p99_ms=p99,
        models=models,
        savings_micro=max(0, savings),
    )


# --- the month report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MonthReport:
    tenant: Tenant
    year: int
    month: int
    days: list[tuple[date, int, int]]  # (local date, calls, cost_micro) for every day of the month
    total_micro: int
    budget_micro: int | None  # the tenant's monthly budget, if any
    elapsed_days: int  # days of the month that have begun (all of them for a past month)
    days_in_month: int

    @property
    def budget_per_day_micro(self) -> int | None:
        return None if self.budget_micro is None else self.budget_micro // self.days_in_month

    @property
    def remaining_micro(self) -> int | None:
        return None if self.budget_micro is None else self.budget_micro - self.total_micro

    @property
    def used_percent(self) -> Decimal | None:
        if self.budget_micro is None:
            return None
        if self.budget_micro == 0:
            return Decimal(100) if self.total_micro else Decimal(0)
        return (Decimal(self.total_micro) * 100 / self.budget_micro).quantize(Decimal("0.01"))

    @property
    def projected_micro(self) -> int:
        """Spend so far extrapolated linearly over the whole month (integer, rounded half up)."""
        if self.elapsed_days <= 0:
            return 0
        num = self.total_micro * self.days_in_month
        return (2 * num + self.elapsed_days) // (2 * self.elapsed_days)

    @property
    def verdict(self) -> str | None:
        if self.budget_micro is None:
            return None
        return "OK" if self.projected_micro <= self.budget_micro else "OVER"


def month_report(tenant: Tenant, year: int, month: int, now: datetime | None = None) -> MonthReport:
    now = now or timezone.now()
    start, end = month_bounds(year, month, tenant.time_zone)
    per_day = daily_costs(tenant, start, end)
    days_in_month = calendar.monthrange(year, month)[1]
    days = []
    for d in range(1, days_in_month + 1):
        day = date(year, month, d)
        calls, cost = per_day.get(day, (0, 0))
        days.append((day, calls, cost))
    local_now = now.astimezone(ZoneInfo(tenant.time_zone))
    if end <= now:
        elapsed = days_in_month
    elif start > now:
        elapsed = 0
    else:
        elapsed = local_now.day
    return MonthReport(
        tenant=tenant,
        year=year,
        month=month,
        days=days,
        total_micro=sum(c for _, _, c in days),
        budget_micro=_monthly_budget(tenant),
        elapsed_days=elapsed,
        days_in_month=days_in_month,
    )

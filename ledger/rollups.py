"""Hourly and daily usage rollups, recomputed from the ledger.

- ``HourlyUsage`` (per UTC hour, tenant, key, model, provider) is recomputed from the raw ledger
  rows of the hour: re-running changes nothing. The job finds the hours to recompute by the
  rows' ``recorded_at`` (when they reached the ledger), so late rows (a spool replayed after an
  outage) land in the right, older bucket.
- ``DailyUsage`` (per calendar day in the tenant's time zone) is recomputed from the hourly rows,
  never from raw rows, so pruning cannot change it. Hours are assigned to the local day they
  start in (exact for every whole-hour UTC offset).
- An hour whose raw rows were pruned (``ledger.retention``) is *sealed*: its rollup is the record.
  A row that still arrives for a sealed hour is added to the hour's rollup and deleted in one
  transaction (``absorb_late_rows``), so it is counted once; a row under a hold
  (``ledger.holds``: e.g. not yet exported to Stripe) stays raw until the hold lets go.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.db import connection, transaction
from django.db.models import Count, F, Max, Q, QuerySet, Sum, Value
from django.db.models.functions import Coalesce, NullIf, TruncHour
from django.utils import timezone

from ledger.holds import unheld
from ledger.models import DailyUsage, HourlyUsage, RollupCursor, RollupHour, UsageRecord
from tenants.models import Tenant

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
#: Rows are looked for again this far behind the cursor: a batch insert that started before the
#: last run but committed after it is still found. Recomputing a bucket twice changes nothing.
OVERLAP = timedelta(minutes=10)
CURSOR = "usage-rollup"

SUM_FIELDS = (
    "calls",
    "errors",
    "cache_hits",
    "saved_micro",
    "stream_calls",
    "prompt_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_micro",
    "latency_ms_sum",
    "ttft_ms_sum",
    "ttft_count",
)
KEY_FIELDS = ("tenant_id", "api_key_id", "model", "provider")


def _raw_aggregates() -> dict[str, Any]:
    zero = Value(0)
    return {
        "calls": Count("id"),
        "errors": Count("id", filter=~Q(status=UsageRecord.Status.OK)),
        "cache_hits": Count("id", filter=Q(cache_hit=True)),
        "saved_micro": Coalesce(Sum("saved_micro"), zero),
        "stream_calls": Count("id", filter=Q(stream=True)),
        "prompt_tokens": Coalesce(Sum("prompt_tokens"), zero),
        "cached_tokens": Coalesce(Sum("cached_tokens"), zero),
        "cache_write_tokens": Coalesce(Sum("cache_write_tokens"), zero),
        "completion_tokens": Coalesce(Sum("completion_tokens"), zero),
        "reasoning_tokens": Coalesce(Sum("reasoning_tokens"), zero),
        "cost_micro": Coalesce(Sum("cost_micro"), zero),
        "latency_ms_sum": Coalesce(Sum("latency_ms"), zero),
        "ttft_ms_sum": Coalesce(Sum("ttft_ms"), zero),
        "ttft_count": Count("ttft_ms"),
    }


def _grouped_raw(rows: QuerySet[UsageRecord]) -> list[dict[str, Any]]:
    return list(
        rows.annotate(model_name=Coalesce(NullIf(F("served_model"), Value("")), F("requested_model")))
        .values("tenant_id", "api_key_id", "model_name", "provider")
        .annotate(**_raw_aggregates())
        .order_by()
    )


def hour_rows(hour: datetime) -> QuerySet[UsageRecord]:
    return UsageRecord.objects.filter(created_at__gte=hour, created_at__lt=hour + HOUR)


def lock_ledger() -> None:
    """Hold back inserts into the ledger until the transaction ends (PostgreSQL; SQLite writes
    are serialised anyway)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cur:
            cur.execute(f'LOCK TABLE "{UsageRecord._meta.db_table}" IN SHARE MODE')


def _hourly_objects(hour: datetime, groups: Iterable[dict[str, Any]]) -> list[HourlyUsage]:
    return [
        HourlyUsage(
            hour=hour,
            tenant_id=g["tenant_id"],
            api_key_id=g["api_key_id"],
            model=g["model_name"][:200],
            provider=g["provider"],
            **{f: int(g[f]) for f in SUM_FIELDS},
        )
        for g in groups
    ]


def _tenants_of(groups: Iterable[dict[str, Any]]) -> set[int]:
    return {int(g["tenant_id"]) for g in groups}


@transaction.atomic
def recompute_hour(hour: datetime) -> set[int]:
    """Bring one hour's rollup up to date. Returns the tenants whose numbers may have changed."""
    state, _ = RollupHour.objects.select_for_update().get_or_create(hour=hour)
    touched = set(HourlyUsage.objects.filter(hour=hour).values_list("tenant_id", flat=True))
    if state.sealed:
        return absorb_late_rows(hour)
    groups = _grouped_raw(hour_rows(hour))
    HourlyUsage.objects.filter(hour=hour).delete()
    HourlyUsage.objects.bulk_create(_hourly_objects(hour, groups))
    state.computed_at = timezone.now()
    state.save(update_fields=["computed_at"])
    return touched | _tenants_of(groups)


def absorb_late_rows(hour: datetime) -> set[int]:
    """Add the raw rows of a sealed hour to its rollup and delete them (same transaction). Rows
    under a hold (``ledger.holds``) stay raw: analytics counts raw rows and sealed rollups alike."""
    lock_ledger()
    rows = unheld(hour_rows(hour))
    groups = _grouped_raw(rows)
    if not groups:
        return set()
    for obj in _hourly_objects(hour, groups):
        existing = HourlyUsage.objects.filter(
            hour=hour, tenant_id=obj.tenant_id, api_key_id=obj.api_key_id, model=obj.model, provider=obj.provider
        ).first()
        if existing is None:
            obj.save()
        else:
            for f in SUM_FIELDS:
                setattr(existing, f, getattr(existing, f) + getattr(obj, f))
            existing.save()
    deleted, _ = rows.delete()
    log.info("added %d late usage rows to the sealed hour %s", deleted, hour.isoformat())
    return _tenants_of(groups)


def local_day_bounds(day: date, time_zone: str) -> tuple[datetime, datetime]:
    zone = ZoneInfo(time_zone)
    start = datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)
    nxt = day + timedelta(days=1)
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone).astimezone(UTC)
    return start, end


@transaction.atomic
def recompute_day(tenant_id: int, day: date, time_zone: str) -> None:
    """Rebuild one tenant's daily rollup for one local day from the hourly rollups."""
    start, end = local_day_bounds(day, time_zone)
    sums = {f: Coalesce(Sum(f), Value(0)) for f in SUM_FIELDS}
    groups = (
        HourlyUsage.objects.filter(tenant_id=tenant_id, hour__gte=start, hour__lt=end)
        .values("api_key_id", "model", "provider")
        .annotate(**sums)
        .order_by()
    )
    DailyUsage.objects.filter(tenant_id=tenant_id, date=day).delete()
    DailyUsage.objects.bulk_create(
        DailyUsage(
            date=day,
            tenant_id=tenant_id,
            api_key_id=g["api_key_id"],
            model=g["model"],
            provider=g["provider"],
            **{f: int(g[f]) for f in SUM_FIELDS},
        )
        for g in groups
    )


def _tenant_zones(tenant_ids: Iterable[int]) -> dict[int, str]:
    zones = dict(Tenant.objects.filter(pk__in=list(tenant_ids)).values_list("pk", "time_zone"))
    return {int(k): str(v) for k, v in zones.items()}


def _days_of(hour: datetime, time_zone: str) -> set[date]:
    zone = ZoneInfo(time_zone)
    return {hour.astimezone(zone).date()}


def refresh_days(pairs: Iterable[tuple[int, datetime]]) -> int:
    pairs = list(pairs)
    zones = _tenant_zones({t for t, _ in pairs})
    days: set[tuple[int, date, str]] = set()
    for tenant_id, hour in pairs:
        zone = zones.get(tenant_id, "UTC")
        for day in _days_of(hour, zone):
            days.add((tenant_id, day, zone))
    for tenant_id, day, zone in sorted(days):
        recompute_day(tenant_id, day, zone)
    return len(days)


@dataclass
class RollupResult:
    hours: list[datetime] = field(default_factory=list)
    days: int = 0
    cursor: datetime | None = None


def rollup_usage() -> RollupResult:
    """Recompute every hour (and the tenants' days) that received ledger rows since the last run.

    The cursor is the newest ``recorded_at`` seen (the database's clock, so application clock
    skew does not matter); the next run looks ``OVERLAP`` behind it.
    """
    cursor = RollupCursor.objects.filter(name=CURSOR).first()
    rows = UsageRecord.objects.all()
    if cursor is not None:
        rows = rows.filter(recorded_at__gte=cursor.position - OVERLAP)
    newest = rows.aggregate(m=Max("recorded_at"))["m"]
    if newest is None:
        return RollupResult(cursor=cursor.position if cursor else None)
    rows = rows.filter(recorded_at__lte=newest)
    hours = sorted(
        set(rows.annotate(h=TruncHour("created_at", tzinfo=UTC)).values_list("h", flat=True).distinct().order_by())
    )
    pairs: list[tuple[int, datetime]] = []
    for hour in hours:
        for tenant_id in recompute_hour(hour):
            pairs.append((tenant_id, hour))
    days = refresh_days(pairs)
    RollupCursor.objects.update_or_create(name=CURSOR, defaults={"position": newest})
    return RollupResult(hours=hours, days=days, cursor=newest)


def rebuild(start: datetime, end: datetime) -> RollupResult:
    """Recompute every hour in [start, end) from scratch (an operator's repair tool)."""
    hour = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    result = RollupResult()
    pairs: list[tuple[int, datetime]] = []
    while hour < end:
        for tenant_id in recompute_hour(hour):
            pairs.append((tenant_id, hour))
        result.hours.append(hour)
        hour += HOUR
    result.days = refresh_days(pairs)
    return result

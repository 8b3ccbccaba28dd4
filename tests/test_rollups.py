"""Hourly and daily rollups are recomputed idempotently from the ledger; pruning raw rows past
retention changes neither the rollups nor the spend computed from the ledger."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db import IntegrityError, transaction

from billing_export.services import export_run_create
from ledger import analytics, retention, rollups, tasks, writer
from ledger.models import DailyUsage, HourlyUsage, RollupHour, UsageRecord

NOW = datetime(2026, 11, 22, 12, 30, tzinfo=UTC)


def _row(tenant, when, *, cost=100, model="gpt-4o", key=None, status="ok", cache_hit=False, ttft=None, latency=50):
    return {
        "request_id": f"req_{uuid.uuid4().hex}",
        "created_at": when.timestamp(),
        "tenant_id": tenant.pk,
        "api_key_id": key,
        "endpoint": "chat",
        "requested_model": model,
        "served_model": model,
        "provider": "fake-openai",
        "prompt_tokens": 10,
        "cached_tokens": 2,
        "completion_tokens": 7,
        "cost_micro": cost,
        "status": status,
        "cache_hit": cache_hit,
        "ttft_ms": ttft,
        "latency_ms": latency,
    }


def _snapshot():
    fields = ("tenant_id", "api_key_id", "model", "provider", *rollups.SUM_FIELDS)
    hourly = sorted(HourlyUsage.objects.values_list("hour", *fields))
    daily = sorted(DailyUsage.objects.values_list("date", *fields))
    return hourly, daily


def test_hourly_and_daily_rollups_are_exact_and_idempotent(make_tenant):
    ny = make_tenant("rollup-ny", time_zone="America/New_York")
    child = make_tenant("rollup-ny-team", parent=ny, kind="team", time_zone="America/New_York")
    h1 = datetime(2026, 11, 22, 3, 10, tzinfo=UTC)  # 22:10 on Nov 21 in New York
    h2 = datetime(2026, 11, 22, 5, 20, tzinfo=UTC)  # 00:20 on Nov 22 in New York
    writer.write_rows(
        [
            _row(ny, h1, cost=100, ttft=20, latency=40),
            _row(ny, h1 + timedelta(minutes=5), cost=250, status="upstream_error", latency=60),
            _row(ny, h1, cost=40, model="gpt-4o-mini", cache_hit=True),
            _row(child, h2, cost=7, ttft=30),
        ]
    )
    result = rollups.rollup_usage()
    assert result.hours == [h1.replace(minute=0), h2.replace(minute=0)]

    big = HourlyUsage.objects.get(tenant_id=ny.pk, hour=h1.replace(minute=0), model="gpt-4o")
    assert (big.calls, big.errors, big.cost_micro, big.latency_ms_sum) == (2, 1, 350, 100)
    assert (big.prompt_tokens, big.cached_tokens, big.completion_tokens) == (20, 4, 14)
    assert (big.ttft_ms_sum, big.ttft_count, big.cache_hits) == (20, 1, 0)
    mini = HourlyUsage.objects.get(tenant_id=ny.pk, model="gpt-4o-mini")
    assert (mini.calls, mini.cache_hits, mini.cost_micro) == (1, 1, 40)

    # Daily buckets follow the tenant's calendar, not UTC.
    assert DailyUsage.objects.get(tenant_id=ny.pk, date=date(2026, 11, 21), model="gpt-4o").cost_micro == 350
    assert DailyUsage.objects.get(tenant_id=child.pk, date=date(2026, 11, 22)).cost_micro == 7
    assert not DailyUsage.objects.filter(tenant_id=ny.pk, date=date(2026, 11, 22)).exists()

    before = _snapshot()
    rollups.rollup_usage()
    rollups.rebuild(h1.replace(minute=0), h2 + timedelta(hours=1))
    assert _snapshot() == before

    # A late row (spooled during an outage) for an old hour lands in that hour's bucket.
    writer.write_rows([_row(ny, h1 + timedelta(minutes=30), cost=1000)])
    rollups.rollup_usage()
    big = HourlyUsage.objects.get(tenant_id=ny.pk, hour=h1.replace(minute=0), model="gpt-4o")
    assert (big.calls, big.cost_micro) == (3, 1350)
    assert DailyUsage.objects.get(tenant_id=ny.pk, date=date(2026, 11, 21), model="gpt-4o").cost_micro == 1350
    assert sum(HourlyUsage.objects.values_list("cost_micro", flat=True)) == sum(
        UsageRecord.objects.values_list("cost_micro", flat=True)
    )


def _export_days(*moments):
    """Bill the ledger rows of these UTC days to Stripe (a CSV run): only exported rows are pruned."""
    for day in sorted({m.astimezone(UTC).date() for m in moments}):
        export_run_create(period=day.isoformat(), actor_label="test")


def test_prune_keeps_rollups_and_ledger_spend_unchanged(make_tenant):
    tenant = make_tenant("rollup-prune", stripe_customer_id="cus_rollup")
    now = datetime.now(UTC)
    old = (now - timedelta(days=settings.CHITTYCAN_USAGE_RETENTION_DAYS + 5)).replace(minute=10)
    recent = now - timedelta(days=3)
    writer.write_rows([_row(tenant, old, cost=300), _row(tenant, old + timedelta(hours=2), cost=5)])
    writer.write_rows([_row(tenant, recent, cost=11), _row(tenant, recent, cost=13)])
    _export_days(old, old + timedelta(hours=2))
    rollups.rollup_usage()
    snapshot = _snapshot()
    ids = [tenant.pk]
    total_before = analytics.spend_micro(tenant_ids=ids)
    old_window = analytics.spend_micro(tenant_ids=ids, start=old - timedelta(days=1), end=old + timedelta(days=1))
    assert (total_before, old_window) == (329, 305)

    result = retention.prune_usage(now=now)
    assert (result.rows, result.hours) == (2, 2)
    assert UsageRecord.objects.filter(tenant_id=tenant.pk).count() == 2  # the recent rows stay
    assert not UsageRecord.objects.filter(created_at__lt=result.cutoff).exists()
    assert _snapshot() == snapshot
    assert RollupHour.objects.filter(sealed=True).count() == 2
    assert analytics.spend_micro(tenant_ids=ids) == total_before
    assert (
        analytics.spend_micro(tenant_ids=ids, start=old - timedelta(days=1), end=old + timedelta(days=1)) == old_window
    )
    by_model = analytics.usage_breakdown(tenant_ids=ids, start=None, end=None, group_by="model")
    assert by_model == [
        {
            "model": "gpt-4o",
            "calls": 4,
            "errors": 0,
            "prompt_tokens": 40,
            "completion_tokens": 28,
            "cost_micro": 329,
            "cache_hits": 0,
            "saved_micro": 0,
            "cache_hit_rate": 0.0,
        }
    ]

    # Running it all again changes nothing.
    assert retention.prune_usage(now=now).rows == 0
    rollups.rollup_usage()
    assert _snapshot() == snapshot

    # A row that arrives for a sealed hour stays raw until it is exported (the export reads raw
    # rows), then is added to that hour once and pruned.
    writer.write_rows([_row(tenant, old + timedelta(minutes=1), cost=1)])
    rollups.rollup_usage()
    assert UsageRecord.objects.filter(created_at__lt=result.cutoff).count() == 1
    assert analytics.spend_micro(tenant_ids=ids) == total_before + 1
    _export_days(old)
    rollups.rollup_usage()
    rollups.rollup_usage()
    hour = HourlyUsage.objects.get(tenant_id=tenant.pk, hour=old.replace(minute=0, second=0, microsecond=0))
    assert (hour.calls, hour.cost_micro) == (2, 301)
    assert not UsageRecord.objects.filter(created_at__lt=result.cutoff).exists()
    assert analytics.spend_micro(tenant_ids=ids) == total_before + 1


def test_tasks_are_scheduled_and_run(make_tenant):
    tenant = make_tenant("rollup-task")
    writer.write_rows([_row(tenant, datetime.now(UTC) - timedelta(minutes=5), cost=42)])
    scheduled = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert {
        "gateway.tasks.rollup_usage",
        "gateway.tasks.prune_usage",
        "gateway.tasks.replay_usage_spool",
        "gateway.tasks.check_budget_alerts",
    } <= scheduled
    assert tasks.rollup_usage.apply().get()["hours"] >= 1
    assert HourlyUsage.objects.get(tenant_id=tenant.pk).cost_micro == 42
    assert tasks.prune_usage.apply().get()["rows"] == 0


def test_one_rollup_row_per_bucket_with_or_without_a_key(make_tenant):
    tenant = make_tenant("rollup-unique")
    key_id = 7  # the key is a plain id without a database constraint
    hour = datetime(2026, 11, 22, 10, tzinfo=UTC)
    for api_key_id in (None, key_id):
        HourlyUsage.objects.create(hour=hour, tenant=tenant, api_key_id=api_key_id, model="m", provider="p")
        with pytest.raises(IntegrityError), transaction.atomic():
            HourlyUsage.objects.create(hour=hour, tenant=tenant, api_key_id=api_key_id, model="m", provider="p")
        DailyUsage.objects.create(date=hour.date(), tenant=tenant, api_key_id=api_key_id, model="m", provider="p")
        with pytest.raises(IntegrityError), transaction.atomic():
            DailyUsage.objects.create(date=hour.date(), tenant=tenant, api_key_id=api_key_id, model="m", provider="p")


def test_sqlite_creates_the_rollup_unique_constraints(tmp_path):
    """The embedded default (no DATABASE_URL: SQLite) gets the same constraints: no models.W047."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["CHITTYCAN_VAR_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--database", "default"],
        cwd=Path(settings.BASE_DIR),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "W047" not in result.stdout + result.stderr

"""`can analytics prune` never deletes a ledger row the Stripe export has not covered yet (the
export reads raw rows), whatever `--days` says, and says how many it kept back and why."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from io import StringIO

from django.core.management import call_command

from billing_export.models import ExportedUsage
from billing_export.selectors import UNEXPORTED
from billing_export.services import export_run_create
from ledger import analytics, holds, retention, rollups, writer
from ledger.models import RollupHour, UsageRecord

NOW = datetime.now(UTC)
OLD = (NOW - timedelta(days=40)).replace(minute=5, second=0, microsecond=0)


def _row(tenant, when, cost):
    return {
        "request_id": f"req_{uuid.uuid4().hex}",
        "created_at": when.timestamp(),
        "tenant_id": tenant.pk,
        "api_key_id": None,
        "endpoint": "chat",
        "requested_model": "gpt-4o",
        "served_model": "gpt-4o",
        "provider": "fake-openai",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_micro": cost,
        "status": "ok",
    }


def _prune(days="30"):
    out = StringIO()
    call_command("analytics", "prune", "--days", days, stdout=out)
    return out.getvalue()


def test_the_export_hold_is_registered():
    assert UNEXPORTED in holds.holds()


def test_old_unexported_rows_survive_and_exported_ones_are_pruned(make_tenant):
    billed = make_tenant("prune-billed", stripe_customer_id="cus_billed")
    unbilled = make_tenant("prune-unbilled")  # no Stripe customer yet: its rows are never exported
    other_day = OLD - timedelta(days=2)
    writer.write_rows(
        [
            _row(billed, OLD, 1_000),
            _row(billed, OLD + timedelta(minutes=1), 0),  # free rows are not billable: prunable
            _row(unbilled, OLD + timedelta(hours=3), 7_000),
            _row(billed, other_day, 500),
        ]
    )
    export_run_create(period=OLD.date().isoformat(), actor_label="test")  # bills OLD's day only
    assert ExportedUsage.objects.count() == 1
    spend_before = analytics.spend_micro(tenant_ids=[billed.pk, unbilled.pk])

    text = _prune("30")
    # OLD's first hour (one exported row, one free row) goes; the unbilled tenant's hour and the
    # unexported other day stay raw.
    assert "pruned 2 rows in 1 hours" in text
    assert "kept back 2 rows" in text
    assert f"2 rows {UNEXPORTED}" in text
    left = set(UsageRecord.objects.values_list("tenant_id", "cost_micro"))
    assert left == {(unbilled.pk, 7_000), (billed.pk, 500)}
    assert RollupHour.objects.filter(sealed=True).count() == 1
    assert analytics.spend_micro(tenant_ids=[billed.pk, unbilled.pk]) == spend_before

    # Even a retention of one day keeps them; exporting releases them.
    assert "kept back 2 rows" in _prune("1")
    assert UsageRecord.objects.count() == 2
    export_run_create(period=other_day.date().isoformat(), actor_label="test")
    text = _prune("1")
    assert "pruned 1 rows" in text and "kept back 1 rows" in text
    assert list(UsageRecord.objects.values_list("cost_micro", flat=True)) == [7_000]
    assert analytics.spend_micro(tenant_ids=[billed.pk, unbilled.pk]) == spend_before


def test_an_hour_with_one_unexported_row_is_kept_whole(make_tenant):
    billed = make_tenant("prune-mixed", stripe_customer_id="cus_mixed")
    writer.write_rows([_row(billed, OLD, 100), _row(billed, OLD + timedelta(minutes=2), 200)])
    export_run_create(period=OLD.date().isoformat(), actor_label="test")
    writer.write_rows([_row(billed, OLD + timedelta(minutes=3), 300)])  # arrived after the export
    result = retention.prune_usage(retention_days=30)
    assert (result.rows, result.kept_rows, result.kept_hours, result.kept) == (0, 3, 1, {UNEXPORTED: 1})
    assert UsageRecord.objects.count() == 3
    assert not RollupHour.objects.filter(sealed=True).exists()


def test_a_late_unexported_row_in_a_sealed_hour_stays_raw_until_exported(make_tenant):
    billed = make_tenant("prune-late", stripe_customer_id="cus_late")
    writer.write_rows([_row(billed, OLD, 100)])
    export_run_create(period=OLD.date().isoformat(), actor_label="test")
    assert retention.prune_usage(retention_days=30).rows == 1
    writer.write_rows([_row(billed, OLD + timedelta(minutes=9), 40)])  # a spool replayed late
    rollups.rollup_usage()
    result = retention.prune_usage(retention_days=30)
    assert result.kept == {UNEXPORTED: 1} and UsageRecord.objects.count() == 1
    assert analytics.spend_micro(tenant_ids=[billed.pk]) == 140  # sealed rollup + raw row, once each
    export_run_create(period=OLD.date().isoformat(), actor_label="test")
    rollups.rollup_usage()
    assert not UsageRecord.objects.exists()
    assert analytics.spend_micro(tenant_ids=[billed.pk]) == 140

"""``can analytics costs`` and ``can metrics show`` against ledger rows with known numbers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from budgets import services
from gateway.models import LLMModel, Price
from ledger import analytics, retention, writer


def _row(tenant, when, cost, **extra):
    row = {
        "request_id": f"req_{uuid.uuid4().hex}",
        "created_at": when.timestamp(),
        "tenant_id": tenant.pk,
        "endpoint": "chat",
        "requested_model": "gpt-4o",
        "served_model": "gpt-4o",
        "provider": "fake-openai",
        "cost_micro": cost,
    }
    row.update(extra)
    return row


def run(*args):
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_costs_per_local_day_with_budget_and_projection(make_tenant):
    org = make_tenant("cli-org", time_zone="Europe/Paris")
    team = make_tenant("cli-team", parent=org, kind="team", time_zone="Europe/Paris")
    services.budget_set(tenant=org, period="month", limit_micro=30_000_000)  # 1 USD a day in September
    writer.write_rows(
        [
            # 23:30 UTC on Aug 31 is 01:30 on Sep 1 in Paris: September's first day.
            _row(org, datetime(2026, 8, 31, 23, 30, tzinfo=UTC), 1_500_000),
            _row(team, datetime(2026, 9, 1, 10, 0, tzinfo=UTC), 500_000),
            _row(org, datetime(2026, 9, 15, 12, 0, tzinfo=UTC), 31_000_000),
            # 22:30 UTC on Sep 30 is Oct 1 in Paris: not September.
            _row(org, datetime(2026, 9, 30, 22, 30, tzinfo=UTC), 9_999_999),
        ]
    )
    text = run("analytics", "costs", "--tenant", "cli-org", "--month", "2026-09")
    lines = text.splitlines()
    assert "2026-09 (Europe/Paris)" in lines[0]
    assert lines[1].split() == ["date", "calls", "cost", "budget/day"]
    assert lines[2].split() == ["2026-09-01", "2", "2.000000", "1.000000"]
    assert lines[3].split() == ["2026-09-02", "0", "0.000000", "1.000000"]
    assert lines[16].split() == ["2026-09-15", "1", "31.000000", "1.000000"]
    assert lines[31].split() == ["2026-09-30", "0", "0.000000", "1.000000"]
    assert lines[32].split() == ["total", "3", "33.000000", "30.000000"]
    assert "Month total:  33.000000" in text
    assert "Used:         33.000000 (110.00 %)" in text
    assert "Remaining:    -3.000000" in text
    assert "Projected:    33.000000 by month end (30 of 30 days elapsed)" in text
    assert "Verdict:      OVER" in text
    assert text.rstrip().endswith("Cache:        0 hits of 3 calls (0.00 %), 0 of them coalesced; saved 0.000000")

    # The same numbers once the raw rows are pruned (rollups carry them).
    before = text
    retention.prune_usage(now=datetime(2027, 1, 1, tzinfo=UTC), retention_days=30)
    assert run("analytics", "costs", "--tenant", "cli-org", "--month", "2026-09") == before


def test_projection_for_the_current_month(make_tenant):
    tenant = make_tenant("cli-proj", time_zone="America/New_York")
    services.budget_set(tenant=tenant, period="month", limit_micro=10_000_000)
    writer.write_rows([_row(tenant, datetime(2026, 11, 2, 15, tzinfo=UTC), 1_000_000)])
    now = datetime(2026, 11, 10, 17, tzinfo=UTC)  # Nov 10 in New York: 10 of 30 days
    report = analytics.month_report(tenant, 2026, 11, now=now)
    assert (report.total_micro, report.elapsed_days, report.projected_micro) == (1_000_000, 10, 3_000_000)
    assert report.verdict == "OK" and report.remaining_micro == 9_000_000
    writer.write_rows([_row(tenant, datetime(2026, 11, 9, 15, tzinfo=UTC), 3_000_000)])
    report = analytics.month_report(tenant, 2026, 11, now=now)
    assert (report.projected_micro, report.verdict) == (12_000_000, "OVER")
    text = run("analytics", "costs", "--tenant", "cli-proj")
    assert "Verdict:" in text and "Budget:       10.000000 per month" in text


def test_costs_errors_are_clear(make_tenant):
    make_tenant("cli-err")
    with pytest.raises(CommandError, match="no tenant"):
        run("analytics", "costs", "--tenant", "nope")
    with pytest.raises(CommandError, match="YYYY-MM"):
        run("analytics", "costs", "--tenant", "cli-err", "--month", "2026-13")
    text = run("analytics", "costs", "--tenant", "cli-err", "--month", "2026-02")
    assert "Budget:       none" in text and "Verdict" not in text
    assert len([line for line in text.splitlines() if line.startswith("2026-02-")]) == 28


def test_metrics_show(make_tenant):
    org = make_tenant("metrics-org")
    other = make_tenant("metrics-other")
    model = LLMModel.objects.create(name="gpt-4o")
    Price.objects.create(
        model=model,
        effective_from=datetime(2020, 1, 1, tzinfo=UTC),
        input_per_mtok=Decimal("2.50"),
        cached_input_per_mtok=Decimal("1.25"),
        output_per_mtok=Decimal("10.00"),
    )
    now = datetime.now(UTC)
    rows = [_row(org, now - timedelta(minutes=5), 100, latency_ms=i) for i in range(1, 97)]
    rows += [_row(org, now - timedelta(minutes=5), 300, latency_ms=97, served_model="gpt-4o-mini")]
    rows += [
        _row(
            org,
            now - timedelta(minutes=5),
            0,
            latency_ms=98 + i,
            cache_hit=True,
            prompt_tokens=1000,
            completion_tokens=100,
            usage_source="cache",
        )
        for i in range(3)
    ]
    rows += [_row(org, now - timedelta(days=3), 5000, latency_ms=5000)]  # outside --since
    rows += [_row(other, now - timedelta(minutes=5), 7777, latency_ms=1)]  # another tenant
    writer.write_rows(rows)

    text = run("metrics", "show", "--tenant", "metrics-org", "--since", "24h")
    assert "Requests:              100 (0 errors)" in text
    assert "Cost:                  0.009900 USD" in text
    assert "Cost per request:      0.000099 USD" in text
    assert "  cached:              0.000000 USD (3)" in text
    assert "  uncached:            0.000102 USD (97)" in text
    assert "Latency p50/p95/p99:   50 ms / 95 ms / 99 ms" in text
    assert "Cache hit rate:        3.00 %" in text
    # each hit would have cost 1000 x $2.50/M + 100 x $10/M = 3500 micro-USD
    assert "Cache savings:         0.010500 USD" in text
    table = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("gpt-")}
    assert table["gpt-4o"][1:3] == ["99", "99.0"] and table["gpt-4o-mini"][1] == "1"

    everyone = run("metrics", "show", "--since", "7d")
    assert "Requests:              102 (0 errors)" in everyone
    with pytest.raises(CommandError, match="--since"):
        run("metrics", "show", "--since", "yesterday-ish")

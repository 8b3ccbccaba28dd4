"""Stripe export: the CSV reconciles with the ledger, re-exports bill nothing twice, tenants map to
customers (rolled up to the nearest ancestor with one) and those without one are reported."""

from __future__ import annotations

import csv
import io
import logging
import os
import random
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from billing_export import selectors, services
from billing_export.models import ExportedUsage, ExportLine, ExportRun
from ledger.models import UsageRecord

HEADER = ["identifier", "timestamp", "event_name", "payload_stripe_customer_id", "payload_value"]
_seq = iter(range(1, 10**9))


def add_rows(tenant, rows: list[tuple[datetime, int]]) -> list[UsageRecord]:
    return UsageRecord.objects.bulk_create(
        [
            UsageRecord(
                request_id=f"req_{next(_seq):012d}",
                created_at=at,
                tenant_id=tenant.pk,
                endpoint="chat",
                requested_model="gpt-4o",
                cost_micro=cost,
            )
            for at, cost in rows
        ]
    )


def database_url_for_children() -> str:
    """The test database, for a child process (``can ...``) to work on the same rows."""
    from django.db import connection

    db = connection.settings_dict
    auth = f"{db['USER']}:{db['PASSWORD']}" if db["PASSWORD"] else db["USER"]
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def read_csv(data: bytes) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(data.decode()))
    assert reader.fieldnames == HEADER
    return list(reader)


def run_csv(run: ExportRun) -> list[dict[str, str]]:
    parts = services.export_csv_parts(selectors.run_lines(run))
    assert len(parts) == 1
    return read_csv(parts[0])


def test_csv_reconciles_with_the_ledger_to_the_micro_dollar(make_tenant):
    acme = make_tenant("acme", stripe_customer_id="cus_ACME0001")
    globex = make_tenant("globex", stripe_customer_id="cus_GLOBEX02")
    rnd = random.Random(7)
    start = datetime(2026, 10, 1, tzinfo=UTC)
    expected: dict[tuple[str, int], int] = defaultdict(int)
    for tenant, customer in ((acme, "cus_ACME0001"), (globex, "cus_GLOBEX02")):
        rows = []
        for _ in range(1500):
            at = start + timedelta(seconds=rnd.randrange(31 * 86400))
            cost = rnd.choice([rnd.randrange(1, 10), rnd.randrange(1, 10**6), rnd.randrange(10**6, 10**9), 333_333])
            rows.append((at, cost))
            day = datetime(at.year, at.month, at.day, tzinfo=UTC)
            expected[(customer, int(day.timestamp()))] += cost
        # rows that must not be billed: zero cost, and just outside the month on both sides
        rows += [
            (start + timedelta(days=3), 0),
            (start - timedelta(microseconds=1), 999),
            (start + timedelta(days=31), 777),
        ]
        add_rows(tenant, rows)
    # the first instant of the month belongs to it
    add_rows(acme, [(start, 5)])
    expected[("cus_ACME0001", int(start.timestamp()))] += 5

    run = services.export_run_create(period="2026-10", granularity="day", now=datetime(2026, 11, 2, tzinfo=UTC))

    ledger = UsageRecord.objects.filter(
        created_at__gte=start, created_at__lt=datetime(2026, 11, 1, tzinfo=UTC), cost_micro__gt=0
    )
    ledger_total = sum(ledger.values_list("cost_micro", flat=True))
    csv_rows = run_csv(run)
    assert sum(int(r["payload_value"]) for r in csv_rows) == ledger_total == run.total_micro == run.total_value
    got = {(r["payload_stripe_customer_id"], int(r["timestamp"])): int(r["payload_value"]) for r in csv_rows}
    assert got == dict(expected)
    assert len({r["identifier"] for r in csv_rows}) == len(csv_rows) == run.lines_count
    assert all(r["event_name"] == "llm_cost_microusd" for r in csv_rows)
    assert all(r["payload_value"].isdigit() and len(r["payload_value"]) <= 15 for r in csv_rows)
    assert run.rows_count == ledger.count() == ExportedUsage.objects.count()
    assert set(ExportedUsage.objects.values_list("usage_id", flat=True)) == set(ledger.values_list("id", flat=True))
    assert csv_rows[0]["identifier"] == "cc-llm_cost_microusd-cus_ACME0001-20261001"
    rec = selectors.period_reconciliation(services.parse_period("2026-10"))
    assert rec.pending_micro == 0 and rec.exported_micro == rec.lines_micro == ledger_total


def test_second_export_adds_nothing_keeps_identifiers_and_bills_late_rows_once(make_tenant, tmp_path):
    acme = make_tenant("acme", stripe_customer_id="cus_ACME0001")
    day1 = datetime(2026, 10, 3, 9, 30, tzinfo=UTC)
    add_rows(acme, [(day1, 1_234_567), (day1 + timedelta(hours=5), 1), (day1 + timedelta(days=1), 42)])
    now = datetime(2026, 10, 20, tzinfo=UTC)

    first = services.export_run_create(period="2026-10", now=now)
    ids = [r["identifier"] for r in run_csv(first)]
    assert ids == ["cc-llm_cost_microusd-cus_ACME0001-20261003", "cc-llm_cost_microusd-cus_ACME0001-20261004"]

    second = services.export_run_create(period="2026-10", now=now)
    assert second.status == ExportRun.Status.DONE
    assert (second.lines_count, second.total_micro, second.rows_count) == (0, 0, 0)
    assert run_csv(second) == []
    # the first run's CSV renders the same again (same lines, same identifiers)
    call_command("billing", "csv", "--run", str(first.pk), "--out", str(tmp_path / "again.csv"))
    assert [r["identifier"] for r in read_csv((tmp_path / "again.csv").read_bytes())] == ids

    # late rows for an already exported day: only the delta goes out, under a new identifier
    add_rows(acme, [(day1 + timedelta(hours=1), 1000), (day1 + timedelta(hours=2), 7)])
    third = services.export_run_create(period="2026-10", now=now)
    assert [(r["identifier"], r["payload_value"]) for r in run_csv(third)] == [
        ("cc-llm_cost_microusd-cus_ACME0001-20261003-2", "1007")
    ]
    assert services.export_run_create(period="2026-10", now=now).lines_count == 0
    billed = sum(ExportLine.objects.values_list("value", flat=True))
    assert billed == sum(UsageRecord.objects.values_list("cost_micro", flat=True)) == 1_234_567 + 1 + 42 + 1007
    assert len(set(ExportLine.objects.values_list("identifier", flat=True))) == 3


def test_cli_export_output_has_no_log_lines(make_tenant, tmp_path, caplog):
    """The human report is not interleaved with the services' JSON log line (shown with -v 2)."""
    acme = make_tenant("acme", stripe_customer_id="cus_ACME0001")
    add_rows(acme, [(datetime(2026, 10, 5, 12, tzinfo=UTC), 100)])
    caplog.set_level("INFO")
    out, err = io.StringIO(), io.StringIO()
    call_command("billing", "export", "--period", "2026-10", "--out", str(tmp_path / "c.csv"), stdout=out, stderr=err)
    assert "export run" in out.getvalue() and "1 new line(s)" in out.getvalue()
    assert [r for r in caplog.records if r.name.startswith("billing_export")] == []
    assert logging.getLogger("billing_export").level == logging.NOTSET  # restored after the command
    acme_rows = add_rows(acme, [(datetime(2026, 10, 6, 12, tzinfo=UTC), 5)])
    assert acme_rows
    call_command("billing", "export", "--period", "2026-10", "--out", str(tmp_path / "d.csv"), verbosity=2, stdout=out)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("billing_export")] == ["billing export"]


def test_tenant_without_customer_is_reported_not_dropped(make_tenant, tmp_path):
    acme = make_tenant("acme", stripe_customer_id="cus_ACME0001")
    orphan = make_tenant("orphan")
    day = datetime(2026, 10, 5, 12, tzinfo=UTC)
    add_rows(acme, [(day, 100)])
    add_rows(orphan, [(day, 250), (day + timedelta(hours=1), 50)])
    out, err = io.StringIO(), io.StringIO()
    call_command("billing", "export", "--period", "2026-10", "--out", str(tmp_path / "c.csv"), stdout=out, stderr=err)
    assert "NOT EXPORTED: tenant orphan has no Stripe customer id" in err.getvalue()
    assert "2 row(s), $0.000300" in err.getvalue()
    run = ExportRun.objects.get(status="done")
    assert run.unmapped == [{"tenant_id": orphan.pk, "slug": "orphan", "rows": 2, "cost_micro": 300}]
    assert run.unmapped_micro == 300 and run.total_micro == 100
    assert any("orphan" in w for w in run.warnings)
    rows = read_csv((tmp_path / "c.csv").read_bytes())
    assert [r["payload_stripe_customer_id"] for r in rows] == ["cus_ACME0001"]

    # reported again until mapped, then billed once
    again = services.export_run_create(period="2026-10")
    assert again.lines_count == 0 and again.unmapped_micro == 300
    orphan.stripe_customer_id = "cus_ORPHAN03"
    orphan.save()
    late = services.export_run_create(period="2026-10")
    assert late.unmapped == [] and late.total_micro == 300
    assert [(r["payload_stripe_customer_id"], r["payload_value"]) for r in run_csv(late)] == [("cus_ORPHAN03", "300")]


def test_child_usage_rolls_up_to_nearest_ancestor_with_a_customer(make_tenant):
    org = make_tenant("org", stripe_customer_id="cus_ORG00001")
    team = make_tenant("team", parent=org, kind="team")
    project = make_tenant("project", parent=team, kind="project")
    team2 = make_tenant("team2", parent=org, kind="team", stripe_customer_id="cus_TEAM0002")
    project2 = make_tenant("project2", parent=team2, kind="project")
    day = datetime(2026, 10, 7, 8, tzinfo=UTC)
    add_rows(project, [(day, 11), (day, 22)])
    add_rows(team, [(day, 5)])
    add_rows(org, [(day, 1)])
    add_rows(project2, [(day, 1000)])
    add_rows(team2, [(day, 3)])

    run = services.export_run_create(period="2026-10-07")
    lines = {line.customer_id: line for line in run.lines.all()}
    assert set(lines) == {"cus_ORG00001", "cus_TEAM0002"}
    assert lines["cus_ORG00001"].value == 39 and lines["cus_ORG00001"].tenant_id == org.pk
    assert lines["cus_TEAM0002"].value == 1003 and lines["cus_TEAM0002"].tenant_slug == "team2"
    assert sorted((s["slug"], s["rows"], s["cost_micro"]) for s in lines["cus_ORG00001"].sources) == [
        ("org", 1, 1),
        ("project", 2, 33),
        ("team", 1, 5),
    ]
    assert run.unmapped == []


def test_hour_and_request_granularity_and_configurable_event(make_tenant, settings):
    settings.CHITTYCAN_STRIPE_METER_EVENT = "gw_spend"
    settings.CHITTYCAN_STRIPE_IDENTIFIER_PREFIX = "prod"
    acme = make_tenant("acme", stripe_customer_id="cus_ACME0001")
    t = datetime(2026, 10, 9, 10, 15, tzinfo=UTC)
    records = add_rows(acme, [(t, 10), (t + timedelta(minutes=30), 20), (t + timedelta(hours=1), 30)])

    hourly = services.export_run_create(period="2026-10-09", granularity="hour")
    assert [(r["identifier"], r["timestamp"], r["event_name"], r["payload_value"]) for r in run_csv(hourly)] == [
        (
            "prod-gw_spend-cus_ACME0001-20261009T10",
            str(int(datetime(2026, 10, 9, 10, tzinfo=UTC).timestamp())),
            "gw_spend",
            "30",
        ),
        (
            "prod-gw_spend-cus_ACME0001-20261009T11",
            str(int(datetime(2026, 10, 9, 11, tzinfo=UTC).timestamp())),
            "gw_spend",
            "30",
        ),
    ]
    extra = add_rows(acme, [(t + timedelta(hours=2), 40)])[0]
    per_request = services.export_run_create(period="2026-10-09", granularity="request")
    assert [(r["identifier"], r["timestamp"]) for r in run_csv(per_request)] == [
        (f"prod-gw_spend-cus_ACME0001-r{extra.request_id}", str(int(extra.created_at.timestamp())))
    ]
    assert len(records) == 3


def test_large_exports_split_under_the_size_limit(make_tenant, tmp_path):
    acme = make_tenant("acme", stripe_customer_id="cus_ACME0001")
    t = datetime(2026, 10, 10, tzinfo=UTC)
    add_rows(acme, [(t + timedelta(seconds=i), 1000 + i) for i in range(300)])
    run = services.export_run_create(period="2026-10", granularity="request")
    paths = services.export_write_files(selectors.run_lines(run), tmp_path / "costs.csv", max_bytes=4000)
    assert len(paths) > 1
    assert paths[0].name == "costs-001.csv" and not (tmp_path / "costs.csv").exists()
    seen = []
    for path in paths:
        data = path.read_bytes()
        assert len(data) <= 4000
        seen += read_csv(data)
    assert len(seen) == 300 and sum(int(r["payload_value"]) for r in seen) == run.total_micro
    assert len({r["identifier"] for r in seen}) == 300


def test_cli_export_end_to_end(make_tenant, tmp_path):
    acme = make_tenant("acme", stripe_customer_id="cus_ACME0001")
    add_rows(acme, [(datetime(2026, 11, 2, 3, tzinfo=UTC), 123_456_789), (datetime(2026, 11, 3, tzinfo=UTC), 1)])
    out = io.StringIO()
    call_command("billing", "export", "--period", "2026-11", "--out", str(tmp_path / "costs.csv"), stdout=out)
    assert "2 new line(s), 2 ledger row(s), $123.456790" in out.getvalue()
    assert f"wrote {tmp_path / 'costs.csv'}" in out.getvalue()
    rows = read_csv((tmp_path / "costs.csv").read_bytes())
    assert [(r["timestamp"], r["payload_value"]) for r in rows] == [
        (str(int(datetime(2026, 11, 2, tzinfo=UTC).timestamp())), "123456789"),
        (str(int(datetime(2026, 11, 3, tzinfo=UTC).timestamp())), "1"),
    ]
    out = io.StringIO()
    call_command("billing", "export", "--period", "2026-11", "--out", str(tmp_path / "again.csv"), stdout=out)
    assert "nothing new to bill" in out.getvalue()
    assert read_csv((tmp_path / "again.csv").read_bytes()) == []

    out = io.StringIO()
    call_command("billing", "status", "--period", "2026-11", stdout=out)
    assert "lines vs marked rows: OK" in out.getvalue()
    out = io.StringIO()
    call_command("billing", "runs", stdout=out)
    assert "2026-11" in out.getvalue()

    with pytest.raises(CommandError, match="period must be YYYY-MM"):
        call_command("billing", "export", "--period", "November", "--out", str(tmp_path / "x.csv"))
    with pytest.raises(CommandError, match="not a valid date"):
        call_command("billing", "export", "--period", "2026-13", "--out", str(tmp_path / "x.csv"))


def test_old_buckets_warn_but_csv_is_still_produced(make_tenant, tmp_path):
    acme = make_tenant("acme", stripe_customer_id="cus_ACME0001")
    add_rows(acme, [(datetime(2026, 8, 1, 5, tzinfo=UTC), 10)])
    err = io.StringIO()
    call_command(
        "billing",
        "export",
        "--period",
        "2026-08",
        "--out",
        str(tmp_path / "old.csv"),
        stdout=io.StringIO(),
        stderr=err,
    )
    assert "older than 35 days" in err.getvalue()
    assert len(read_csv((tmp_path / "old.csv").read_bytes())) == 1


def test_the_cli_entry_point_runs_the_command(make_tenant, tmp_path):
    acme = make_tenant("acme", stripe_customer_id="cus_ACME0001")
    add_rows(acme, [(datetime(2026, 11, 4, tzinfo=UTC), 77)])
    env = {**os.environ, "DATABASE_URL": database_url_for_children()}
    out = tmp_path / "costs.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "chittycan.cli", "billing", "export", "--period", "2026-11", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["payload_value"] for r in read_csv(out.read_bytes())] == ["77"]


def test_concurrent_exports_bill_each_row_once(make_tenant):
    import threading

    from django.db import connection

    acme = make_tenant("acme", stripe_customer_id="cus_ACME0001")
    globex = make_tenant("globex", stripe_customer_id="cus_GLOBEX02")
    base = datetime(2026, 10, 12, tzinfo=UTC)
    for tenant in (acme, globex):
        add_rows(tenant, [(base + timedelta(minutes=7 * i), 100 + i) for i in range(400)])
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def export() -> None:
        try:
            barrier.wait()
            services.export_run_create(period="2026-10", granularity="hour")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=export) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    runs = list(ExportRun.objects.order_by("id"))
    assert len(runs) == 4 and sum(1 for r in runs if r.lines_count) == 1
    assert sum(ExportLine.objects.values_list("value", flat=True)) == sum(
        UsageRecord.objects.values_list("cost_micro", flat=True)
    )
    assert ExportedUsage.objects.count() == 800


def test_a_failed_export_bills_nothing_and_is_recorded(make_tenant):
    acme = make_tenant("acme", stripe_customer_id="cus_ACME0001")
    day = datetime(2026, 10, 14, tzinfo=UTC)
    add_rows(acme, [(day, 10**15 - 1), (day, 1)])  # 16 digits in one day: Stripe would refuse it
    with pytest.raises(services.ExportError, match="more than 15 digits"):
        services.export_run_create(period="2026-10")
    failed = ExportRun.objects.get()
    assert failed.status == ExportRun.Status.FAILED and "15 digits" in failed.error
    assert not ExportLine.objects.exists() and not ExportedUsage.objects.exists()
    # a finer bucket fits
    run = services.export_run_create(period="2026-10", granularity="request")
    assert run.lines_count == 2 and run.total_micro == 10**15

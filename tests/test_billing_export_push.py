"""Pushing export lines to Stripe with the official ``stripe`` library, against a local fake Stripe:
idempotency keys and identifiers make every retry, lost response and killed pusher count once."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from billing_export import services
from billing_export.models import ExportLine
from ledger.models import UsageRecord
from tests.fakes.server import ServerThread
from tests.fakes.stripe_server import FakeStripe
from tests.test_billing_export import add_rows, database_url_for_children

API_KEY = "sk_test_chittycan_fake"


@pytest.fixture(scope="session")
def fake_stripe_server() -> Iterator[tuple[FakeStripe, ServerThread]]:
    app = FakeStripe()
    server = ServerThread(app, name="fake-stripe").start()
    yield app, server
    app.release()
    server.stop()


@pytest.fixture
def fake_stripe(fake_stripe_server, settings) -> Iterator[FakeStripe]:
    app, server = fake_stripe_server
    app.reset()
    settings.CHITTYCAN_STRIPE_API_BASE = server.url
    settings.CHITTYCAN_STRIPE_API_KEY = API_KEY
    settings.CHITTYCAN_STRIPE_MAX_NETWORK_RETRIES = 0
    settings.CHITTYCAN_STRIPE_TIMEOUT = 1.0
    yield app
    app.release()


@pytest.fixture
def recent_usage(make_tenant) -> str:
    """Three customers' usage yesterday (UTC), so timestamps are inside Stripe's 35 days."""
    yesterday = (timezone.now() - timedelta(days=1)).astimezone(UTC)
    day = datetime(yesterday.year, yesterday.month, yesterday.day, tzinfo=UTC)
    for i, slug in enumerate(("acme", "globex", "initech")):
        tenant = make_tenant(slug, stripe_customer_id=f"cus_{slug.upper()}{i:04d}")
        add_rows(tenant, [(day + timedelta(hours=h), 1_000_003 * (i + 1) + h) for h in range(0, 24, 5)])
    return day.strftime("%Y-%m-%d")


def ledger_total() -> int:
    return sum(UsageRecord.objects.filter(cost_micro__gt=0).values_list("cost_micro", flat=True))


def test_push_sends_each_line_once_with_identifier_derived_idempotency_keys(fake_stripe, recent_usage):
    run = services.export_run_create(period=recent_usage)
    assert run.lines_count == 3
    result = services.export_run_push(period=recent_usage)
    assert (result.accepted, result.failed, result.ok) == (3, 0, True)

    lines = {line.identifier: line for line in ExportLine.objects.all()}
    assert fake_stripe.identifiers() == {ident: 1 for ident in lines}
    for event in fake_stripe.events:
        line = lines[event["identifier"]]
        assert event["event_name"] == "llm_cost_microusd"
        assert event["payload"] == {"stripe_customer_id": line.customer_id, "value": str(line.value)}
        assert event["timestamp"] == line.timestamp
    assert [r["idempotency_key"] for r in fake_stripe.requests] == [
        f"chittycan-meter-event-{line.identifier}" for line in ExportLine.objects.order_by("id")
    ]
    assert fake_stripe.total_value() == ledger_total()
    assert all(line.push_status == "accepted" and line.pushed_at for line in ExportLine.objects.all())

    # pushing again sends nothing: accepted lines are skipped
    again = services.export_run_push(period=recent_usage)
    assert (again.accepted, again.already_accepted) == (0, 3)
    assert len(fake_stripe.requests) == 3


def test_lost_response_then_retry_counts_each_identifier_once(fake_stripe, recent_usage):
    services.export_run_create(period=recent_usage)
    # the 2nd event is recorded by Stripe but its response never arrives (client times out)
    fake_stripe.add_fault("pass")
    fake_stripe.add_fault("hang")
    first = services.export_run_push(period=recent_usage)
    assert (first.accepted, first.failed) == (1, 1)
    assert "connection error" in first.errors[0] and "re-run the push" in first.stopped
    assert len(fake_stripe.events) == 2
    fake_stripe.release()
    statuses = list(ExportLine.objects.order_by("id").values_list("push_status", flat=True))
    assert statuses == ["accepted", "failed", "pending"]

    second = services.export_run_push(period=recent_usage)
    assert second.ok and (second.accepted, second.already_accepted) == (2, 1)
    assert fake_stripe.identifiers() == {i: 1 for i in ExportLine.objects.values_list("identifier", flat=True)}
    assert fake_stripe.total_value() == ledger_total()
    failed_line = ExportLine.objects.get(push_attempts=2)
    assert failed_line.push_status == "accepted" and failed_line.push_error == ""


def test_sdk_retries_reuse_the_idempotency_key(fake_stripe, recent_usage, settings):
    settings.CHITTYCAN_STRIPE_MAX_NETWORK_RETRIES = 2
    services.export_run_create(period=recent_usage)
    fake_stripe.add_fault("error", status=500, should_retry=True)  # nothing recorded, SDK retries
    fake_stripe.add_fault("hang")  # recorded, response lost, SDK retries with the same key
    result = services.export_run_push(period=recent_usage)
    fake_stripe.release()
    assert result.ok and result.accepted == 3
    first_key = fake_stripe.requests[0]["idempotency_key"]
    assert [r["idempotency_key"] for r in fake_stripe.requests[:3]] == [first_key] * 3
    assert len(fake_stripe.events) == 3
    assert fake_stripe.identifiers() == {i: 1 for i in ExportLine.objects.values_list("identifier", flat=True)}


def test_identifier_dedupe_after_idempotency_keys_expire(fake_stripe, recent_usage):
    services.export_run_create(period=recent_usage)
    assert services.export_run_push(period=recent_usage).accepted == 3
    # our record of one acceptance was lost and Stripe pruned the key (after 24 h): Stripe's identifier
    # check answers "already exists", which is proof of delivery
    line = ExportLine.objects.order_by("id")[0]
    ExportLine.objects.filter(pk=line.pk).update(push_status="pending", pushed_at=None)
    fake_stripe.idempotency.clear()
    result = services.export_run_push(period=recent_usage)
    assert (result.duplicates, result.accepted, result.already_accepted, result.ok) == (1, 0, 2, True)
    assert len(fake_stripe.events) == 3
    line.refresh_from_db()
    assert line.push_status == "accepted" and "duplicate" in line.push_error


def test_killed_pusher_then_push_again_bills_each_identifier_once(fake_stripe, recent_usage, fake_stripe_server):
    services.export_run_create(period=recent_usage)
    fake_stripe.add_fault("hang")  # the first event is recorded, then the pusher is killed mid-request
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_children(),
        "CHITTYCAN_STRIPE_API_BASE": fake_stripe_server[1].url,
        "CHITTYCAN_STRIPE_API_KEY": API_KEY,
        "CHITTYCAN_STRIPE_TIMEOUT": "60",
        "CHITTYCAN_STRIPE_MAX_NETWORK_RETRIES": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "chittycan.cli", "billing", "push", "--period", recent_usage],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while fake_stripe.hanging < 1:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the pusher never reached the fake Stripe"
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)
    fake_stripe.release()
    assert len(fake_stripe.events) == 1
    assert list(ExportLine.objects.values_list("push_status", flat=True)) == ["pending"] * 3

    out = io.StringIO()
    call_command("billing", "push", "--period", recent_usage, stdout=out)
    assert "3 accepted" in out.getvalue()
    assert fake_stripe.identifiers() == {i: 1 for i in ExportLine.objects.values_list("identifier", flat=True)}
    assert fake_stripe.total_value() == ledger_total()
    replayed = [r for r in fake_stripe.requests if r["idempotency_key"] == fake_stripe.requests[0]["idempotency_key"]]
    assert len(replayed) == 2  # the killed attempt and its replay


def test_lines_older_than_35_days_are_not_pushed(fake_stripe, make_tenant):
    acme = make_tenant("acme", stripe_customer_id="cus_ACME0001")
    old = (timezone.now() - timedelta(days=40)).astimezone(UTC)
    period = old.strftime("%Y-%m-%d")
    add_rows(acme, [(old, 500)])
    run = services.export_run_create(period=period)
    assert any("older than 35 days" in w for w in run.warnings)
    err = io.StringIO()
    with pytest.raises(CommandError, match="push incomplete"):
        call_command("billing", "push", "--period", period, stdout=io.StringIO(), stderr=err)
    assert "stale" in err.getvalue()
    assert fake_stripe.requests == []
    assert ExportLine.objects.get().push_status == "stale"


def test_a_refused_line_is_reported_and_the_others_go_out(fake_stripe, make_tenant):
    now = timezone.now().astimezone(UTC) - timedelta(hours=2)
    good = make_tenant("good", stripe_customer_id="cus_GOOD0001")
    bad = make_tenant("bad", stripe_customer_id="acct_NOTACUSTOMER")
    add_rows(good, [(now, 10)])
    add_rows(bad, [(now, 20)])
    period = now.strftime("%Y-%m-%d")
    services.export_run_create(period=period)
    result = services.export_run_push(period=period)
    assert (result.accepted, result.failed, result.stopped) == (1, 1, "")
    assert "HTTP 400" in result.errors[0] and "acct_NOTACUSTOMER" in result.errors[0]
    refused = ExportLine.objects.get(customer_id="acct_NOTACUSTOMER")
    assert refused.push_status == "failed" and "customer" in refused.push_error
    assert [e["payload"]["stripe_customer_id"] for e in fake_stripe.events] == ["cus_GOOD0001"]


def test_push_without_an_api_key_is_a_clear_error(fake_stripe, recent_usage, settings):
    settings.CHITTYCAN_STRIPE_API_KEY = ""
    services.export_run_create(period=recent_usage)
    with pytest.raises(CommandError, match="CHITTYCAN_STRIPE_API_KEY"):
        call_command("billing", "push", "--period", recent_usage)
    assert fake_stripe.requests == []


def test_periodic_task_exports_yesterday_and_pushes(fake_stripe, recent_usage, settings):
    from billing_export import tasks

    first = tasks.export_and_push()
    assert (first["period"], first["lines"], first["accepted"], first["failed"]) == (recent_usage, 3, 3, 0)
    assert first["total_micro"] == ledger_total() == fake_stripe.total_value()
    again = tasks.export_and_push()
    assert (again["lines"], again["accepted"]) == (0, 0)
    assert len(fake_stripe.events) == 3
    assert "stripe-export" not in settings.CELERY_BEAT_SCHEDULE  # opt-in (CHITTYCAN_STRIPE_AUTO_PUSH)

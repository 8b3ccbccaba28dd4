"""The embedded default has no Celery beat: with ``CHITTYCAN_EMBEDDED_SCHEDULER`` on, the gateway
process runs the beat schedule itself, so usage rows become hourly and daily rollups with nobody
calling a task."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import openai
import pytest
from django.conf import settings as django_settings

from core import runtime
from gateway import scheduler
from ledger import writer
from ledger.models import DailyUsage, HourlyUsage
from tests.conftest import wait_usage


def _restart_background(server) -> None:
    """Stop the gateway's background tasks; its next request starts them again (reading settings)."""
    server.call_soon(runtime.stop_background)


@pytest.fixture
def fast_beat(settings, gateway_server):
    settings.CHITTYCAN_EMBEDDED_SCHEDULER = True
    settings.CELERY_BEAT_SCHEDULE = {"usage-rollup": {"task": "gateway.tasks.rollup_usage", "schedule": 0.5}}
    _restart_background(gateway_server)
    yield
    _restart_background(gateway_server)  # restarted without the scheduler once settings are restored


def test_usage_becomes_hourly_and_daily_rollups_without_calling_a_task(
    fast_beat, upstream, gateway_server, make_tenant, make_key
):
    tenant = make_tenant("beat-co", time_zone="Europe/Berlin")
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=make_key(tenant), max_retries=0)
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    rows = wait_usage(2, tenant=tenant)
    assert len(rows) == 2
    cost = sum(r.cost_micro for r in rows)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not DailyUsage.objects.filter(tenant=tenant).exists():
        time.sleep(0.2)
    hourly = HourlyUsage.objects.filter(tenant=tenant)
    assert sum(h.calls for h in hourly) == 2 and sum(h.cost_micro for h in hourly) == cost
    daily = DailyUsage.objects.get(tenant=tenant)
    assert (daily.calls, daily.cost_micro) == (2, cost)


def test_off_means_no_rollups(settings, upstream, gateway_server, make_tenant, make_key):
    settings.CHITTYCAN_EMBEDDED_SCHEDULER = False
    settings.CELERY_BEAT_SCHEDULE = {"usage-rollup": {"task": "gateway.tasks.rollup_usage", "schedule": 0.5}}
    _restart_background(gateway_server)
    tenant = make_tenant("beat-off")
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=make_key(tenant), max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert len(wait_usage(1, tenant=tenant)) == 1
    time.sleep(3)
    assert not HourlyUsage.objects.filter(tenant=tenant).exists()


def test_schedule_is_celery_beats(settings):
    entries = scheduler.schedule(now=0.0)
    fixed = {n for n, s in django_settings.CELERY_BEAT_SCHEDULE.items() if isinstance(s["schedule"], int | float)}
    assert {e.name for e in entries} == fixed
    assert {e.task for e in entries} >= {"gateway.tasks.rollup_usage", "gateway.tasks.check_budget_alerts"}
    assert all(e.due == e.interval for e in entries)  # first run one interval after start


@pytest.mark.parametrize(
    ("setting", "env", "eager", "mode", "expected"),
    [
        (None, "", True, "prod", True),  # embedded: no broker, tasks run eagerly
        (None, "", False, "dev", True),
        (None, "", False, "prod", False),  # production: Celery beat runs them
        (None, "off", True, "dev", False),
        (None, "1", False, "prod", True),
        (False, "1", True, "dev", False),  # an explicit setting wins
    ],
)
def test_enabled_by_default_in_embedded_and_dev_mode(settings, monkeypatch, setting, env, eager, mode, expected):
    if setting is None:
        del settings.CHITTYCAN_EMBEDDED_SCHEDULER
    else:
        settings.CHITTYCAN_EMBEDDED_SCHEDULER = setting
    monkeypatch.setenv("CHITTYCAN_EMBEDDED_SCHEDULER", env)
    settings.CELERY_TASK_ALWAYS_EAGER = eager
    settings.CHITTYCAN_MODE = mode
    assert scheduler.enabled() is expected


def test_a_failing_task_is_logged_and_tried_again(settings, db, caplog, make_tenant):
    entries = [
        scheduler.Entry("broken", "no.such.task", 0.01, 0.0),
        scheduler.Entry("rollup", "gateway.tasks.rollup_usage", 60, 0.0),
    ]
    tenant = make_tenant("beat-direct")
    when = datetime.now(UTC) - timedelta(minutes=3)
    writer.write_rows(
        [
            {
                "request_id": f"req_{uuid.uuid4().hex}",
                "created_at": when.timestamp(),
                "tenant_id": tenant.pk,
                "endpoint": "chat",
                "requested_model": "gpt-4o",
                "served_model": "gpt-4o",
                "provider": "p",
                "cost_micro": 9,
                "status": "ok",
            }
        ]
    )
    assert asyncio.run(scheduler.run_due(entries, now=1.0)) == ["broken", "rollup"]
    assert "no task named no.such.task" in caplog.text
    assert HourlyUsage.objects.get(tenant=tenant).cost_micro == 9
    assert asyncio.run(scheduler.run_due(entries, now=time.monotonic() - 1)) == []  # not due again yet

"""Celery tasks for budgets: the drift reconciler, the reservation sweeper and the alerts.

Task names are those the tasks had before budgets got their own app (``tenants.*``,
``gateway.tasks.*``): the beat schedule and messages already queued (alert deliveries retry for
hours) keep finding them.

``reconcile_budgets`` compares every live budget and quota counter with what PostgreSQL's ledger
says it must hold (settled spend, plus rows handed off but not yet written, plus open
reservations) and reports any difference. Celery beat runs it every
``CHITTYCAN_RECONCILE_INTERVAL`` seconds (``CELERY_BEAT_SCHEDULE["budget-reconcile"]``);
``repair=True`` also corrects the counters.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson
import redis
from asgiref.sync import async_to_sync
from celery import shared_task
from django.conf import settings
from django.db import OperationalError, transaction

from budgets import alerts, counters, periods, spend
from budgets.models import Budget
from core import runtime
from tenants.models import Tenant

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Drift:
    counter: str
    root: int
    live: int
    expected: int

    @property
    def drift(self) -> int:
        return self.live - self.expected


def live_counters(when: datetime | None = None) -> list[tuple[int, periods.Counter]]:
    """Every budget and plan-quota counter of the current periods, with its tree's root id, once
    each (budgets of one scope and period share a counter)."""
    now = when or datetime.now(UTC)
    roots: dict[int, int] = {}

    def root_of(tenant: Tenant) -> int:
        if tenant.pk not in roots:
            chain = [tenant, *tenant.ancestors()]
            roots[tenant.pk] = int(chain[-1].pk)
        return roots[tenant.pk]

    found: list[tuple[int, periods.Counter]] = []
    seen: set[str] = set()
    for budget in Budget.objects.select_related("tenant", "api_key__tenant").order_by("-hard", "pk"):
        owner = budget.tenant if budget.tenant_id else budget.api_key.tenant  # type: ignore[union-attr]
        assert owner is not None
        counter = periods.budget_counter(budget, now)
        if counter.name in seen:
            continue  # a hard budget and its soft levels share one counter: check (and repair) it once
        seen.add(counter.name)
        found.append((root_of(owner), counter))
    for tenant in Tenant.objects.filter(plan__monthly_request_quota__isnull=False).select_related("plan"):
        assert tenant.plan is not None and tenant.plan.monthly_request_quota is not None
        name = f"q{tenant.pk}:{periods.period_key('month', tenant.time_zone, now)}"
        quota = int(tenant.plan.monthly_request_quota)
        counter = periods.Counter(name, "q", quota, periods.MONTH_TTL, tenant.time_zone)
        found.append((root_of(tenant), counter))
    return found


def _open_amounts(conn: Any, root: int) -> dict[str, int]:
    amounts: dict[str, int] = {}
    for raw in conn.hvals(counters._res_key(root)):
        for key, amount, _kind in orjson.loads(raw):
            amounts[key] = amounts.get(key, 0) + int(amount)
    return amounts


def measure_drift() -> list[Drift]:
    """One pass: every Redis counter that exists and differs from the ledger."""
    if not settings.REDIS_URL:
        return []
    conn = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
    try:
        unwritten = counters._unwritten_rows()
        drifts: list[Drift] = []
        open_by_root: dict[int, dict[str, int]] = {}
        for root, counter in live_counters():
            key = counters.counter_key(root, counter.name)
            raw = conn.get(key)
            if raw is None:
                continue  # not built yet: it is built from the ledger when first used
            if root not in open_by_root:
                open_by_root[root] = _open_amounts(conn, root)
            expected = spend.ledger_value(counter, unwritten) + open_by_root[root].get(key, 0)
            live = int(raw)
            if live != expected:
                drifts.append(Drift(counter.name, root, live, expected))
        return drifts
    finally:
        conn.close()


def reconcile(*, repair: bool = False, settle_time: float = 1.0) -> list[Drift]:
    """Report counters that disagree with the ledger twice in a row (``settle_time`` apart, so a
    request finishing between the two reads is not reported). ``repair`` corrects them."""
    first = {(d.root, d.counter): d for d in measure_drift()}
    if not first:
        return []
    time.sleep(settle_time)
    persistent = [d for d in measure_drift() if (d.root, d.counter) in first and first[(d.root, d.counter)] == d]
    for d in persistent:
        log.error("budget counter drift", extra={"counter": d.counter, "live": d.live, "expected": d.expected})
    if repair and persistent:
        conn = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
        try:
            for d in persistent:
                conn.incrby(counters.counter_key(d.root, d.counter), -d.drift)
        finally:
            conn.close()
    return persistent


@shared_task(name="tenants.reconcile_budgets")
def reconcile_budgets(repair: bool = False) -> list[dict[str, Any]]:
    return [{**asdict(d), "drift": d.drift} for d in reconcile(repair=repair)]


@shared_task(name="tenants.sweep_reservations")
def sweep_reservations() -> int:
    """Release reservations whose lease expired (gateway processes also do this themselves)."""
    released = counters.pg_sweep()
    if settings.REDIS_URL:

        async def sweep() -> int:
            try:
                return await counters.primary().sweep()
            finally:
                await runtime.redis_client().aclose()

        released += async_to_sync(sweep)()
    return released


@shared_task(
    name="gateway.tasks.check_budget_alerts", autoretry_for=(OperationalError,), retry_backoff=True, max_retries=5
)
def check_budget_alerts() -> int:
    with transaction.atomic():
        due = alerts.check_budgets()
        for alert in due:
            transaction.on_commit(partial(deliver_budget_alert.delay, alert.pk))
    return len(due)


@shared_task(
    name="gateway.tasks.deliver_budget_alert",
    autoretry_for=(alerts.DeliveryError, OperationalError),
    retry_backoff=5,
    retry_backoff_max=3600,
    retry_jitter=True,
    max_retries=10,
)
def deliver_budget_alert(alert_id: int) -> None:
    alerts.deliver(alert_id)

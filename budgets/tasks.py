"""Celery tasks for budgets: the drift reconciler, the reservation sweeper and the alerts.

Task names are those the tasks had before budgets got their own app (``tenants.*``,
``gateway.tasks.*``): the beat schedule and messages already queued (alert deliveries retry for
hours) keep finding them.

``reconcile_budgets`` compares every live budget and quota counter with what PostgreSQL's ledger
says it must hold (settled spend, plus rows handed off but not yet written, plus open
reservations in Redis and PostgreSQL), repairs the drift it can prove and reports the rest.
Celery beat runs it every ``CHITTYCAN_RECONCILE_INTERVAL`` seconds
(``CELERY_BEAT_SCHEDULE["budget-reconcile"]``), repairing; each gateway process also runs it
after an incident (``budgets.service``: the ``budget-converge`` task). The reconciler itself is
``budgets.reconcile`` (no Celery there: gateway processes import it).
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from typing import Any

from asgiref.sync import async_to_sync
from celery import shared_task
from django.conf import settings
from django.db import OperationalError, transaction

from budgets import alerts, counters
from budgets.reconcile import Drift, live_counters, measure_drift, reconcile, unrepaired_key
from core import runtime

__all__ = [
    "Drift",
    "check_budget_alerts",
    "deliver_budget_alert",
    "live_counters",
    "measure_drift",
    "reconcile",
    "reconcile_budgets",
    "sweep_reservations",
    "unrepaired_key",
]


@shared_task(name="tenants.reconcile_budgets")
def reconcile_budgets(repair: bool = True) -> list[dict[str, Any]]:
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

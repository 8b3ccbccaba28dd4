"""Celery tasks for the usage ledger: thin wrappers that call a service and retry.

The beat schedule is ``CELERY_BEAT_SCHEDULE`` in settings (see docs/usage-and-analytics.md). The
task names are the ones these tasks had in the gateway app, so beat schedules in deployed
configuration and messages already queued keep finding them.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.db import OperationalError

from core import origin
from ledger import retention, rollups, writer
from tenants import audit


@shared_task(name="gateway.tasks.rollup_usage", autoretry_for=(OperationalError,), retry_backoff=True, max_retries=5)
def rollup_usage() -> dict[str, Any]:
    result = rollups.rollup_usage()
    return {"hours": len(result.hours), "days": result.days}


@shared_task(name="gateway.tasks.prune_usage", autoretry_for=(OperationalError,), retry_backoff=True, max_retries=5)
def prune_usage() -> dict[str, Any]:
    """Retention for the usage ledger and the audit log (``CHITTYCAN_AUDIT_RETENTION_DAYS``)."""
    result = retention.prune_usage()
    with origin.using(origin.for_command("task", "gateway.tasks.prune_usage")):
        pruned = audit.prune()
    return {
        "cutoff": result.cutoff.isoformat(),
        "hours": result.hours,
        "rows": result.rows,
        "audit_rows": pruned.rows,
        **result.others,
    }


@shared_task(
    name="gateway.tasks.replay_usage_spool", autoretry_for=(OperationalError,), retry_backoff=True, max_retries=5
)
def replay_usage_spool() -> int:
    """Replays the spool files on this worker's host (each gateway process also does it itself)."""
    return writer.replay_spool()

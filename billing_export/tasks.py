"""Celery tasks for the Stripe export (opt-in: CHITTYCAN_STRIPE_AUTO_PUSH adds it to the beat schedule).

``export_and_push`` exports yesterday (UTC), then pushes every line of the last 35 days that Stripe
has not accepted yet. Run hourly, the first run after midnight bills the day and later runs only
add late rows (as delta lines) and retry failed pushes.
"""

from __future__ import annotations

import logging
from datetime import UTC, timedelta
from typing import Any

from celery import shared_task
from django.db import OperationalError
from django.utils import timezone

from billing_export import services
from billing_export.models import ExportLine

log = logging.getLogger(__name__)


@shared_task(autoretry_for=(OperationalError,), retry_backoff=True, max_retries=5)
def export_and_push(period: str | None = None) -> dict[str, Any]:
    now = timezone.now()
    day = period or (now - timedelta(days=1)).astimezone(UTC).strftime("%Y-%m-%d")
    run = services.export_run_create(period=day, actor_label="celery", now=now)
    pending = ExportLine.objects.filter(
        push_status__in=[ExportLine.PushStatus.PENDING, ExportLine.PushStatus.FAILED],
        bucket_start__gte=now - services.STRIPE_MAX_AGE,
    ).order_by("id")
    result = services.export_run_push(lines=pending, now=now)
    summary = {
        "run": run.pk,
        "period": day,
        "lines": run.lines_count,
        "total_micro": run.total_micro,
        "unmapped": [u["slug"] for u in run.unmapped],
        "accepted": result.accepted + result.duplicates,
        "failed": result.failed,
        "stopped": result.stopped,
    }
    if not result.ok or run.unmapped:
        log.warning("stripe export needs attention", extra=summary)
    return summary

"""Retention: raw ledger rows older than ``CHITTYCAN_USAGE_RETENTION_DAYS`` are pruned into rollups.

Pruning takes one hour at a time: under a table lock that holds back concurrent inserts for a
moment, it recomputes the hour from its raw rows, deletes exactly those rows and marks the hour
sealed. From then on the hour's rollup is the record (``ledger.rollups`` adds any row that still
arrives for it), so spend computed from the ledger does not change when rows are pruned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models.functions import TruncHour
from django.utils import timezone

from ledger import rollups
from ledger.models import RollupHour, UsageRecord

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    cutoff: datetime
    hours: int = 0
    rows: int = 0


def prune_usage(now: datetime | None = None, retention_days: int | None = None) -> PruneResult:
    """Delete raw ledger rows older than the retention period, one rolled-up hour at a time.

    Each hour is recomputed from its raw rows and its rows deleted in the same transaction (with
    inserts held back), then sealed: rollups do not change and no row escapes them.
    """
    now = now or timezone.now()
    days = settings.CHITTYCAN_USAGE_RETENTION_DAYS if retention_days is None else retention_days
    cutoff = (now - timedelta(days=days)).astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    result = PruneResult(cutoff=cutoff)
    rollups.rollup_usage()  # catch up first, so every bucket about to lose its rows is current
    hours = sorted(
        set(
            UsageRecord.objects.filter(created_at__lt=cutoff)
            .annotate(h=TruncHour("created_at", tzinfo=UTC))
            .values_list("h", flat=True)
            .distinct()
            .order_by()
        )
    )
    for hour in hours:
        with transaction.atomic():
            rollups.lock_ledger()
            state, _ = RollupHour.objects.select_for_update().get_or_create(hour=hour)
            if state.sealed:
                tenants = rollups.absorb_late_rows(hour)
            else:
                tenants = rollups.recompute_hour(hour)
                deleted, _ = rollups.hour_rows(hour).delete()
                result.rows += deleted
                state.sealed = True
                state.computed_at = timezone.now()
                state.save(update_fields=["sealed", "computed_at"])
            rollups.refresh_days((t, hour) for t in tenants)
        result.hours += 1
    if result.rows:
        log.info("pruned %d usage rows in %d hours before %s", result.rows, result.hours, cutoff.isoformat())
    return result

"""Retention: raw ledger rows older than ``CHITTYCAN_USAGE_RETENTION_DAYS`` are pruned into rollups.

Pruning takes one hour at a time: under a table lock that holds back concurrent inserts for a
moment, it recomputes the hour from its raw rows, deletes exactly those rows and marks the hour
sealed. From then on the hour's rollup is the record (``ledger.rollups`` adds any row that still
arrives for it), so spend computed from the ledger does not change when rows are pruned.

Rows under a hold (``ledger.holds``) are never pruned, whatever the retention: an hour holding
any is left whole (raw, unsealed) and counted as kept back, with the reason. ``billing_export``
holds every billable row not yet exported to Stripe, which reads raw rows.

Apps above the ledger with data of their own to expire register a pruner (``also_prune``, from
their ``AppConfig.ready``); the same task runs them (the gateway's stored Responses API answers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models.functions import TruncHour
from django.utils import timezone

from ledger import holds, rollups
from ledger.models import RollupHour, UsageRecord

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    cutoff: datetime
    hours: int = 0
    rows: int = 0
    kept_hours: int = 0  # hours left whole because a hold keeps some of their rows
    kept_rows: int = 0  # raw rows left in place past the cutoff (held rows and their hours' others)
    kept: dict[str, int] = field(default_factory=dict)  # held rows by reason
    others: dict[str, int] = field(default_factory=dict)  # rows deleted by registered pruners, by name


#: Other expiring data, pruned with the ledger: name -> function(now) returning rows deleted.
_pruners: dict[str, Callable[[datetime], int]] = {}


def also_prune(name: str, pruner: Callable[[datetime], int]) -> None:
    """Have the retention task also run ``pruner(now)`` (it deletes what expired; returns how many)."""
    _pruners[name] = pruner


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
            kept = holds.held(rollups.hour_rows(hour))
            for reason, count in kept.items():
                result.kept[reason] = result.kept.get(reason, 0) + count
            if state.sealed:
                tenants = rollups.absorb_late_rows(hour)  # leaves held rows raw
                result.kept_rows += rollups.hour_rows(hour).count()
            elif kept:
                result.kept_hours += 1
                result.kept_rows += rollups.hour_rows(hour).count()
                continue  # left whole: sealing it would fold held rows into the rollup
            else:
                tenants = rollups.recompute_hour(hour)
                deleted, _ = rollups.hour_rows(hour).delete()
                result.rows += deleted
                state.sealed = True
                state.computed_at = timezone.now()
                state.save(update_fields=["sealed", "computed_at"])
            rollups.refresh_days((t, hour) for t in tenants)
        result.hours += 1
    for name, pruner in _pruners.items():
        result.others[name] = pruner(now)
        if result.others[name]:
            log.info("pruned %d expired %s", result.others[name], name)
    if result.rows:
        log.info("pruned %d usage rows in %d hours before %s", result.rows, result.hours, cutoff.isoformat())
    if result.kept_rows:
        log.info("kept back %d usage rows before %s: %s", result.kept_rows, cutoff.isoformat(), result.kept)
    return result

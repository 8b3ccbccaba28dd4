"""What the ledger says a counter must hold: the budgets' read side of the usage ledger.

PostgreSQL's usage ledger is the truth; the live counters (``budgets.counters``) are rebuilt from
it and checked against it. Every query budgets make of the ledger is here. Synchronous: call off
the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from django.db.models import Count, Q, Sum

from budgets.periods import Counter, period_bounds
from gateway.analytics import sealed_rollups
from gateway.models import UsageRecord
from tenants.models import Tenant


def subtree_ids(tenant_id: int) -> list[int]:
    """A tenant and all its descendants."""
    ids = [tenant_id]
    frontier = [tenant_id]
    while frontier:
        frontier = [
            pk for pk in Tenant.objects.filter(parent_id__in=frontier).values_list("pk", flat=True) if pk not in ids
        ]
        ids.extend(frontier)
    return ids


def _matches(counter: Counter, subtree: list[int] | None, row: dict[str, Any]) -> bool:
    start, end = period_bounds(counter.period_key, counter.time_zone)
    raw = row.get("created_at")
    created = datetime.fromtimestamp(float(raw), tz=UTC) if isinstance(raw, int | float) else raw
    if start is not None and end is not None and not (isinstance(created, datetime) and start <= created < end):
        return False
    if counter.scope == "k":
        return bool(row.get("api_key_id") == counter.scope_id)
    return subtree is not None and row.get("tenant_id") in subtree


def ledger_value(counter: Counter, unwritten: list[dict[str, Any]] | None = None) -> int:
    """What the counter must hold according to the ledger (plus rows handed off but not yet
    written, when given): the sum of ``cost_micro``, or the number of requests for quotas."""
    rows = UsageRecord.objects.all()
    subtree: list[int] | None = None
    if counter.scope == "k":
        rows = rows.filter(api_key_id=counter.scope_id)
    else:
        subtree = subtree_ids(counter.scope_id)
        rows = rows.filter(tenant_id__in=subtree)
    start, end = period_bounds(counter.period_key, counter.time_zone)
    if start is not None and end is not None:
        rows = rows.filter(created_at__gte=start, created_at__lt=end)
    # Raw rows past retention are pruned into sealed hourly rollups: count those too.
    sealed_rows = sealed_rollups(subtree, counter.scope_id if counter.scope == "k" else None, start, end)
    sealed = int(sealed_rows.aggregate(v=Sum("calls" if counter.kind == "q" else "cost_micro"))["v"] or 0)
    pending = [row for row in unwritten or () if _matches(counter, subtree, row)]
    ids = [str(row["request_id"]) for row in pending]
    # One statement, so one snapshot: a pending row that reached the ledger meanwhile is
    # counted in the total and subtracted again as "already written", never twice.
    if counter.kind == "q":
        agg = rows.aggregate(total=Count("id"), written=Count("id", filter=Q(request_id__in=ids)))
        return sealed + int(agg["total"] or 0) + len(pending) - int(agg["written"] or 0)
    agg = rows.aggregate(total=Sum("cost_micro"), written=Sum("cost_micro", filter=Q(request_id__in=ids)))
    pending_cost = sum(int(row.get("cost_micro") or 0) for row in pending)
    return sealed + int(agg["total"] or 0) + pending_cost - int(agg["written"] or 0)


def in_ledger(request_ids: Iterable[str]) -> set[str]:
    """Which of these requests have their usage row in the ledger."""
    ids = list(request_ids)
    return set(UsageRecord.objects.filter(request_id__in=ids).values_list("request_id", flat=True))

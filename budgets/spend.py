"""What the ledger says a counter must hold: the budgets' read side of the usage ledger.

PostgreSQL's usage ledger is the truth; the live counters (``budgets.counters``) are rebuilt from
it and checked against it, and a budget's spend (``budget_spend``, for alerts and the API) is
read from it. Every query budgets make of the ledger is here. Synchronous: call off the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.db.models import Count, Q, Sum
from django.utils import timezone

from budgets.models import Budget
from budgets.periods import Counter, period_bounds
from ledger import analytics
from ledger.models import UsageRecord
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
    sealed_rows = analytics.sealed_rollups(subtree, counter.scope_id if counter.scope == "k" else None, start, end)
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


# --- a budget's spend -----------------------------------------------------------------------------


def budget_tenant(budget: Budget) -> Tenant:
    if budget.tenant_id:
        assert budget.tenant is not None
        return budget.tenant
    assert budget.api_key is not None
    return budget.api_key.tenant


@dataclass(frozen=True)
class BudgetSpend:
    budget_id: int
    period: str
    period_key: str
    period_start: datetime | None
    period_end: datetime | None
    limit_micro: int
    spent_micro: int
    hard: bool

    @property
    def remaining_micro(self) -> int:
        return max(0, self.limit_micro - self.spent_micro)

    @property
    def percent(self) -> Decimal:
        if not self.limit_micro:
            return Decimal(100) if self.spent_micro else Decimal(0)
        return (Decimal(self.spent_micro) * 100 / Decimal(self.limit_micro)).quantize(Decimal("0.01"))


def budget_spend(budget: Budget, when: datetime | None = None) -> BudgetSpend:
    """What a budget's scope spent in the period ``when`` (default now) falls in, from the ledger."""
    when = when or timezone.now()
    tenant = budget_tenant(budget)
    start, end = analytics.period_bounds(budget.period, tenant.time_zone, when)
    if budget.tenant_id:
        spent = analytics.spend_micro(tenant_ids=subtree_ids(budget.tenant_id), start=start, end=end)
    else:
        spent = analytics.spend_micro(api_key_id=budget.api_key_id, start=start, end=end)
    return BudgetSpend(
        budget_id=budget.pk,
        period=budget.period,
        period_key=analytics.period_key(budget.period, tenant.time_zone, when),
        period_start=start,
        period_end=end,
        limit_micro=budget.limit_micro,
        spent_micro=spent,
        hard=budget.hard,
    )


def monthly_budget_micro(tenant: Tenant) -> int | None:
    """The tenant's monthly budget (for ``ledger.analytics.month_report``), if it has one: its hard
    budget, else its lowest soft one."""
    rows = Budget.objects.filter(tenant=tenant, period=Budget.Period.MONTH)
    budget = rows.order_by("-hard", "limit_micro").first()  # the hard cap, else the lowest alert level
    return None if budget is None else int(budget.limit_micro)

"""Budgets and plan quotas as counters: which counters a request touches and their periods.

A counter is named ``<scope><id>:<period>``:

- ``t12:m2026-11``  money spent by tenant 12's whole subtree in November (tenant 12's time zone)
- ``k7:d2026-11-22`` money spent by key 7 on 22 November (its tenant's time zone)
- ``t12:total``      money spent by tenant 12's subtree, ever
- ``q12:m2026-11``   requests made by tenant 12's subtree in November (plan quota)

Amounts are integer micro-USD (requests for ``q`` counters). Hard budgets and quotas carry a
limit; soft budgets are counted (for alerts and ``spend_status``) but never refuse. What a counter
must hold according to the ledger is ``budgets.spend.ledger_value``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from budgets.models import Budget
from tenants.keyinfo import KeyInfo

DAY_TTL = 3 * 86_400
MONTH_TTL = 63 * 86_400


@dataclass(frozen=True, slots=True)
class BudgetInfo:
    """A budget as the hot path sees it (``budgets.service.budgets_for``, cached per process)."""

    id: int
    scope: str  # "tenant" | "key"
    scope_id: int
    period: str  # day | month | total
    limit_micro: int
    hard: bool
    time_zone: str


@dataclass(frozen=True, slots=True)
class Counter:
    name: str
    kind: str  # "m" money (micro-USD) | "q" requests
    limit: int | None  # None: counted, never refuses (soft budget)
    ttl: int  # seconds the Redis key lives; 0 = for ever
    time_zone: str
    budget_id: int | None = None

    @property
    def scope(self) -> str:
        return self.name[0]

    @property
    def scope_id(self) -> int:
        return int(self.name[1:].split(":", 1)[0])

    @property
    def period_key(self) -> str:
        return self.name.split(":", 1)[1]


@lru_cache(maxsize=512)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def period_key(period: str, time_zone: str, when: datetime) -> str:
    """``d2026-11-22``, ``m2026-11`` or ``total``: the calendar period ``when`` falls in, locally."""
    if period == "total":
        return "total"
    # Every time zone's offset is a whole number of minutes, so a period never changes inside a
    # UTC minute: the key is computed once per minute (each request asks for several).
    return _period_key_at(period, time_zone, int(when.timestamp()) // 60)


@lru_cache(maxsize=1024)
def _period_key_at(period: str, time_zone: str, minute: int) -> str:
    local = datetime.fromtimestamp(minute * 60, UTC).astimezone(_zone(time_zone))
    if period == "day":
        return f"d{local:%Y-%m-%d}"
    if period == "month":
        return f"m{local:%Y-%m}"
    raise ValueError(f"unknown budget period {period!r}")


def period_bounds(key: str, time_zone: str) -> tuple[datetime | None, datetime | None]:
    """The UTC instants a period key starts (inclusive) and ends (exclusive); None for ``total``."""
    if key == "total":
        return None, None
    zone = _zone(time_zone)
    if key.startswith("d"):
        day = date.fromisoformat(key[1:])
        nxt = day + timedelta(days=1)
    elif key.startswith("m"):
        year, month = (int(p) for p in key[1:].split("-"))
        day = date(year, month, 1)
        nxt = date(year + (month == 12), month % 12 + 1, 1)
    else:
        raise ValueError(f"bad period key {key!r}")
    start = datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone).astimezone(UTC)
    return start, end


def _ttl(period: str) -> int:
    return {"day": DAY_TTL, "month": MONTH_TTL}.get(period, 0)


def counters_for(key: KeyInfo, budgets: Iterable[BudgetInfo], when: datetime) -> list[Counter]:
    """Every counter a request made with ``key`` at ``when`` moves: ``budgets`` (the key's, its
    tenant's and each ancestor's: ``budgets.service.budgets_for``) and the plan request quotas
    along the tenant chain."""
    found: dict[str, Counter] = {}
    for budget in budgets:
        prefix = "k" if budget.scope == "key" else "t"
        name = f"{prefix}{budget.scope_id}:{period_key(budget.period, budget.time_zone, when)}"
        limit = budget.limit_micro if budget.hard else None
        previous = found.get(name)
        if previous is not None and previous.limit is not None and (limit is None or previous.limit < limit):
            continue
        found[name] = Counter(name, "m", limit, _ttl(budget.period), budget.time_zone, budget.id)
    for tenant in key.lineage:
        if tenant.monthly_request_quota is not None:
            name = f"q{tenant.id}:{period_key('month', tenant.time_zone, when)}"
            found[name] = Counter(name, "q", int(tenant.monthly_request_quota), MONTH_TTL, tenant.time_zone)
    return sorted(found.values(), key=lambda c: c.name)


def budget_counter(budget: Budget, when: datetime | None = None) -> Counter:
    """The counter of a Budget row for the period ``when`` (default now) falls in."""
    tenant = budget.tenant if budget.tenant_id else budget.api_key.tenant  # type: ignore[union-attr]
    assert tenant is not None
    prefix = "t" if budget.tenant_id else "k"
    scope_id = budget.tenant_id if budget.tenant_id else budget.api_key_id
    name = f"{prefix}{scope_id}:{period_key(budget.period, tenant.time_zone, when or datetime.now(UTC))}"
    return Counter(name, "m", budget.limit_micro if budget.hard else None, _ttl(budget.period), tenant.time_zone)

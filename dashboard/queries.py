"""Read queries behind the dashboard's pages (selectors); every figure comes from the ledger
through ``ledger.analytics`` and ``budgets.spend``, so the dashboard and the CLI reports agree."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.db.models import Count, F, Q, Sum, Value
from django.db.models.functions import Coalesce, NullIf, TruncDate
from django.utils import timezone

from budgets.models import AlertSent, Budget
from budgets.spend import BudgetSpend, budget_spend
from core.money import format_usd_short
from ledger import analytics
from ledger.models import UsageRecord
from tenants.models import ApiKey, Tenant

__all__ = [
    "BudgetLine",
    "RouteView",
    "attempt_rows",
    "budget_lines",
    "child_spend",
    "daily_spend_by_model",
    "forecast_micro",
    "period_bounds",
    "route_view",
]


def period_bounds(tenant: Tenant, now: datetime | None = None) -> tuple[datetime, datetime]:
    """This calendar month in the tenant's time zone (UTC bounds)."""
    start, end = analytics.period_bounds(analytics.MONTH, tenant.time_zone, now or timezone.now())
    assert start is not None and end is not None
    return start, end


def forecast_micro(spent: int, start: datetime | None, end: datetime | None, now: datetime) -> int | None:
    """Spend so far extrapolated linearly to the end of the period (None for all-time budgets)."""
    if start is None or end is None:
        return None
    elapsed = (min(now, end) - start).total_seconds()
    length = (end - start).total_seconds()
    if elapsed <= 0:
        return 0
    # Less than an hour in, a straight line says little: show the spend itself until then.
    elapsed = max(elapsed, min(3600.0, length))
    return int(Decimal(spent) * Decimal(length) / Decimal(elapsed))


@dataclass(frozen=True)
class BudgetLine:
    budget: Budget
    owner: str  # the tenant slug, or "key <prefix>"
    spend: BudgetSpend
    forecast_micro: int | None

    @property
    def over(self) -> bool:
        return self.forecast_micro is not None and self.forecast_micro > self.spend.limit_micro

    @property
    def bar_percent(self) -> int:
        return int(min(Decimal(100), self.spend.percent))

    @property
    def limit_usd(self) -> str:
        return format_usd_short(self.spend.limit_micro)

    @property
    def spent_usd(self) -> str:
        return format_usd_short(self.spend.spent_micro)

    @property
    def forecast_usd(self) -> str:
        return "" if self.forecast_micro is None else format_usd_short(self.forecast_micro)


def budget_lines(tenant_ids: list[int], now: datetime | None = None) -> list[BudgetLine]:
    """Every budget on the tenants ``tenant_ids`` and on their keys, with spend and forecast."""
    now = now or timezone.now()
    rows = (
        Budget.objects.filter(Q(tenant_id__in=tenant_ids) | Q(api_key__tenant_id__in=tenant_ids))
        .select_related("tenant", "api_key__tenant")
        .order_by("tenant__slug", "api_key__prefix", "period", "-hard", "limit_micro")
    )
    lines = []
    for budget in rows:
        spend = budget_spend(budget, now)
        owner = (
            budget.tenant.slug
            if budget.tenant is not None
            else f"key {budget.api_key.prefix if budget.api_key else ''}"
        )
        lines.append(
            BudgetLine(
                budget, owner, spend, forecast_micro(spend.spent_micro, spend.period_start, spend.period_end, now)
            )
        )
    return lines


def recent_alerts(tenant_ids: list[int], limit: int = 50) -> list[AlertSent]:
    rows = AlertSent.objects.filter(
        Q(budget__tenant_id__in=tenant_ids) | Q(budget__api_key__tenant_id__in=tenant_ids)
    ).select_related("budget__tenant", "budget__api_key")
    return list(rows.order_by("-created_at")[:limit])


def daily_spend_by_model(tenant: Tenant, start: datetime, end: datetime) -> dict[str, Any]:
    """Chart data: the local days of [start, end) and, per model, the spend of each day (USD)."""
    zone = ZoneInfo(tenant.time_zone)
    ids = analytics.subtree_ids(tenant.pk)
    per: dict[tuple[date, str], int] = {}
    raw = (
        UsageRecord.objects.filter(tenant_id__in=ids, created_at__gte=start, created_at__lt=end)
        .annotate(
            day=TruncDate("created_at", tzinfo=zone),
            m=Coalesce(NullIf(F("served_model"), Value("")), F("requested_model")),
        )
        .values("day", "m")
        .annotate(cost=Coalesce(Sum("cost_micro"), Value(0)))
        .order_by()
    )
    sealed = (
        analytics.sealed_rollups(ids, None, start, end)
        .annotate(day=TruncDate("hour", tzinfo=zone), m=F("model"))
        .values("day", "m")
        .annotate(cost=Coalesce(Sum("cost_micro"), Value(0)))
        .order_by()
    )
    for row in [*raw, *sealed]:
        key = (row["day"], str(row["m"]))
        per[key] = per.get(key, 0) + int(row["cost"])
    first = start.astimezone(zone).date()
    last = min(end, timezone.now()).astimezone(zone).date()
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    models = sorted({m for _, m in per})
    return {
        "labels": [d.isoformat() for d in days],
        "datasets": [{"label": m, "data": [round(per.get((d, m), 0) / 1_000_000, 6) for d in days]} for m in models],
    }


def child_spend(tenant: Tenant, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Each direct child of ``tenant`` with its subtree's spend and requests in [start, end)."""
    out = []
    for child in tenant.children.filter(is_active=True).order_by("slug"):
        ids = analytics.subtree_ids(child.pk)
        spent = analytics.spend_micro(tenant_ids=ids, start=start, end=end)
        requests = UsageRecord.objects.filter(tenant_id__in=ids, created_at__gte=start, created_at__lt=end).count()
        out.append({"tenant": child, "spent_micro": spent, "spent_usd": format_usd_short(spent), "requests": requests})
    return out


def tree(tenant: Tenant, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """The subtree below ``tenant``, depth first, each node with its own subtree's spend."""
    rows: list[dict[str, Any]] = []

    def walk(node: Tenant, depth: int) -> None:
        ids = analytics.subtree_ids(node.pk)
        spent = analytics.spend_micro(tenant_ids=ids, start=start, end=end)
        rows.append({"tenant": node, "depth": depth, "spent_micro": spent, "spent_usd": format_usd_short(spent)})
        for child in node.children.filter(is_active=True).order_by("slug"):
            walk(child, depth + 1)

    walk(tenant, 0)
    return rows


def key_counts(tenant_ids: list[int], start: datetime) -> dict[int, tuple[int, int]]:
    """{key id: (requests, cost_micro)} since ``start``."""
    rows = (
        UsageRecord.objects.filter(tenant_id__in=tenant_ids, created_at__gte=start)
        .values("api_key_id")
        .annotate(n=Count("id"), c=Coalesce(Sum("cost_micro"), Value(0)))
        .order_by()
    )
    return {r["api_key_id"]: (int(r["n"]), int(r["c"])) for r in rows if r["api_key_id"] is not None}


def keys_of(tenant_ids: list[int]) -> list[ApiKey]:
    return list(
        ApiKey.objects.filter(tenant_id__in=tenant_ids).select_related("tenant", "user").order_by("-created_at")
    )


# --- a request's route decision and upstream attempts ---------------------------------------------

SCALAR = str | int | float | bool | None


@dataclass(frozen=True)
class RouteView:
    """``UsageRecord.route`` (the routing policy's decision, ``gateway.pipeline.route``) laid out
    for the request page: the rule, the routed model, each candidate with why it was skipped, the
    experiment arm if any, and the outcome (rejected by the rule, or who served the request)."""

    policy: str
    rule: str
    requested: str
    model: str
    candidates: list[dict[str, Any]]
    experiment: dict[str, Any]
    settings: list[tuple[str, str]]  # timeouts, retries, tags, errors: label -> text
    outcome: str


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value)
    return "" if value is None else str(value)


def route_view(record: UsageRecord) -> RouteView | None:
    """None when no routing policy applied to the request (the row's ``route`` is empty)."""
    decision = record.route if isinstance(record.route, dict) else {}
    if not decision:
        return None
    # ``served``/``outcome``: what dispatch did with the decision (gateway.pipeline.record); rows
    # written before those keys existed fall back to the ledger row's provider and model.
    served = _text(decision.get("served")) or "/".join(p for p in (record.provider, record.served_model) if p)
    how = _text(decision.get("outcome"))  # primary, or fallback:N
    if decision.get("rejected"):
        outcome = f"rejected by the rule: {_text(decision['rejected'])}"
    elif served:
        outcome = f"{record.status}: served by {served}" + (f" ({how})" if how else "")
    else:
        outcome = f"{record.status}: no upstream answered"
    candidates = [
        {
            "target": _text(c.get("target")),
            "role": _text(c.get("role")),
            "model": _text(c.get("model")),
            "deployment": _text(c.get("deployment")),
            "timeouts": _text(c.get("timeouts")),
            "fate": (
                f"skipped: {_text(c['skipped'])}"
                + (f" (weight {_text(c['weight'])})" if c.get("weight") is not None else "")
                if c.get("skipped")
                else _text(c.get("note")) or "candidate"
            ),
            "skipped": bool(c.get("skipped")),
        }
        for c in decision.get("candidates") or []
        if isinstance(c, dict)
    ]
    extra = [
        (label, _text(decision[name]))
        for name, label in (
            ("timeouts", "Timeouts (s)"),
            ("retries", "Retries"),
            ("tags", "Tags"),
            ("errors", "Errors"),
        )
        if decision.get(name) not in (None, "", [], {})
    ]
    experiment = decision.get("experiment")
    return RouteView(
        policy=_text(decision.get("policy")),
        rule=_text(decision.get("rule")),
        requested=_text(decision.get("requested")) or record.requested_model,
        model=_text(decision.get("model")),
        candidates=candidates,
        experiment=experiment if isinstance(experiment, dict) else {},
        settings=extra,
        outcome=outcome,
    )


def attempt_rows(record: UsageRecord) -> list[dict[str, SCALAR]]:
    """``UsageRecord.attempts`` (one per upstream attempt, ``gateway.pipeline.dispatch``), in order."""
    attempts = record.attempts if isinstance(record.attempts, list) else []
    keys = ("n", "provider", "model", "why", "start_ms", "ms", "outcome", "status", "error")
    return [{k: a.get(k) for k in keys} for a in attempts if isinstance(a, dict)]

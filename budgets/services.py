"""Writes to budgets. Each runs in one transaction, writes an audit row through ``tenants.audit``
and announces the change to every gateway process after commit. The admin, ``can budgets``, the
REST API and ``can apply`` all write budgets through these functions.

An owner (a tenant, counting its subtree, or one key) has at most one *hard* budget per period,
the cap that refuses requests, and any number of *soft* budgets at distinct limits, alert levels
that never refuse. Nothing here weakens a hard budget (raises its limit, turns it soft, deletes
it) unless the caller passes ``allow_weaken=True``; ``WeakenRefused`` says what was refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from budgets.models import Budget
from core import egress, invalidation
from core.money import format_usd_short
from tenants import audit
from tenants.models import ApiKey, Tenant

__all__ = ["BudgetChange", "WeakenRefused", "budget_delete", "budget_put", "budget_set", "budget_update", "describe"]


class WeakenRefused(ValueError):
    """The change would weaken a hard budget and ``allow_weaken`` was not given."""


@dataclass(frozen=True, slots=True)
class BudgetChange:
    """What one write did: the budget as it was (None: created) and as it is (None: deleted)."""

    budget: Budget
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    @property
    def fields(self) -> dict[str, tuple[Any, Any]]:
        """The fields that changed, ``name: (before, after)`` (every field on create or delete)."""
        old, new = self.before or {}, self.after or {}
        return {k: (old.get(k), new.get(k)) for k in {**old, **new} if old.get(k) != new.get(k)}


def describe(budget: Budget) -> dict[str, Any]:
    """A budget's settings (no secret: only whether one is set), as ``BudgetChange`` keeps them."""
    return {
        "period": budget.period,
        "limit_micro": budget.limit_micro,
        "hard": budget.hard,
        "alert_thresholds": list(budget.alert_thresholds or []),
        "alert_emails": list(budget.alert_emails or []),
        "webhook_url": budget.webhook_url,
        "webhook_secret_set": bool(budget.webhook_secret),
    }


def _label(budget: Budget) -> str:
    return f"{format_usd_short(budget.limit_micro)} USD per {budget.period}"


def _check_weaken(old: Budget | None, *, limit_micro: int, hard: bool, allow_weaken: bool) -> None:
    if old is None or not old.hard or allow_weaken:
        return
    if not hard:
        raise WeakenRefused(f"would turn the hard budget of {_label(old)} soft")
    if limit_micro > old.limit_micro:
        raise WeakenRefused(
            f"would raise the hard budget from {format_usd_short(old.limit_micro)} to "
            f"{format_usd_short(limit_micro)} USD per {old.period}"
        )


def _owner(budget: Budget) -> tuple[Tenant, str]:
    if budget.tenant_id:
        assert budget.tenant is not None
        return budget.tenant, budget.tenant.slug
    assert budget.api_key is not None
    return budget.api_key.tenant, budget.api_key.prefix


def _validate(limit_micro: int, period: str) -> None:
    if isinstance(limit_micro, bool) or not isinstance(limit_micro, int) or limit_micro < 0:
        raise ValueError("limit_micro must be a non-negative integer (micro-USD)")
    if period not in Budget.Period.values:
        raise ValueError(f"period must be one of {', '.join(Budget.Period.values)}")


def _save(
    budget: Budget,
    *,
    created: bool,
    before: dict[str, Any] | None,
    alert_thresholds: list[int] | None,
    alert_emails: list[str] | None,
    webhook_url: str | None,
    webhook_secret: str | None,
    actor_label: str,
) -> BudgetChange:
    if alert_thresholds is not None:
        budget.alert_thresholds = list(alert_thresholds)
    if alert_emails is not None:
        budget.alert_emails = list(alert_emails)
    if webhook_url is not None:
        try:
            egress.validate_url(webhook_url)  # checked again when an alert is sent
        except ValidationError as exc:
            raise ValidationError({"webhook_url": exc.error_list}) from None
        budget.webhook_url = webhook_url
    if webhook_secret is not None:
        budget.webhook_secret = webhook_secret
    budget.full_clean()
    budget.save()
    change = BudgetChange(budget, before, describe(budget))
    if created or change.fields:
        owner, target = _owner(budget)
        audit.record(
            "budget.create" if created else "budget.update",
            tenant=owner,
            target=target,
            data={"period": budget.period, "limit_micro": budget.limit_micro, "hard": budget.hard}
            | ({} if created else {"changed": {k: list(v) for k, v in change.fields.items()}}),
            actor_label=actor_label,
        )
        invalidation.announce_on_commit()
    return change


def budget_set(
    *,
    tenant: Tenant | None = None,
    api_key: ApiKey | None = None,
    period: str = "month",
    limit_micro: int,
    hard: bool = True,
    alert_thresholds: list[int] | None = None,
    alert_emails: list[str] | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    allow_weaken: bool = False,
    actor_label: str = "",
) -> Budget:
    """``budget_put``, returning the budget."""
    return budget_put(
        tenant=tenant,
        api_key=api_key,
        period=period,
        limit_micro=limit_micro,
        hard=hard,
        alert_thresholds=alert_thresholds,
        alert_emails=alert_emails,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        allow_weaken=allow_weaken,
        actor_label=actor_label,
    ).budget


@transaction.atomic
def budget_put(
    *,
    tenant: Tenant | None = None,
    api_key: ApiKey | None = None,
    period: str = "month",
    limit_micro: int,
    hard: bool = True,
    alert_thresholds: list[int] | None = None,
    alert_emails: list[str] | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    allow_weaken: bool = False,
    actor_label: str = "",
) -> BudgetChange:
    """Create or update a budget of a tenant (its whole subtree) or of a key for one period.

    ``hard=True`` sets the owner's one hard budget for the period (raising its limit needs
    ``allow_weaken``); ``hard=False`` sets the soft alert level at ``limit_micro`` (another limit
    is another level) and never touches the hard budget. Amounts are integer micro-USD. Every
    gateway process reloads budgets after commit; live counters need no change (limits travel
    with each request, new counters are built from the ledger on first use)."""
    if (tenant is None) == (api_key is None):
        raise ValueError("a budget belongs to exactly one tenant or one key")
    _validate(limit_micro, period)
    lookup: dict[str, Any] = {"tenant": tenant} if tenant is not None else {"api_key": api_key}
    rows = Budget.objects.select_for_update(of=("self",)).select_related("tenant", "api_key__tenant")
    rows = rows.filter(period=period, hard=hard, **lookup)
    budget = rows.first() if hard else rows.filter(limit_micro=limit_micro).first()
    _check_weaken(budget, limit_micro=limit_micro, hard=hard, allow_weaken=allow_weaken)
    before = describe(budget) if budget is not None else None
    created = budget is None
    if budget is None:
        budget = Budget(period=period, limit_micro=limit_micro, hard=hard, **lookup)
    budget.limit_micro = limit_micro
    return _save(
        budget,
        created=created,
        before=before,
        alert_thresholds=alert_thresholds,
        alert_emails=alert_emails,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        actor_label=actor_label,
    )


@transaction.atomic
def budget_update(
    budget: Budget,
    *,
    limit_micro: int | None = None,
    hard: bool | None = None,
    alert_thresholds: list[int] | None = None,
    alert_emails: list[str] | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    allow_weaken: bool = False,
    actor_label: str = "",
) -> BudgetChange:
    """Change one budget row (its owner and period stay). Raising a hard budget's limit or
    turning it soft needs ``allow_weaken``; a second hard budget on the same owner and period,
    or two soft ones at one limit, is a ``ValidationError``."""
    rows = Budget.objects.select_for_update(of=("self",)).select_related("tenant", "api_key__tenant")
    stored = rows.get(pk=budget.pk)
    new_limit = stored.limit_micro if limit_micro is None else limit_micro
    new_hard = stored.hard if hard is None else hard
    _validate(new_limit, stored.period)
    _check_weaken(stored, limit_micro=new_limit, hard=new_hard, allow_weaken=allow_weaken)
    before = describe(stored)
    stored.limit_micro = new_limit
    stored.hard = new_hard
    return _save(
        stored,
        created=False,
        before=before,
        alert_thresholds=alert_thresholds,
        alert_emails=alert_emails,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        actor_label=actor_label,
    )


@transaction.atomic
def budget_delete(*, budget: Budget, allow_weaken: bool = False, actor_label: str = "") -> BudgetChange:
    """Remove a budget. A hard one only with ``allow_weaken`` (its cap goes with it)."""
    if budget.hard and not allow_weaken:
        raise WeakenRefused(f"would delete the hard budget of {_label(budget)}")
    owner, target = _owner(budget)
    before = describe(budget)
    data = {"period": budget.period, "limit_micro": budget.limit_micro, "hard": budget.hard}
    budget.delete()
    audit.record("budget.delete", tenant=owner, target=target, data=data, actor_label=actor_label)
    invalidation.announce_on_commit()
    return BudgetChange(budget, before, None)

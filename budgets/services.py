"""Writes to budgets. Each runs in one transaction, writes an audit row through ``tenants.audit``
and announces the change to every gateway process after commit. The admin, ``can budgets``, the
REST API and ``can apply`` all write budgets through these functions."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from budgets.models import Budget
from core import egress, invalidation
from tenants import audit
from tenants.models import ApiKey, Tenant


@transaction.atomic
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
    actor_label: str = "",
) -> Budget:
    """Create or update the budget of a tenant (its whole subtree) or of a key for one period.

    Amounts are integer micro-USD. Every gateway process reloads budgets after commit; live
    counters need no change (limits travel with each request, new counters are built from the
    ledger on first use)."""
    if (tenant is None) == (api_key is None):
        raise ValueError("a budget belongs to exactly one tenant or one key")
    if isinstance(limit_micro, bool) or not isinstance(limit_micro, int) or limit_micro < 0:
        raise ValueError("limit_micro must be a non-negative integer (micro-USD)")
    if period not in Budget.Period.values:
        raise ValueError(f"period must be one of {', '.join(Budget.Period.values)}")
    lookup: dict[str, Any] = {"tenant": tenant} if tenant is not None else {"api_key": api_key}
    budget = Budget.objects.select_for_update().filter(period=period, **lookup).first()
    created = budget is None
    if budget is None:
        budget = Budget(period=period, limit_micro=limit_micro, **lookup)
    budget.limit_micro = limit_micro
    budget.hard = hard
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
    owner = tenant if tenant is not None else api_key.tenant  # type: ignore[union-attr]
    audit.record(
        "budget.create" if created else "budget.update",
        tenant=owner,
        target=tenant.slug if tenant is not None else api_key.prefix,  # type: ignore[union-attr]
        data={"period": period, "limit_micro": limit_micro, "hard": hard},
        actor_label=actor_label,
    )
    invalidation.announce_on_commit()
    return budget


@transaction.atomic
def budget_delete(*, budget: Budget, actor_label: str = "") -> None:
    owner = budget.tenant if budget.tenant_id else budget.api_key.tenant  # type: ignore[union-attr]
    target = budget.tenant.slug if budget.tenant_id else budget.api_key.prefix  # type: ignore[union-attr]
    data = {"period": budget.period, "limit_micro": budget.limit_micro, "hard": budget.hard}
    budget.delete()
    audit.record("budget.delete", tenant=owner, target=target, data=data, actor_label=actor_label)
    invalidation.announce_on_commit()

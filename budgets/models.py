"""Budgets on tenants and keys, the PostgreSQL fallback's counters and reservations, and the
alerts sent when a budget crosses a threshold.

The tables keep the names they had before budgets got their own app (``tenants_budget``,
``tenants_budgetcounter``, ``tenants_budgetreservation``, ``gateway_alertsent``): the move was a
change of Django state only, no row was copied.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from core.money import format_usd_short
from tenants.models import ApiKey, Tenant

__all__ = ["AlertSent", "Budget", "BudgetCounter", "BudgetReservation"]


def _default_thresholds() -> list[int]:
    return [50, 80, 100]


class Budget(models.Model):
    """A spend limit on a tenant (counting its whole subtree) or on one key, per period.

    An owner has at most one *hard* budget per period (the cap: requests that could go past it are
    refused with 402) and any number of *soft* ones at distinct limits (alert levels: never refuse,
    alert at their thresholds). Amounts are integer micro-USD. Day and month periods are calendar
    periods in the tenant's time zone; TOTAL never resets.
    """

    class Period(models.TextChoices):
        DAY = "day"
        MONTH = "month"
        TOTAL = "total"

    tenant = models.ForeignKey(Tenant, null=True, blank=True, on_delete=models.CASCADE, related_name="budgets")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.CASCADE, related_name="budgets")
    period = models.CharField(max_length=10, choices=Period.choices, default=Period.MONTH)
    limit_micro = models.PositiveBigIntegerField(help_text="Limit in micro-USD (1 USD = 1,000,000)")
    hard = models.BooleanField(default=True, help_text="Hard: refuse with 402. Soft: alert only.")
    alert_thresholds = models.JSONField(default=_default_thresholds, blank=True, help_text="Percentages")
    alert_emails = models.JSONField(default=list, blank=True)
    webhook_url = models.URLField(blank=True, default="")
    webhook_secret = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "tenants_budget"
        constraints = [
            models.CheckConstraint(
                condition=(models.Q(tenant__isnull=False, api_key__isnull=True))
                | (models.Q(tenant__isnull=True, api_key__isnull=False)),
                name="budget_exactly_one_scope",
            ),
            # At most one hard budget (the cap) per owner and period...
            models.UniqueConstraint(
                fields=["tenant", "period"], condition=models.Q(hard=True), name="budget_one_hard_tenant_period"
            ),
            models.UniqueConstraint(
                fields=["api_key", "period"], condition=models.Q(hard=True), name="budget_one_hard_key_period"
            ),
            # ... and any number of soft ones (alert levels), each at its own limit.
            models.UniqueConstraint(
                fields=["tenant", "period", "limit_micro"],
                condition=models.Q(hard=False),
                name="budget_soft_tenant_period_limit",
            ),
            models.UniqueConstraint(
                fields=["api_key", "period", "limit_micro"],
                condition=models.Q(hard=False),
                name="budget_soft_key_period_limit",
            ),
        ]

    def __str__(self) -> str:
        scope = f"tenant {self.tenant}" if self.tenant_id else f"key {self.api_key}"
        kind = "hard" if self.hard else "soft"
        return f"{scope}: {format_usd_short(self.limit_micro)} USD per {self.period} ({kind})"


class BudgetCounter(models.Model):
    """PostgreSQL-only budget enforcement (Redis unreachable, policy ``degrade``): one row per
    counter, e.g. ``t12:m2026-11`` (tenant 12, November in its time zone). ``value`` is settled
    spend plus open reservations, in micro-USD (or requests for ``q`` quota counters). Rows are
    re-synced from the usage ledger the first time a process touches them in an outage, and
    handed back to Redis (``handed_back_at``) when a Redis counter of the same name is built."""

    name = models.CharField(max_length=100, unique=True)
    value = models.BigIntegerField(default=0)
    synced_at = models.DateTimeField(default=timezone.now)
    #: When a Redis counter of this name was last built. A process still degraded since before
    #: then must not reserve here any more: Redis is back and counts this budget again.
    handed_back_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "tenants_budgetcounter"

    def __str__(self) -> str:
        return f"{self.name}={self.value}"


class BudgetReservation(models.Model):
    """A reservation made by the PostgreSQL path, by request id: open, swept (lease expired) or
    settled. Settled rows stay until the request's usage row is in the ledger, so a re-sync counts
    them exactly once (as ``actual_micro``) while the ledger writer catches up."""

    request_id = models.CharField(max_length=64, unique=True)
    parts = models.JSONField(default=list, help_text='[[counter name, amount, kind "m"|"q"], ...]')
    expires_at = models.DateTimeField(db_index=True)
    swept = models.BooleanField(default=False, help_text="Released by the sweeper; a late settle charges actual")
    settled_at = models.DateTimeField(null=True, blank=True, db_index=True)
    actual_micro = models.BigIntegerField(default=0)
    actual_requests = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "tenants_budgetreservation"

    def __str__(self) -> str:
        return self.request_id


class AlertSent(models.Model):
    """One budget threshold crossed in one period. Unique, so each threshold alerts once per period."""

    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="alerts_sent")
    period_key = models.CharField(max_length=20, help_text="2026-11, 2026-11-22 or total")
    threshold = models.PositiveSmallIntegerField(help_text="Percent of the limit")
    spend_micro = models.BigIntegerField(help_text="Spend when the threshold was found crossed")
    limit_micro = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)
    notify = models.BooleanField(default=True, help_text="False when a higher threshold crossed at the same time")
    email_sent_at = models.DateTimeField(null=True, blank=True)
    webhook_sent_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        db_table = "gateway_alertsent"
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["budget", "period_key", "threshold"], name="alert_once_per_period"),
        ]

    def __str__(self) -> str:
        return f"budget {self.budget_id} {self.period_key} {self.threshold}%"

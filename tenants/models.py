"""Tenants (a hierarchy: organisation, teams, projects), their API keys, plans and the audit log."""

from __future__ import annotations

import zoneinfo

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

__all__ = ["ApiKey", "AuditEvent", "Budget", "BudgetCounter", "BudgetReservation", "Plan", "Tenant"]


def _validate_time_zone(value: str) -> None:
    if value not in zoneinfo.available_timezones():
        raise ValidationError(f"{value!r} is not an IANA time zone")


class Plan(models.Model):
    """A tier a tenant is on: default limits and request quotas."""

    slug = models.SlugField(unique=True)
    name = models.CharField(max_length=100)
    monthly_request_quota = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Requests per calendar month; empty for unlimited."
    )
    rpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Default requests per minute")
    tpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Default tokens per minute")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.name


class Tenant(models.Model):
    class Kind(models.TextChoices):
        ORGANISATION = "organisation"
        TEAM = "team"
        PROJECT = "project"

    slug = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.ORGANISATION)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="children")
    plan = models.ForeignKey(Plan, null=True, blank=True, on_delete=models.SET_NULL, related_name="tenants")
    time_zone = models.CharField(max_length=64, default="UTC", validators=[_validate_time_zone])
    stripe_customer_id = models.CharField(max_length=255, blank=True, default="")
    rpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute, all keys")
    tpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Tokens per minute, all keys")
    allowed_models = models.JSONField(
        default=list, blank=True, help_text="Public model names this tenant may use; empty for all."
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["slug"]
        constraints = [
            models.CheckConstraint(condition=~models.Q(parent=models.F("id")), name="tenant_not_own_parent"),
        ]

    def __str__(self) -> str:
        return self.slug

    def ancestors(self) -> list[Tenant]:
        """This tenant's parents, nearest first (not including itself)."""
        chain: list[Tenant] = []
        seen = {self.pk}
        node = self.parent
        while node is not None and node.pk not in seen:
            chain.append(node)
            seen.add(node.pk)
            node = node.parent
        return chain

    def lineage_ids(self) -> list[int]:
        """Own id, then every ancestor's, nearest first."""
        return [self.pk, *(t.pk for t in self.ancestors())]

    def clean(self) -> None:
        if self.pk and self.parent_id:
            node = self.parent
            while node is not None:
                if node.pk == self.pk:
                    raise ValidationError({"parent": "A tenant cannot be its own ancestor."})
                node = node.parent


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def usable(self) -> ApiKeyQuerySet:
        now = timezone.now()
        return self.filter(revoked_at__isnull=True, tenant__is_active=True).filter(
            models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=now)
        )


class ApiKey(models.Model):
    """A key issued to a tenant. Only the public prefix and a keyed hash are stored."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="api_keys"
    )
    name = models.CharField(max_length=200, blank=True, default="")
    prefix = models.CharField(max_length=32, unique=True, help_text="Public part, safe to show")
    hashed_secret = models.CharField(max_length=64, help_text="HMAC-SHA256 of the whole key, hex")
    scopes = models.JSONField(
        default=dict,
        blank=True,
        help_text='{"models": ["gpt-4o", ...], "endpoints": ["chat", "embeddings", ...]}; empty list or absent = all',
    )
    rpm_limit = models.PositiveIntegerField(null=True, blank=True)
    tpm_limit = models.PositiveIntegerField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    rotated_from = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="rotated_to"
    )
    created_at = models.DateTimeField(default=timezone.now)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or self.tenant.slug})"

    @property
    def is_usable(self) -> bool:
        now = timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class AuditEvent(models.Model):
    """One row per change made through a service function."""

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    actor_label = models.CharField(max_length=200, blank=True, default="", help_text="e.g. cli, apply, api")
    tenant = models.ForeignKey(Tenant, null=True, blank=True, on_delete=models.SET_NULL)
    action = models.CharField(max_length=100)
    target = models.CharField(max_length=200, blank=True, default="")
    data = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M} {self.action} {self.target}"


def _default_thresholds() -> list[int]:
    return [50, 80, 100]


class Budget(models.Model):
    """A spend limit on a tenant (counting its whole subtree) or on one key, per period.

    Amounts are integer micro-USD. Day and month periods are calendar periods in the tenant's
    time zone; TOTAL never resets.
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
        constraints = [
            models.CheckConstraint(
                condition=(models.Q(tenant__isnull=False, api_key__isnull=True))
                | (models.Q(tenant__isnull=True, api_key__isnull=False)),
                name="budget_exactly_one_scope",
            ),
            models.UniqueConstraint(fields=["tenant", "period"], name="budget_unique_tenant_period"),
            models.UniqueConstraint(fields=["api_key", "period"], name="budget_unique_key_period"),
        ]

    def __str__(self) -> str:
        scope = f"tenant {self.tenant}" if self.tenant_id else f"key {self.api_key}"
        return f"{scope}: {self.limit_micro / 1_000_000:.2f} USD per {self.period}"


class BudgetCounter(models.Model):
    """PostgreSQL-only budget enforcement (Redis unreachable, policy ``degrade``): one row per
    counter, e.g. ``t12:m2026-11`` (tenant 12, November in its time zone). ``value`` is settled
    spend plus open reservations, in micro-USD (or requests for ``q`` quota counters). Rows are
    re-synced from the usage ledger the first time a process touches them in an outage."""

    name = models.CharField(max_length=100, unique=True)
    value = models.BigIntegerField(default=0)
    synced_at = models.DateTimeField(default=timezone.now)

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

    def __str__(self) -> str:
        return self.request_id

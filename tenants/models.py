"""Tenants (a hierarchy: organisation, teams, projects), their API keys, plans and the audit log."""

from __future__ import annotations

import zoneinfo

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

__all__ = ["ApiKey", "AuditChain", "AuditEvent", "Plan", "Tenant"]


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


class CacheScope(models.TextChoices):
    TENANT = "tenant", "the tenant (every key of it)"
    KEY = "key", "each key its own"
    TREE = "tree", "the whole tenant tree (shared up to the root)"
    GLOBAL = "global", "every tenant that says global"


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
    require_otp = models.BooleanField(
        default=False,
        help_text="Members of this tenant (and of its subtree) need a TOTP second factor in the dashboard.",
    )
    cache_enabled = models.BooleanField(
        null=True,
        blank=True,
        help_text="The response cache for every model of this tenant and its subtree: on, off, or unset (as"
        " each model says; a nearer tenant or the key decides first)",
    )
    cache_scope = models.CharField(
        max_length=10,
        choices=CacheScope.choices,
        default=CacheScope.TENANT,
        help_text="Whose cached answers this tenant's keys share: the tenant's (default), each key its own,"
        " the whole tenant tree's, or everyone's (sharing is an explicit operator choice)",
    )
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


#: The endpoint names a key's ``endpoints`` scope may list (the /v1 routes, ``models``, and
#: ``usage:read`` for the request log API); the admin, the CLI and the REST API check against it.
KNOWN_ENDPOINTS = (
    "chat",
    "completions",
    "embeddings",
    "messages",
    "responses",
    "images",
    "transcriptions",
    "speech",
    "moderations",
    "models",
    "usage:read",
)


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
    cache_enabled = models.BooleanField(
        null=True, blank=True, help_text="The response cache for this key: on, off, or unset (as its tenant says)"
    )
    cache_own = models.BooleanField(
        default=False, help_text="This key's cached answers are its own, not shared with its tenant's other keys"
    )
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
    # Who and from where, as they were at the time (the actor FK goes NULL if the user is deleted).
    actor_name = models.CharField(max_length=150, blank=True, default="", help_text="the actor's username then")
    origin = models.CharField(
        max_length=20, blank=True, default="", help_text="admin, api, dashboard, cli, task, http, or empty"
    )
    address = models.CharField(max_length=255, blank=True, default="", help_text="client address, or the host")
    user_agent = models.CharField(max_length=300, blank=True, default="", help_text="user agent, or the command")
    os_user = models.CharField(max_length=100, blank=True, default="", help_text="operating-system user (CLI)")
    # The hash chain (tenants/auditchain.py): row n's hash covers its fields and row n-1's hash.
    seq = models.PositiveBigIntegerField(unique=True, editable=False)
    prev_hash = models.CharField(max_length=64, editable=False)
    hash = models.CharField(max_length=64, editable=False)

    class Meta:
        ordering = ["-at"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M} {self.action} {self.target}"


class AuditChain(models.Model):
    """The audit chain's one bookkeeping row (pk 1): every writer locks it, so writers queue and the
    chain cannot fork; it holds the head (last row written) and the anchor (last row pruned), from
    which ``can audit verify`` starts."""

    head_seq = models.PositiveBigIntegerField(default=0)
    head_hash = models.CharField(max_length=64)
    anchor_seq = models.PositiveBigIntegerField(default=0)
    anchor_hash = models.CharField(max_length=64)

    def __str__(self) -> str:
        return f"audit chain: head #{self.head_seq}, anchor #{self.anchor_seq}"


def _default_thresholds() -> list[int]:
    """Kept for migration 0001, which created ``Budget`` here (it lives in ``budgets`` now)."""
    return [50, 80, 100]

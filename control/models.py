"""Who may manage which tenants through the management API."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

__all__ = ["ManagementToken", "SecretReference", "TenantMembership"]


class TenantMembership(models.Model):
    """A user's role on a tenant; it covers the tenant's whole subtree.

    Owners and admins read and change the subtree (child tenants, keys, budgets, members); in the
    management API members and viewers only read it; in the dashboard (dashboard/access.py) members
    also manage the keys they own. Staff users see everything without a membership.
    """

    class Role(models.TextChoices):
        OWNER = "owner"
        ADMIN = "admin"
        MEMBER = "member"
        VIEWER = "viewer"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="tenant_memberships")
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["tenant", "user"]
        constraints = [models.UniqueConstraint(fields=["user", "tenant"], name="membership_unique")]

    def __str__(self) -> str:
        return f"{self.user} {self.role} of {self.tenant}"


class ManagementToken(models.Model):
    """A bearer token for the management API (``ccm_...``), acting as its user.

    Like API keys, only a public prefix and an HMAC of the whole token are stored; the token is
    shown once when created (``can apitoken create``).
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="management_tokens")
    name = models.CharField(max_length=200, blank=True, default="")
    prefix = models.CharField(max_length=32, unique=True)
    hashed_secret = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"


class SecretReference(models.Model):
    """The ``${ENV_VAR}`` a configuration file named for a stored secret, so ``can export`` writes
    the same placeholder back (the value itself is stored encrypted on the row, never here).

    Written by ``can apply`` (``control.config.references``); rows whose object is gone are ignored
    and removed on the next apply.
    """

    class Kind(models.TextChoices):
        PROVIDER_API_KEY = "provider_api_key"
        BUDGET_WEBHOOK_SECRET = "budget_webhook_secret"

    kind = models.CharField(max_length=32, choices=Kind.choices)
    object_id = models.PositiveBigIntegerField(help_text="the provider's or the budget's id")
    env_name = models.CharField(max_length=200, help_text="the environment variable, without ${ }")
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["kind", "object_id"], name="secret_reference_unique")]

    def __str__(self) -> str:
        return f"{self.kind} {self.object_id}: ${{{self.env_name}}}"

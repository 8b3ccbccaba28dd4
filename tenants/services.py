"""Writes to tenants and keys. Each runs in one transaction, writes an audit row and announces
the change to every gateway process after commit."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from core import invalidation
from tenants import keys
from tenants.models import ApiKey, AuditEvent, Plan, Tenant


def audit(
    action: str,
    *,
    tenant: Tenant | None = None,
    target: str = "",
    data: dict[str, Any] | None = None,
    actor: Any = None,
    actor_label: str = "",
) -> None:
    AuditEvent.objects.create(
        action=action, tenant=tenant, target=target, data=data or {}, actor=actor, actor_label=actor_label
    )


def _announce_on_commit() -> None:
    transaction.on_commit(invalidation.announce)


@transaction.atomic
def tenant_create(
    *,
    slug: str,
    name: str = "",
    parent: Tenant | None = None,
    kind: str = Tenant.Kind.ORGANISATION,
    plan: Plan | None = None,
    time_zone: str = "UTC",
    stripe_customer_id: str = "",
    actor_label: str = "",
) -> Tenant:
    tenant = Tenant(
        slug=slug,
        name=name or slug,
        parent=parent,
        kind=kind,
        plan=plan,
        time_zone=time_zone,
        stripe_customer_id=stripe_customer_id,
    )
    tenant.full_clean()
    tenant.save()
    audit("tenant.create", tenant=tenant, target=slug, actor_label=actor_label)
    _announce_on_commit()
    return tenant


@transaction.atomic
def key_issue(
    *,
    tenant: Tenant,
    name: str = "",
    scopes: dict[str, Any] | None = None,
    expires_at: datetime | None = None,
    user: Any = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    actor_label: str = "",
) -> tuple[ApiKey, str]:
    """Create a key. Returns the row and the plaintext key, which is never stored or shown again."""
    plaintext = keys.generate_key()
    api_key = ApiKey.objects.create(
        tenant=tenant,
        user=user,
        name=name,
        prefix=keys.key_prefix(plaintext),
        hashed_secret=keys.hash_key(plaintext),
        scopes=scopes or {},
        expires_at=expires_at,
        rpm_limit=rpm_limit,
        tpm_limit=tpm_limit,
    )
    audit("key.issue", tenant=tenant, target=api_key.prefix, data={"name": name}, actor_label=actor_label)
    _announce_on_commit()
    return api_key, plaintext


@transaction.atomic
def key_revoke(*, api_key: ApiKey, actor_label: str = "") -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
        audit("key.revoke", tenant=api_key.tenant, target=api_key.prefix, actor_label=actor_label)
        _announce_on_commit()
    return api_key


@transaction.atomic
def key_rotate(*, api_key: ApiKey, actor_label: str = "") -> tuple[ApiKey, str]:
    """Issue a replacement with the same tenant, name, scopes and limits; revoke the old key."""
    new_key, plaintext = key_issue(
        tenant=api_key.tenant,
        name=api_key.name,
        scopes=api_key.scopes,
        expires_at=api_key.expires_at,
        user=api_key.user,
        rpm_limit=api_key.rpm_limit,
        tpm_limit=api_key.tpm_limit,
        actor_label=actor_label,
    )
    new_key.rotated_from = api_key
    new_key.save(update_fields=["rotated_from"])
    key_revoke(api_key=api_key, actor_label=actor_label)
    audit(
        "key.rotate",
        tenant=api_key.tenant,
        target=api_key.prefix,
        data={"new": new_key.prefix},
        actor_label=actor_label,
    )
    return new_key, plaintext


def passthrough_tenant() -> Tenant:
    tenant, _ = Tenant.objects.get_or_create(
        slug=settings.CHITTYCAN_PASSTHROUGH_TENANT, defaults={"name": "Passthrough (providers' own keys)"}
    )
    return tenant


def passthrough_api_key(tenant: Tenant) -> ApiKey:
    """The internal key row passthrough usage is recorded under (its secret is never used)."""
    existing = ApiKey.objects.usable().filter(tenant=tenant, name="passthrough").first()
    if existing is not None:
        return existing
    api_key, _ = key_issue(tenant=tenant, name="passthrough", actor_label="passthrough")
    return api_key

"""Writes to tenants, plans and keys. Each runs in one transaction, writes an audit row through
``tenants.audit`` and announces the change to every gateway process after commit. The admin, the
``can`` commands, the REST API and ``can apply`` all write through these functions."""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypedDict, Unpack

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from core import invalidation
from tenants import audit, keys
from tenants.models import ApiKey, Plan, Tenant


def _announce_on_commit() -> None:
    invalidation.announce_on_commit()


class TenantFields(TypedDict, total=False):
    slug: str
    name: str
    kind: str
    parent: Tenant | None
    plan: Plan | None
    time_zone: str
    stripe_customer_id: str
    rpm_limit: int | None
    tpm_limit: int | None
    allowed_models: list[str]
    is_active: bool
    require_otp: bool
    cache_enabled: bool | None
    cache_scope: str


class PlanFields(TypedDict, total=False):
    slug: str
    name: str
    monthly_request_quota: int | None
    rpm_limit: int | None
    tpm_limit: int | None
    created_at: datetime


class KeyFields(TypedDict, total=False):
    """What may change on an issued key (its tenant and secret never do: rotate instead)."""

    name: str
    user: AbstractBaseUser | None
    scopes: dict[str, Any]
    rpm_limit: int | None
    tpm_limit: int | None
    expires_at: datetime | None
    cache_enabled: bool | None
    cache_own: bool


# --- tenants ------------------------------------------------------------------------------------


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
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    allowed_models: list[str] | None = None,
    is_active: bool = True,
    require_otp: bool = False,
    cache_enabled: bool | None = None,
    cache_scope: str = "tenant",
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
) -> Tenant:
    tenant = Tenant(
        cache_enabled=cache_enabled,
        cache_scope=cache_scope,
        slug=slug,
        name=name or slug,
        parent=parent,
        kind=kind,
        plan=plan,
        time_zone=time_zone,
        stripe_customer_id=stripe_customer_id,
        rpm_limit=rpm_limit,
        tpm_limit=tpm_limit,
        allowed_models=list(allowed_models or []),
        is_active=is_active,
        require_otp=require_otp,
    )
    tenant.full_clean()
    tenant.save()
    audit.record("tenant.create", tenant=tenant, target=slug, actor=actor, actor_label=actor_label, source=source)
    _announce_on_commit()
    return tenant


@transaction.atomic
def tenant_update(
    tenant: Tenant,
    *,
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
    **fields: Unpack[TenantFields],
) -> audit.Changes:
    """Set the given fields; returns what changed (nothing written, audited or announced if nothing did).

    ``tenant`` may carry unsaved edits (an admin form's instance): the change is measured against
    the stored row."""
    stored = Tenant.objects.select_for_update().get(pk=tenant.pk)
    changes = audit.diff(stored, fields)
    if not changes:
        return changes
    for name, value in fields.items():
        setattr(tenant, name, value)
    tenant.full_clean()
    tenant.save(update_fields=list(changes))
    audit.record(
        "tenant.update",
        tenant=tenant,
        target=tenant.slug,
        changes=changes,
        actor=actor,
        actor_label=actor_label,
        source=source,
    )
    _announce_on_commit()
    return changes


@transaction.atomic
def tenant_deactivate(
    tenant: Tenant,
    *,
    note: str = "",
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
) -> bool:
    """Switch a tenant off (tenants are never deleted: their keys and ledger rows stay).

    Its keys, and those of its subtree, stop working. Returns whether it was active."""
    updated = Tenant.objects.filter(pk=tenant.pk, is_active=True).update(is_active=False)
    tenant.is_active = False
    if not updated:
        return False
    audit.record(
        "tenant.deactivate",
        tenant=tenant,
        target=tenant.slug,
        data={"note": note} if note else None,
        actor=actor,
        actor_label=actor_label,
        source=source,
    )
    _announce_on_commit()
    return True


# --- plans --------------------------------------------------------------------------------------


@transaction.atomic
def plan_create(
    *,
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
    **fields: Unpack[PlanFields],
) -> Plan:
    plan = Plan(**fields)
    if not plan.name:
        plan.name = plan.slug
    plan.full_clean()
    plan.save()
    audit.record("plan.create", target=plan.slug, actor=actor, actor_label=actor_label, source=source)
    _announce_on_commit()
    return plan


@transaction.atomic
def plan_update(
    plan: Plan,
    *,
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
    **fields: Unpack[PlanFields],
) -> audit.Changes:
    """Set the given fields; returns what changed (measured against the stored row)."""
    stored = Plan.objects.select_for_update().get(pk=plan.pk)
    changes = audit.diff(stored, fields)
    if not changes:
        return changes
    for name, value in fields.items():
        setattr(plan, name, value)
    plan.full_clean()
    plan.save(update_fields=list(changes))
    audit.record("plan.update", target=plan.slug, changes=changes, actor=actor, actor_label=actor_label, source=source)
    _announce_on_commit()
    return changes


@transaction.atomic
def plan_delete(plan: Plan, *, actor: AbstractBaseUser | None = None, actor_label: str = "", source: str = "") -> None:
    """Delete a plan; tenants on it are left without one."""
    target = plan.slug
    plan.delete()
    audit.record("plan.delete", target=target, actor=actor, actor_label=actor_label, source=source)
    _announce_on_commit()


# --- keys ---------------------------------------------------------------------------------------


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
    actor: AbstractBaseUser | None = None,
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
    audit.record(
        "key.issue", tenant=tenant, target=api_key.prefix, data={"name": name}, actor=actor, actor_label=actor_label
    )
    _announce_on_commit()
    return api_key, plaintext


@transaction.atomic
def key_register(*, tenant: Tenant, plaintext: str, name: str = "", actor_label: str = "") -> ApiKey:
    """Store a key generated elsewhere (a CI secret, see docker/bootstrap.py); only its HMAC is kept.

    Idempotent: a key already stored is returned as it is."""
    if not keys.looks_valid(plaintext):
        raise ValueError("not a chitty_ key")
    prefix = keys.key_prefix(plaintext)
    existing = ApiKey.objects.filter(prefix=prefix).first()
    if existing is not None:
        return existing
    api_key = ApiKey.objects.create(tenant=tenant, name=name, prefix=prefix, hashed_secret=keys.hash_key(plaintext))
    audit.record("key.register", tenant=tenant, target=prefix, data={"name": name}, actor_label=actor_label)
    _announce_on_commit()
    return api_key


@transaction.atomic
def key_update(
    api_key: ApiKey,
    *,
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
    **fields: Unpack[KeyFields],
) -> audit.Changes:
    """Change a key's name, owner, scopes, limits, expiry or cache settings; returns what changed
    (``source``: the file a ``can apply`` change came from)."""
    stored = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    changes = audit.diff(stored, fields)
    if not changes:
        return changes
    for name, value in fields.items():
        setattr(api_key, name, value)
    api_key.full_clean()
    api_key.save(update_fields=list(changes))
    audit.record(
        "key.update",
        tenant=api_key.tenant,
        target=api_key.prefix,
        changes=changes,
        actor=actor,
        actor_label=actor_label,
        source=source,
    )
    _announce_on_commit()
    return changes


@transaction.atomic
def key_revoke(*, api_key: ApiKey, actor_label: str = "", actor: AbstractBaseUser | None = None) -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
        audit.record("key.revoke", tenant=api_key.tenant, target=api_key.prefix, actor=actor, actor_label=actor_label)
        _announce_on_commit()
    return api_key


@transaction.atomic
def key_rotate(*, api_key: ApiKey, actor_label: str = "", actor: AbstractBaseUser | None = None) -> tuple[ApiKey, str]:
    """Issue a replacement with the same tenant, name, scopes, limits and cache settings; revoke the old key."""
    new_key, plaintext = key_issue(
        tenant=api_key.tenant,
        name=api_key.name,
        scopes=api_key.scopes,
        expires_at=api_key.expires_at,
        user=api_key.user,
        rpm_limit=api_key.rpm_limit,
        tpm_limit=api_key.tpm_limit,
        actor_label=actor_label,
        actor=actor,
    )
    new_key.rotated_from = api_key
    new_key.cache_enabled, new_key.cache_own = api_key.cache_enabled, api_key.cache_own
    new_key.save(update_fields=["rotated_from", "cache_enabled", "cache_own"])
    key_revoke(api_key=api_key, actor_label=actor_label, actor=actor)
    audit.record(
        "key.rotate",
        tenant=api_key.tenant,
        target=api_key.prefix,
        data={"new": new_key.prefix},
        actor=actor,
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

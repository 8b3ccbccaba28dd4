"""Writes to tenant memberships (who may use the management API for which tenant subtree).

Each runs in one transaction and writes an audit row through ``tenants.audit``. The ``can
members`` command and the admin write through these functions."""

from __future__ import annotations

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction

from control.models import TenantMembership
from tenants import audit
from tenants.models import Tenant

__all__ = ["member_remove", "member_set"]


@transaction.atomic
def member_set(
    *, user: AbstractBaseUser, tenant: Tenant, role: str, actor: AbstractBaseUser | None = None, actor_label: str = ""
) -> TenantMembership:
    """Give ``user`` ``role`` on ``tenant`` (its whole subtree), creating or changing the membership."""
    membership = TenantMembership.objects.select_for_update().filter(user_id=user.pk, tenant=tenant).first()
    if membership is not None and membership.role == role:
        return membership
    if membership is None:
        membership = TenantMembership(user_id=user.pk, tenant=tenant)
    membership.role = role
    membership.full_clean(validate_unique=False)
    membership.save()
    audit.record(
        "member.set",
        tenant=tenant,
        target=user.get_username(),
        data={"role": role},
        actor=actor,
        actor_label=actor_label,
    )
    return membership


@transaction.atomic
def member_remove(
    *, user: AbstractBaseUser, tenant: Tenant, actor: AbstractBaseUser | None = None, actor_label: str = ""
) -> bool:
    """Take ``user``'s membership of ``tenant`` away; returns whether there was one."""
    deleted, _ = TenantMembership.objects.filter(user_id=user.pk, tenant=tenant).delete()
    if deleted:
        audit.record("member.remove", tenant=tenant, target=user.get_username(), actor=actor, actor_label=actor_label)
    return bool(deleted)

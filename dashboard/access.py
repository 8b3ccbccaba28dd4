"""Who sees and changes what in the dashboard.

A membership (``control.models.TenantMembership``) covers its tenant and the whole subtree below
it; where several cover one tenant, the strongest role counts. Staff users are owners everywhere.

- viewer: reads every page of the tenants it sees, except the audit log;
- member: also creates, revokes and rotates the keys it owns (``ApiKey.user``);
- admin: manages the team's keys, budgets and members; reads the audit log;
- owner: as admin, and may make other owners.

As in the management API (``control.permissions``), the budget of the tenant a membership is on
is set from above (staff or an ancestor's admin): an admin sets budgets strictly inside its subtree
and on keys in it. Objects outside a user's subtrees answer 404, never 403.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import QuerySet

from control.models import TenantMembership
from ledger.analytics import subtree_ids
from tenants.models import ApiKey, Tenant

__all__ = ["RANK", "Access", "otp_required_for"]

Role = TenantMembership.Role
RANK: dict[str, int] = {Role.VIEWER: 1, Role.MEMBER: 2, Role.ADMIN: 3, Role.OWNER: 4}


class Access:
    """The tenants ``user`` sees and its role on each (built once per request)."""

    def __init__(self, user: Any) -> None:
        self.user = user
        self.is_staff = bool(user and user.is_authenticated and user.is_staff)
        self._roles: dict[int, str] = {}
        self._budget: set[int] = set()
        self.home_ids: list[int] = []  # the tenants memberships are on (staff: the roots)
        if self.is_staff:
            self.home_ids = list(
                Tenant.objects.filter(parent__isnull=True, is_active=True).values_list("pk", flat=True)
            )
            return
        if not (user and user.is_authenticated):
            return
        rows = TenantMembership.objects.filter(user=user, tenant__is_active=True).values_list("tenant_id", "role")
        for tenant_id, role in rows.order_by("tenant_id"):
            self.home_ids.append(tenant_id)
            for pk in subtree_ids(tenant_id):
                if RANK.get(role, 0) > RANK.get(self._roles.get(pk, ""), 0):
                    self._roles[pk] = role
                if RANK.get(role, 0) >= RANK[Role.ADMIN] and pk != tenant_id:
                    self._budget.add(pk)

    # --- reading ---------------------------------------------------------------------------------

    def role(self, tenant_id: int) -> str | None:
        if self.is_staff:
            return Role.OWNER
        return self._roles.get(tenant_id)

    def can_see(self, tenant_id: int) -> bool:
        return self.role(tenant_id) is not None

    @property
    def visible_ids(self) -> set[int] | None:
        """None: every tenant (staff)."""
        return None if self.is_staff else set(self._roles)

    def tenants(self) -> QuerySet[Tenant]:
        rows = Tenant.objects.filter(is_active=True)
        ids = self.visible_ids
        return rows if ids is None else rows.filter(pk__in=ids)

    def at_least(self, tenant_id: int, role: str) -> bool:
        return RANK.get(self.role(tenant_id) or "", 0) >= RANK[role]

    # --- changing --------------------------------------------------------------------------------

    def can_read_audit(self, tenant_id: int) -> bool:
        return self.at_least(tenant_id, Role.ADMIN)

    def can_manage_team(self, tenant_id: int) -> bool:
        """Keys of anyone, budgets, members: owners and admins."""
        return self.at_least(tenant_id, Role.ADMIN)

    def can_create_key(self, tenant_id: int) -> bool:
        return self.at_least(tenant_id, Role.MEMBER)

    def can_manage_key(self, key: ApiKey) -> bool:
        if self.can_manage_team(key.tenant_id):
            return True
        return self.at_least(key.tenant_id, Role.MEMBER) and key.user_id is not None and key.user_id == self.user.pk

    def can_budget(self, tenant_id: int) -> bool:
        return self.is_staff or tenant_id in self._budget

    def can_budget_key(self, key: ApiKey) -> bool:
        return self.can_manage_team(key.tenant_id)

    def grantable_roles(self, tenant_id: int) -> list[str]:
        """The roles this user may give on ``tenant_id``: owners any, admins up to admin."""
        if self.at_least(tenant_id, Role.OWNER):
            return [Role.OWNER, Role.ADMIN, Role.MEMBER, Role.VIEWER]
        if self.at_least(tenant_id, Role.ADMIN):
            return [Role.ADMIN, Role.MEMBER, Role.VIEWER]
        return []


def otp_required_for(user: Any) -> bool:
    """Whether ``user`` needs a TOTP second factor to use the dashboard: staff (unless
    ``CHITTYCAN_ADMIN_REQUIRE_OTP`` is off, development only), everyone when
    ``CHITTYCAN_DASHBOARD_REQUIRE_OTP`` is on, and members of a tenant that asks for it
    (``Tenant.require_otp`` on the tenant or any ancestor)."""
    if not (user and user.is_authenticated and user.is_active):
        return False
    if user.is_staff:
        return bool(settings.CHITTYCAN_ADMIN_REQUIRE_OTP)
    if settings.CHITTYCAN_DASHBOARD_REQUIRE_OTP:
        return True
    for membership in TenantMembership.objects.filter(user=user).select_related("tenant__parent"):
        tenant = membership.tenant
        if tenant.require_otp or any(t.require_otp for t in tenant.ancestors()):
            return True
    return False

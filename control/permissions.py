"""Who sees and changes what through the management API.

- Staff users see and change everything.
- A membership covers the tenant and its whole subtree. Members and viewers read; owners and
  admins also create child tenants, keys and budgets inside it.
- A tenant admin cannot change the budget of the tenant its membership is on (that limit is set
  from above, by staff or by an admin of an ancestor), only budgets strictly inside its subtree
  and budgets of keys in it.
- Objects outside a user's subtrees are filtered out of every queryset, so they answer 404,
  never 403: the API does not confirm that they exist.
"""

from __future__ import annotations

from typing import Any

from rest_framework import permissions
from rest_framework.request import Request

from control.models import TenantMembership
from ledger.analytics import subtree_ids


class Scope:
    """The tenant ids a user may read, administer, and set budgets on (None = everything)."""

    def __init__(self, user: Any) -> None:
        self.user = user
        self.is_staff = bool(user and user.is_authenticated and user.is_staff)
        self._visible: set[int] | None = None
        self._admin: set[int] | None = None
        self._budget: set[int] | None = None
        if not self.is_staff:
            visible: set[int] = set()
            admin: set[int] = set()
            budget: set[int] = set()
            memberships = TenantMembership.objects.filter(user=user, tenant__is_active=True)
            for m in memberships.values("tenant_id", "role"):
                ids = subtree_ids(m["tenant_id"])
                visible.update(ids)
                if m["role"] in (TenantMembership.Role.OWNER, TenantMembership.Role.ADMIN):
                    admin.update(ids)
                    budget.update(i for i in ids if i != m["tenant_id"])
            self._visible, self._admin, self._budget = visible, admin, budget

    def can_see(self, tenant_id: int) -> bool:
        return self._visible is None or tenant_id in self._visible

    def can_admin(self, tenant_id: int) -> bool:
        return self._admin is None or tenant_id in self._admin

    def can_budget(self, tenant_id: int) -> bool:
        return self._budget is None or tenant_id in self._budget

    @property
    def visible_ids(self) -> set[int] | None:
        return self._visible

    @property
    def admin_ids(self) -> set[int] | None:
        """The tenants this user administers (each admin membership's whole subtree; None = all)."""
        return self._admin


def scope_of(request: Request) -> Scope:
    scope = getattr(request, "_chittycan_scope", None)
    if scope is None:
        scope = Scope(request.user)
        request._chittycan_scope = scope  # type: ignore[attr-defined]
    return scope


class HasTenantAccess(permissions.BasePermission):
    """Authenticated, and a staff user or a member of at least one tenant."""

    message = "You are not a member of any tenant."

    def has_permission(self, request: Request, view: Any) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        scope = scope_of(request)
        return scope.is_staff or bool(scope.visible_ids)

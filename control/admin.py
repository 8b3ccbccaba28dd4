"""Admin for management API memberships and tokens; writes go through ``control.members`` and
``control.tokens``, which audit them."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from control import members, tokens
from control.models import ManagementToken, TenantMembership
from tenants.admin import ADMIN_LABEL, AuditedAdmin, actor_of, adopt


@admin.register(TenantMembership)
class TenantMembershipAdmin(AuditedAdmin[TenantMembership]):
    list_display = ("tenant", "user", "role", "created_at")
    list_filter = ("role",)
    list_select_related = ("tenant", "user")
    raw_id_fields = ("tenant", "user")
    search_fields = ("tenant__slug", "user__username")
    fields = ("tenant", "user", "role")

    def create(self, request: HttpRequest, obj: TenantMembership, values: dict[str, Any]) -> TenantMembership:
        return members.member_set(
            user=obj.user, tenant=obj.tenant, role=obj.role, actor=actor_of(request), actor_label=ADMIN_LABEL
        )

    def update(self, request: HttpRequest, obj: TenantMembership, values: dict[str, Any]) -> None:
        stored = TenantMembership.objects.select_related("user", "tenant").get(pk=obj.pk)
        if (stored.user_id, stored.tenant_id) != (obj.user_id, obj.tenant_id):  # moved: a new membership
            self.delete(request, stored)
        adopt(obj, self.create(request, obj, values))

    def delete(self, request: HttpRequest, obj: TenantMembership) -> None:
        members.member_remove(user=obj.user, tenant=obj.tenant, actor=actor_of(request), actor_label=ADMIN_LABEL)


@admin.register(ManagementToken)
class ManagementTokenAdmin(admin.ModelAdmin):
    """View and revoke only: tokens are created with ``can apitoken create`` (the secret is shown
    once), and a revoked token stays listed so its use remains attributable."""

    list_display = ("prefix", "user", "name", "created_at", "last_used_at", "revoked_at")
    list_select_related = ("user",)
    search_fields = ("prefix", "user__username", "name")
    fields = ("prefix", "user", "name", "created_at", "last_used_at", "revoked_at")  # never the hash
    actions = ["revoke_tokens"]
    audited_by_service = True  # control.tokens audits the revocation (tenants/admin_audit.py)

    def has_add_permission(self, request: object) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Revoke selected tokens")
    def revoke_tokens(self, request: HttpRequest, queryset: QuerySet[ManagementToken]) -> None:
        count = 0
        for token in queryset.filter(revoked_at__isnull=True):
            tokens.token_revoke(token=token, actor=actor_of(request), actor_label=ADMIN_LABEL)
            count += 1
        self.message_user(request, f"Revoked {count} token(s).", messages.SUCCESS)

from __future__ import annotations

from django.contrib import admin

from control.models import ManagementToken, TenantMembership


@admin.register(TenantMembership)
class TenantMembershipAdmin(admin.ModelAdmin):
    list_display = ("tenant", "user", "role", "created_at")
    list_filter = ("role",)
    list_select_related = ("tenant", "user")
    raw_id_fields = ("tenant", "user")
    search_fields = ("tenant__slug", "user__username")


@admin.register(ManagementToken)
class ManagementTokenAdmin(admin.ModelAdmin):
    list_display = ("prefix", "user", "name", "created_at", "last_used_at", "revoked_at")
    list_select_related = ("user",)
    readonly_fields = ("prefix", "hashed_secret", "created_at", "last_used_at")
    search_fields = ("prefix", "user__username", "name")

    def has_add_permission(self, request: object) -> bool:
        return False  # tokens are created with `can apitoken create`, which shows the secret once

from __future__ import annotations

from django.contrib.admin.apps import AdminConfig


class ChittyCanAdminConfig(AdminConfig):
    """Django's admin with ChittyCan's site (TOTP second factor) as the default ``admin.site``."""

    default_site = "chittycan.admin_site.ChittyCanAdminSite"

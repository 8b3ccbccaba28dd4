"""The admin app: Django's admin with ChittyCan's OTP site, discovered when it is first needed."""

from __future__ import annotations

import os

from django.contrib import admin
from django.contrib.admin.apps import AdminConfig, SimpleAdminConfig


class ChittyCanAdminConfig(AdminConfig):
    """Django's admin with ChittyCan's site (TOTP second factor) as the default ``admin.site``.

    A serving gateway (``can serve`` sets ``CHITTYCAN_SERVING``) does not import every app's admin
    module at start: the URLconf does, with the first request Django serves (chittycan/urls.py), as
    the ``/v1`` routes and the probes never need them (~3 MiB resident: the admin classes, their
    forms, the second-factor pages and the QR code library). Every other process discovers them
    here, as Django's own ``AdminConfig`` does, so ``manage.py check`` checks every ``ModelAdmin``.
    """

    default_site = "chittycan.admin_site.ChittyCanAdminSite"

    def ready(self) -> None:
        SimpleAdminConfig.ready(self)  # the admin's system checks
        if not os.environ.get("CHITTYCAN_SERVING"):
            discover_admin()


def discover_admin() -> None:
    """Every app's ``admin`` module registered on ``admin.site``, then the audit receivers for the
    models the admin writes without a service of ours (tenants/admin_audit.py). Idempotent."""
    # noqa reason: the admin classes need the app registry, which is not ready when apps.py is imported.
    from tenants import admin_audit  # noqa: PLC0415

    admin.autodiscover()
    admin_audit.connect()

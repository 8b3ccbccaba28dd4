from django.apps import AppConfig


class TenantsConfig(AppConfig):
    """The audit receivers of the admin's generic writes (tenants/admin_audit.py) are connected with
    the admin's discovery (``chittycan.apps.discover_admin``), once every ``ModelAdmin`` is known."""

    name = "tenants"
    verbose_name = "Tenants and keys"

from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "tenants"
    verbose_name = "Tenants and keys"

    def ready(self) -> None:
        # noqa reason: the admin classes need the app registry, which is not ready at import time.
        from tenants import admin_audit  # noqa: PLC0415

        admin_audit.connect()

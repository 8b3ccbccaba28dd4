from django.apps import AppConfig


class BillingExportConfig(AppConfig):
    name = "billing_export"
    verbose_name = "Billing export"

    def ready(self) -> None:
        from billing_export import checks  # noqa: F401, PLC0415  (registers the system checks once apps are ready)

from django.apps import AppConfig


class BillingExportConfig(AppConfig):
    name = "billing_export"
    verbose_name = "Billing export"

    def ready(self) -> None:
        # Imported here, not at the top: they import models, and the app registry is not ready
        # while this module is imported. ``checks`` registers the system checks.
        from billing_export import checks, selectors  # noqa: F401, PLC0415
        from ledger import holds  # noqa: PLC0415

        # The export reads raw ledger rows: retention must never prune one it has not covered.
        holds.hold_rows(selectors.UNEXPORTED, selectors.unexported)

from django.apps import AppConfig


class BudgetsConfig(AppConfig):
    name = "budgets"
    verbose_name = "Budgets"

    def ready(self) -> None:
        # The ledger's month report compares spend with the tenant's monthly budget; budgets sit
        # above the ledger, so they register the lookup. Imported here, not at the top: they
        # import models, and the app registry is not ready while this module is imported.
        from budgets import spend  # noqa: PLC0415  (app registry not ready at module import)
        from ledger import analytics  # noqa: PLC0415  (app registry not ready at module import)

        analytics.use_monthly_budget(spend.monthly_budget_micro)

from django.apps import AppConfig


class BillingExportConfig(AppConfig):
    name = "billing_export"
    verbose_name = "Billing export"

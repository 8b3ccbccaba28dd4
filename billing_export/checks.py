"""System checks: settings that would make the Stripe export lose money."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, register

#: Stripe accepts meter events up to 35 days old; raw rows must outlive that to be exported.
STRIPE_MAX_EVENT_AGE_DAYS = 35


@register()
def retention_outlives_stripe_window(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    days = settings.CHITTYCAN_USAGE_RETENTION_DAYS
    if days > STRIPE_MAX_EVENT_AGE_DAYS:
        return []
    return [
        Error(
            f"CHITTYCAN_USAGE_RETENTION_DAYS is {days}: raw usage rows would be pruned before the Stripe "
            f"export could bill them (Stripe accepts events up to {STRIPE_MAX_EVENT_AGE_DAYS} days old).",
            hint=f"Keep at least {STRIPE_MAX_EVENT_AGE_DAYS + 1} days of raw usage.",
            id="billing_export.E001",
        )
    ]


@register()
def audit_retention_outlives_billing_window(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The audit log must outlive the window in which usage can still be billed (and so disputed)."""
    days = settings.CHITTYCAN_AUDIT_RETENTION_DAYS
    if days > STRIPE_MAX_EVENT_AGE_DAYS:
        return []
    return [
        Error(
            f"CHITTYCAN_AUDIT_RETENTION_DAYS is {days}: audit rows would be pruned inside the billing window "
            f"({STRIPE_MAX_EVENT_AGE_DAYS} days, the oldest usage the Stripe export still bills).",
            hint=f"Keep at least {STRIPE_MAX_EVENT_AGE_DAYS + 1} days of audit log (the default is 90).",
            id="billing_export.E002",
        )
    ]

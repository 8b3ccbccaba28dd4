"""Thin wrapper over the ``stripe`` library: build a client, send one meter event. No billing rules.

The client talks to ``CHITTYCAN_STRIPE_API_BASE`` (https://api.stripe.com unless set; tests point
it at a local fake) with ``CHITTYCAN_STRIPE_API_KEY``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings

from billing_export.models import ExportLine

if TYPE_CHECKING:
    import stripe  # imported lazily below: ~24 MiB that every gateway process would carry otherwise

__all__ = ["SendOutcome", "StripeNotConfigured", "idempotency_key", "make_client", "send_meter_event"]

logger = logging.getLogger(__name__)


class StripeNotConfigured(Exception):
    pass


@dataclass(frozen=True)
class SendOutcome:
    accepted: bool
    duplicate: bool = False
    retryable: bool = False
    error: str = ""


def make_client(api_key: str | None = None, api_base: str | None = None) -> stripe.StripeClient:
    key = api_key if api_key is not None else settings.CHITTYCAN_STRIPE_API_KEY
    if not key:
        raise StripeNotConfigured("set CHITTYCAN_STRIPE_API_KEY (a restricted key with meter event write access)")
    base = (api_base or settings.CHITTYCAN_STRIPE_API_BASE).rstrip("/")
    import stripe  # noqa: PLC0415  (a large SDK: loaded only when pushing)

    return stripe.StripeClient(
        key,
        base_addresses={"api": base},
        max_network_retries=settings.CHITTYCAN_STRIPE_MAX_NETWORK_RETRIES,
        http_client=stripe.RequestsClient(timeout=settings.CHITTYCAN_STRIPE_TIMEOUT),
    )


def idempotency_key(line: ExportLine) -> str:
    """Derived from the identifier only, so every retry of a line, in any process, uses the same key."""
    return f"chittycan-meter-event-{line.identifier}"


def _is_duplicate(exc: stripe.StripeError) -> bool:
    # Stripe answers 400 invalid_request_error "An event already exists with identifier <id>."
    # (stripe-should-retry: false) when the identifier was already recorded.
    code = getattr(exc, "code", None) or ""
    message = str(getattr(exc, "user_message", None) or exc)
    return code == "duplicate_meter_event" or "already exists with identifier" in message


def send_meter_event(client: Any, line: ExportLine) -> SendOutcome:
    params = {
        "event_name": line.event_name,
        "identifier": line.identifier,
        "timestamp": line.timestamp,
        "payload": {
            settings.CHITTYCAN_STRIPE_CUSTOMER_KEY: line.customer_id,
            settings.CHITTYCAN_STRIPE_VALUE_KEY: str(line.value),
        },
    }
    import stripe  # noqa: PLC0415  (a large SDK: loaded only when pushing)

    try:
        client.v1.billing.meter_events.create(params=params, options={"idempotency_key": idempotency_key(line)})
    except stripe.APIConnectionError as exc:
        logger.warning("stripe push: connection failed", extra={"identifier": line.identifier})
        return SendOutcome(accepted=False, retryable=True, error=f"connection error: {exc.user_message or exc}")
    except stripe.StripeError as exc:
        status = exc.http_status or 0
        if status == 400 and _is_duplicate(exc):
            return SendOutcome(accepted=True, duplicate=True)
        retryable = status == 0 or status >= 500 or status in (409, 429)
        logger.warning(
            "stripe push: refused", extra={"identifier": line.identifier, "status": status, "code": exc.code}
        )
        return SendOutcome(
            accepted=False, retryable=retryable, error=f"HTTP {status} {exc.code or ''}: {exc.user_message or exc}"
        )
    return SendOutcome(accepted=True)

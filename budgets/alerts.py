"""Budget alerts: at each configured threshold (percent of the limit), once per period, by email
and by signed webhook.

``check_budgets`` records an ``AlertSent`` row per newly crossed threshold (a unique constraint
makes it once per budget, period and threshold, even with several workers) and returns the rows
to deliver; when several thresholds are crossed at once only the highest is delivered.
``deliver`` sends what has not been sent yet and raises on failure so the Celery task retries.

Webhook signature: the request carries ``X-ChittyCan-Timestamp: <unix seconds>`` and
``X-ChittyCan-Signature: v1=<hex>`` where ``<hex>`` is HMAC-SHA256, keyed with the budget's
``webhook_secret``, over ``"<timestamp>.<raw body>"``. Receivers recompute it, compare in constant
time and reject timestamps older than a few minutes (see docs/usage-and-analytics.md).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from datetime import datetime
from typing import Any

import httpx
import orjson
from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.utils import timezone

from budgets.models import AlertSent, Budget
from budgets.spend import budget_spend, budget_tenant
from core import egress
from core.money import format_usd

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-ChittyCan-Signature"
TIMESTAMP_HEADER = "X-ChittyCan-Timestamp"


class DeliveryError(Exception):
    """A channel failed; the task retries (already delivered channels are not repeated)."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, tolerance: int = 300) -> bool:
    """What a receiver does: recompute the signature, compare in constant time, bound the age."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs(time.time() - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def _thresholds(budget: Budget) -> list[int]:
    out = set()
    for value in budget.alert_thresholds or []:
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1000:
            out.add(int(value))
    return sorted(out)


def check_budget(budget: Budget, now: datetime | None = None) -> list[AlertSent]:
    """Record the thresholds this budget newly crossed in the current period; return those to send."""
    thresholds = _thresholds(budget)
    if not thresholds or budget.limit_micro <= 0:
        return []
    spend = budget_spend(budget, now)
    crossed = [t for t in thresholds if spend.spent_micro * 100 >= t * budget.limit_micro]
    if not crossed:
        return []
    already = set(
        AlertSent.objects.filter(budget=budget, period_key=spend.period_key).values_list("threshold", flat=True)
    )
    new = [t for t in crossed if t not in already]
    created: list[AlertSent] = []
    for threshold in new:
        try:
            with transaction.atomic():
                created.append(
                    AlertSent.objects.create(
                        budget=budget,
                        period_key=spend.period_key,
                        threshold=threshold,
                        spend_micro=spend.spent_micro,
                        limit_micro=budget.limit_micro,
                        notify=threshold == max(new),
                    )
                )
        except IntegrityError:
            continue  # another worker recorded it first; it sends it
    return [a for a in created if a.notify]


def check_budgets(now: datetime | None = None) -> list[AlertSent]:
    """Every budget with thresholds; returns the alerts to deliver."""
    due: list[AlertSent] = []
    for budget in Budget.objects.select_related("tenant", "api_key__tenant").order_by("pk"):
        due.extend(check_budget(budget, now))
    return due


def payload(alert: AlertSent) -> dict[str, Any]:
    budget = alert.budget
    tenant = budget_tenant(budget)
    return {
        "type": "budget.threshold_crossed",
        "alert_id": alert.pk,
        "budget_id": budget.pk,
        "scope": "tenant" if budget.tenant_id else "key",
        "tenant": tenant.slug,
        "api_key_prefix": budget.api_key.prefix if budget.api_key_id and budget.api_key else None,
        "period": budget.period,
        "period_key": alert.period_key,
        "threshold_percent": alert.threshold,
        "spent_micro": alert.spend_micro,
        "limit_micro": alert.limit_micro,
        "spent_usd": format_usd(alert.spend_micro),
        "limit_usd": format_usd(alert.limit_micro),
        "hard": budget.hard,
        "created_at": alert.created_at.isoformat(),
    }


def _send_email(alert: AlertSent, data: dict[str, Any]) -> None:
    recipients = [e for e in alert.budget.alert_emails or [] if isinstance(e, str) and "@" in e]
    if not recipients:
        return
    scope = f"tenant {data['tenant']}" if data["scope"] == "tenant" else f"key {data['api_key_prefix']}…"
    subject = f"[ChittyCan] {scope}: {alert.threshold}% of the {alert.budget.period} budget used"
    body = (
        f"{scope} has spent {data['spent_usd']} USD of its {data['limit_usd']} USD "
        f"{alert.budget.period} budget ({alert.period_key}), crossing the {alert.threshold}% threshold.\n"
        + ("Requests are refused once the limit is reached (hard budget).\n" if alert.budget.hard else "")
    )
    send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients)


def _send_webhook(alert: AlertSent, data: dict[str, Any]) -> None:
    budget = alert.budget
    if not budget.webhook_url:
        return
    body = orjson.dumps(data)
    timestamp = int(time.time())
    headers = {"content-type": "application/json", TIMESTAMP_HEADER: str(timestamp)}
    if budget.webhook_secret:
        headers[SIGNATURE_HEADER] = sign(budget.webhook_secret, timestamp, body)
    # The egress policy again (DNS may have changed since the URL was saved), the connection pinned
    # to the vetted address, no redirect followed (a 3xx is a failure). What is stored says only
    # which kind of failure it was: never the body, nor a socket error that would map ports.
    try:
        response = egress.send(
            "POST",
            budget.webhook_url,
            content=body,
            headers=headers,
            timeout=settings.CHITTYCAN_ALERT_WEBHOOK_TIMEOUT,
        )
    except (httpx.HTTPError, OSError, ValueError) as exc:
        log.warning("budget %s webhook failed: %s", budget.pk, egress.failure_class(exc))
        raise DeliveryError(egress.failure_class(exc)) from None
    if not 200 <= response.status_code < 300:
        raise DeliveryError(egress.failure_class(response=response))


def deliver(alert_id: int) -> AlertSent:
    """Send the alert on every channel not yet done. Raises DeliveryError if one failed."""
    alert = AlertSent.objects.select_related("budget__tenant", "budget__api_key__tenant").get(pk=alert_id)
    data = payload(alert)
    errors: list[str] = []
    alert.attempts += 1
    if alert.email_sent_at is None:
        try:
            _send_email(alert, data)
            alert.email_sent_at = timezone.now()
        except Exception as exc:  # SMTP errors come in many types
            errors.append(f"email: {exc}")
    if alert.webhook_sent_at is None:
        try:
            _send_webhook(alert, data)
            alert.webhook_sent_at = timezone.now()
        except DeliveryError as exc:
            errors.append(f"webhook: {exc}")
    alert.last_error = "; ".join(errors)
    alert.save(update_fields=["attempts", "email_sent_at", "webhook_sent_at", "last_error"])
    if errors:
        raise DeliveryError(alert.last_error)
    return alert

"""Budget alerts: each threshold once per period, by email and by a signed, timestamped webhook,
retried until the receiver accepts it."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
from django.core import mail

from budgets import alerts, tasks
from budgets import services as budget_services
from budgets.models import AlertSent
from chittycan.celery import app as celery_app
from ledger import writer
from tenants import services


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records what it gets and answers scripted statuses."""

    def __init__(self):
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append((dict(self.headers.items()), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/budget"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def eager_celery(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    previous = celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates
    # Eager tasks run inline; not propagating lets Celery's own retry loop re-run a failed task.
    celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates = True, False
    yield
    celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates = previous


def _spend(tenant, micro, when=None, key_id=None):
    writer.write_rows(
        [
            {
                "request_id": f"req_{uuid.uuid4().hex}",
                "created_at": (when or datetime.now(UTC)).timestamp(),
                "tenant_id": tenant.pk,
                "api_key_id": key_id,
                "endpoint": "chat",
                "requested_model": "gpt-4o",
                "cost_micro": micro,
            }
        ]
    )


def _verify_independently(secret, headers, body):
    timestamp = headers["X-ChittyCan-Timestamp"]
    expected = "v1=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-ChittyCan-Signature"], expected)
    assert abs(time.time() - int(timestamp)) < 60


def test_thresholds_alert_once_per_period_by_email_and_signed_webhook(make_tenant, receiver, eager_celery):
    org = make_tenant("alerts-org")
    team = make_tenant("alerts-team", parent=org, kind="team")
    budget = budget_services.budget_set(
        tenant=org,
        period="month",
        limit_micro=1_000_000,
        hard=False,
        alert_emails=["ops@example.com"],
        webhook_url=receiver.url,
        webhook_secret="whsec_test",
    )
    _spend(team, 400_000)  # a child's spend counts against the parent's budget
    assert tasks.check_budget_alerts.apply().get() == 0
    assert mail.outbox == [] and receiver.requests == []

    _spend(team, 150_000)  # 55 %
    assert tasks.check_budget_alerts.apply().get() == 1
    [email] = mail.outbox
    assert email.to == ["ops@example.com"] and "50%" in email.subject
    [(headers, body)] = receiver.requests
    _verify_independently("whsec_test", headers, body)
    assert alerts.verify("whsec_test", headers["X-ChittyCan-Timestamp"], body, headers["X-ChittyCan-Signature"])
    assert not alerts.verify("wrong", headers["X-ChittyCan-Timestamp"], body, headers["X-ChittyCan-Signature"])
    assert not alerts.verify(
        "whsec_test", headers["X-ChittyCan-Timestamp"], body + b" ", headers["X-ChittyCan-Signature"]
    )
    data = orjson.loads(body)
    assert data["type"] == "budget.threshold_crossed" and data["threshold_percent"] == 50
    assert (data["tenant"], data["spent_micro"], data["limit_micro"]) == ("alerts-org", 550_000, 1_000_000)

    # Running again in the same period sends nothing more.
    assert tasks.check_budget_alerts.apply().get() == 0
    assert len(mail.outbox) == 1 and len(receiver.requests) == 1

    # Jumping past 80 % and 100 % at once: both recorded, one message (the highest).
    _spend(org, 500_000)
    assert tasks.check_budget_alerts.apply().get() == 1
    assert len(mail.outbox) == 2 and "100%" in mail.outbox[1].subject
    assert orjson.loads(receiver.requests[1][1])["threshold_percent"] == 100
    recorded = dict(AlertSent.objects.filter(budget=budget).values_list("threshold", "notify"))
    assert recorded == {50: True, 80: False, 100: True}

    # Next month is a new period: the thresholds alert again.
    next_month = datetime.now(UTC).replace(day=1) + timedelta(days=40)
    _spend(org, 600_000, when=next_month)
    due = alerts.check_budgets(now=next_month)
    assert [(a.threshold, a.period_key) for a in due] == [(50, f"{next_month:%Y-%m}")]


def test_webhook_failure_is_retried_without_resending_the_email(make_tenant, receiver, eager_celery):
    tenant = make_tenant("alerts-retry")
    _, plaintext = services.key_issue(tenant=tenant, name="k")
    from tenants.models import ApiKey

    key = ApiKey.objects.get(tenant=tenant)
    budget_services.budget_set(
        api_key=key,
        period="day",
        limit_micro=100,
        alert_thresholds=[100],
        alert_emails=["dev@example.com"],
        webhook_url=receiver.url,
        webhook_secret="s3cret",
    )
    _spend(tenant, 100, key_id=key.pk)
    receiver.statuses = [500, 503]  # fails twice, then accepts
    task = tasks.deliver_budget_alert
    policy = {name: getattr(task, name) for name in ("autoretry_for", "max_retries", "retry_backoff")}
    assert alerts.DeliveryError in policy["autoretry_for"] and policy["max_retries"] >= 5 and policy["retry_backoff"]
    assert tasks.check_budget_alerts.apply().get() == 1  # delivery runs eagerly, with Celery's retries
    assert len(receiver.requests) == 3
    for headers, body in receiver.requests:
        _verify_independently("s3cret", headers, body)
    assert len(mail.outbox) == 1
    alert = AlertSent.objects.get(budget__api_key=key)
    assert alert.attempts == 3 and alert.webhook_sent_at and alert.email_sent_at and alert.last_error == ""
    assert orjson.loads(receiver.requests[-1][1])["scope"] == "key"


def test_delivery_failure_raises_for_retry_and_records_the_error(make_tenant, receiver, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    tenant = make_tenant("alerts-down")
    budget_services.budget_set(
        tenant=tenant, period="total", limit_micro=10, alert_thresholds=[50], webhook_url=receiver.url
    )
    _spend(tenant, 5)
    [alert] = alerts.check_budgets()
    receiver.statuses = [500]
    with pytest.raises(alerts.DeliveryError):
        alerts.deliver(alert.pk)
    alert.refresh_from_db()
    assert alert.webhook_sent_at is None and "500" in alert.last_error
    alerts.deliver(alert.pk)
    alert.refresh_from_db()
    assert alert.webhook_sent_at is not None and alert.attempts == 2

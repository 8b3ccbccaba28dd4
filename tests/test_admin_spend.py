"""Spend in the admin: the budget list, the tenant page and the key page show spent, reserved,
remaining and percent; the usage ledger filters by tenant and downloads as exact CSV."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from django_otp.plugins.otp_totp.models import TOTPDevice

from budgets import counters, services
from budgets.models import Budget
from budgets.periods import budget_counter
from ledger import writer
from tenants import services as tenant_services
from tests.test_admin import PASSWORD, otp_login


@pytest.fixture
def admin_client(db):
    """A superuser signed in past the TOTP second factor, as tests/test_admin.py does it."""
    user = get_user_model().objects.create_superuser("spend-root", "root@example.com", PASSWORD)
    device = TOTPDevice.objects.create(user=user, name="phone", confirmed=True)
    client = Client()
    response = otp_login(client, user, device)
    assert response.status_code == 302, response.content[:2000]
    return client


def _row(tenant, key, cost, when=None):
    return {
        "request_id": f"req_{uuid.uuid4().hex}",
        "created_at": (when or datetime.now(UTC) - timedelta(minutes=1)).timestamp(),
        "tenant_id": tenant.pk,
        "api_key_id": key.pk if key else None,
        "endpoint": "chat",
        "requested_model": "gpt-4o",
        "served_model": "gpt-4o",
        "provider": "fake-openai",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_micro": cost,
        "status": "ok",
    }


@pytest.fixture
def world(db):
    acme = tenant_services.tenant_create(slug="spend-acme", name="Acme")
    other = tenant_services.tenant_create(slug="spend-other", name="Other")
    key, _ = tenant_services.key_issue(tenant=acme, name="ci")
    other_key, _ = tenant_services.key_issue(tenant=other, name="ci")
    hard = services.budget_set(tenant=acme, period="month", limit_micro=4_000_000)
    soft = services.budget_set(tenant=acme, period="month", limit_micro=2_000_000, hard=False)
    key_budget = services.budget_set(api_key=key, period="month", limit_micro=1_000_000)
    writer.write_rows([_row(acme, key, 1_000_001), _row(acme, None, 1), _row(other, other_key, 777_777)])
    return {"acme": acme, "other": other, "key": key, "hard": hard, "soft": soft, "key_budget": key_budget}


def _cells(html: str) -> str:
    return " ".join(html.split())


def test_budget_list_shows_spent_reserved_remaining_and_percent(admin_client, world):
    page = _cells(admin_client.get(reverse("admin:budgets_budget_changelist")).content.decode())
    # Hard $4 cap and soft $2 level of acme: $1.000002 spent each; the key's $1 budget: $1.000001.
    assert "$1.000002" in page and "$2.999998" in page and "25.0%" in page  # hard: remaining, percent
    assert "$0.999998" in page and "50.0%" in page  # soft level
    assert "$1.000001" in page and "100.0%" in page  # the key's budget (remaining $0.00)
    assert "$0.777777" not in page  # another tenant's spend is not counted


def test_reserved_comes_from_the_live_counter(admin_client, world, settings):
    budget = Budget.objects.select_related("tenant").get(pk=world["hard"].pk)
    counter = budget_counter(budget)
    if settings.REDIS_URL:
        import redis

        conn = redis.Redis.from_url(settings.REDIS_URL)
        root = world["acme"].pk
        conn.set(counters.counter_key(root, counter.name), 1_000_002 + 250_000)
        conn.close()
    else:
        counters._memory_store.values[counter.name] = 1_000_002 + 250_000
    url = reverse("admin:budgets_budget_change", args=[budget.pk])
    page = _cells(admin_client.get(url).content.decode())
    assert "$0.25" in page  # reserved: in flight beyond the ledger
    assert "$2.749998" in page  # remaining = limit - spent - reserved


def test_tenant_page_shows_its_budgets_spend(admin_client, world):
    page = _cells(admin_client.get(reverse("admin:tenants_tenant_change", args=[world["acme"].pk])).content.decode())
    assert "$1.000002" in page and "$2.999998" in page and "25.0%" in page and "50.0%" in page
    other = admin_client.get(reverse("admin:tenants_tenant_change", args=[world["other"].pk])).content.decode()
    assert "$1.000002" not in other


def test_key_page_shows_the_keys_budgets_and_spend(admin_client, world):
    page = _cells(admin_client.get(reverse("admin:tenants_apikey_change", args=[world["key"].pk])).content.decode())
    assert "budgets of this key" in page.lower() and "chittycan-key-budgets" in page
    assert "$1.000001" in page and "100.0%" in page and "$1.00" in page
    add = admin_client.get(reverse("admin:tenants_apikey_add"))
    assert add.status_code == 200 and "budgets of this key" not in add.content.decode().lower()


def _csv(response) -> list[dict[str, str]]:
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert response.streaming and "attachment" in response["Content-Disposition"]
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


def test_usage_ledger_filters_by_tenant_and_downloads_exact_csv(admin_client, world):
    changelist = reverse("admin:ledger_usagerecord_changelist")
    acme = world["acme"].pk
    page = admin_client.get(changelist, {"tenant": acme}).content.decode()
    assert "spend-acme" in page and "1000001 µ$" in page and "777777 µ$" not in page
    assert f"csv/?tenant={acme}" in page  # the download link carries the filters

    rows = _csv(admin_client.get(reverse("admin:ledger_usagerecord_csv"), {"tenant": acme}))
    assert sorted(r["cost_micro"] for r in rows) == ["1", "1000001"]
    assert {r["tenant"] for r in rows} == {"spend-acme"}
    assert sorted(r["cost_usd"] for r in rows) == ["0.000001", "1.000001"]
    assert {r["api_key_prefix"] for r in rows} == {world["key"].prefix, ""}

    everything = _csv(admin_client.get(reverse("admin:ledger_usagerecord_csv")))
    assert sum(int(r["cost_micro"]) for r in everything) == 1_000_001 + 1 + 777_777

    # The action: the ticked rows only.
    ids = [str(r["id"]) for r in everything if r["tenant"] == "spend-other"]
    picked = _csv(admin_client.post(changelist, {"action": "download_csv", "_selected_action": ids, "index": 0}))
    assert [r["cost_micro"] for r in picked] == ["777777"]


def test_csv_needs_staff(client, world):
    response = client.get(reverse("admin:ledger_usagerecord_csv"))
    assert response.status_code == 302 and "/login" in response["Location"]


def test_bad_tenant_filter_is_not_a_500(admin_client, world):
    response = admin_client.get(reverse("admin:ledger_usagerecord_changelist"), {"tenant": "nope"})
    assert response.status_code in (200, 302)
    response = admin_client.get(reverse("admin:ledger_usagerecord_csv"), {"tenant": "nope"})
    assert response.status_code in (200, 302)
    if response.status_code == 200:
        assert _csv(response) == []


def test_spend_falls_back_to_the_ledger_when_redis_is_unreachable(admin_client, world, settings):
    settings.REDIS_URL = "redis://127.0.0.1:9/0"  # nothing listens there
    page = _cells(admin_client.get(reverse("admin:budgets_budget_changelist")).content.decode())
    assert "$1.000002" in page and "$2.999998" in page and "25.0%" in page
    assert "(no live counter)" in page


def test_admin_form_refuses_to_weaken_a_hard_budget_unless_ticked(admin_client, world):
    hard = world["hard"]
    url = reverse("admin:budgets_budget_change", args=[hard.pk])
    form = {
        "tenant": str(world["acme"].pk),
        "api_key": "",
        "period": "month",
        "limit_usd": "4.5",
        "hard": "on",
        "alert_thresholds": "[50, 80, 100]",
        "alert_emails": "[]",
        "webhook_url": "",
    }
    response = admin_client.post(url, form)
    assert response.status_code == 200 and "Allow weakening" in response.content.decode()
    assert Budget.objects.get(pk=hard.pk).limit_micro == 4_000_000
    response = admin_client.post(url, {**form, "hard": ""})  # turning it soft is weakening too
    assert response.status_code == 200 and Budget.objects.get(pk=hard.pk).hard
    response = admin_client.post(url, {**form, "limit_usd": "3"})  # tightening needs no tick
    assert response.status_code == 302 and Budget.objects.get(pk=hard.pk).limit_micro == 3_000_000
    response = admin_client.post(url, {**form, "allow_weaken": "on"})
    assert response.status_code == 302 and Budget.objects.get(pk=hard.pk).limit_micro == 4_500_000
    # A second hard budget on the same scope and period is a form error, not a 500.
    add = {**form, "limit_usd": "1"}
    response = admin_client.post(reverse("admin:budgets_budget_add"), add)
    assert response.status_code == 200 and Budget.objects.filter(tenant=world["acme"], hard=True).count() == 1


def test_tenant_page_refuses_a_second_hard_budget_inline(admin_client, world):
    acme = world["acme"]
    form = {
        "slug": acme.slug,
        "name": acme.name,
        "kind": acme.kind,
        "parent": "",
        "is_active": "on",
        "plan": "",
        "time_zone": "UTC",
        "stripe_customer_id": "",
        "rpm_limit": "",
        "tpm_limit": "",
        "allowed_models": "[]",
    }
    existing = list(Budget.objects.filter(tenant=acme).order_by("pk"))
    rows = [
        {
            "id": str(b.pk),
            "tenant": str(acme.pk),
            "period": b.period,
            "limit_usd": str(b.limit_micro / 1_000_000),
            "hard": "on" if b.hard else "",
            "alert_thresholds": "[50, 80, 100]",
            "alert_emails": "[]",
            "webhook_url": "",
        }
        for b in existing
    ]
    extra = {"tenant": str(acme.pk), "period": "month", "limit_usd": "9", "hard": "on"}
    extra.update({"alert_thresholds": "[]", "alert_emails": "[]", "webhook_url": ""})
    data = dict(form)
    data.update({"budgets-TOTAL_FORMS": str(len(rows) + 1), "budgets-INITIAL_FORMS": str(len(rows))})
    data.update({"budgets-MIN_NUM_FORMS": "0", "budgets-MAX_NUM_FORMS": "1000"})
    for i, row in enumerate([*rows, extra]):
        data.update({f"budgets-{i}-{k}": v for k, v in row.items()})
    response = admin_client.post(reverse("admin:tenants_tenant_change", args=[acme.pk]), data)
    assert response.status_code == 200, response.status_code  # the form again, with the error
    assert "This scope already has a hard month budget ($4.00)" in response.content.decode()
    assert Budget.objects.filter(tenant=acme, hard=True).get().limit_micro == 4_000_000

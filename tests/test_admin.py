"""The admin: every registered model's pages load for a superuser who passed the TOTP second factor;
staff without a verified device are sent back to the login; a new key's plaintext is shown once."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice

from budgets.models import Budget
from gateway.models import LLMModel, Provider
from ledger.models import ProbeRecord, UsageRecord
from tenants import keys, services
from tenants.models import ApiKey, AuditEvent, Plan, Tenant

PASSWORD = "correct horse battery staple"


def current_code(device: TOTPDevice) -> str:
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    return f"{totp.token():0{device.digits}d}"


def otp_login(client: Client, user, device: TOTPDevice | None, code: str | None = None):
    data = {"username": user.get_username(), "password": PASSWORD, "next": "/admin/"}
    if device is not None or code is not None:
        data["otp_token"] = code if code is not None else current_code(device)
    return client.post(reverse("admin:login"), data)


@pytest.fixture
def superuser(db):
    return get_user_model().objects.create_superuser("root", "root@example.com", PASSWORD)


@pytest.fixture
def admin_client(superuser) -> Client:
    device = TOTPDevice.objects.create(user=superuser, name="phone", confirmed=True)
    client = Client()
    response = otp_login(client, superuser, device)
    assert response.status_code == 302 and response["Location"] == "/admin/", response.content[:2000]
    return client


@pytest.fixture
def rows(db):
    """One row of each of our models, so every change page has something to show."""
    plan = Plan.objects.create(slug="pro", name="Pro")
    org = services.tenant_create(slug="acme", name="Acme", plan=plan)
    team = services.tenant_create(slug="acme-ml", parent=org, kind="team")
    api_key, _ = services.key_issue(tenant=team, name="ci", scopes={"models": ["gpt-4o"]})
    Budget.objects.create(tenant=org, period="month", limit_micro=12_500_000)
    provider = Provider(slug="up", kind="openai", base_url="https://up.example/v1")
    provider.api_key = "sk-very-secret-upstream"
    provider.save()
    UsageRecord.objects.create(
        request_id="req_admin1",
        tenant=team,
        api_key=api_key,
        endpoint="chat",
        requested_model="gpt-4o",
        served_model="gpt-4o",
        provider="up",
        prompt_tokens=10,
        completion_tokens=7,
        cost_micro=95,
    )
    ProbeRecord.objects.create(
        provider="up",
        model="gpt-4o",
        upstream_model="gpt-4o",
        trigger="interval",
        result="ok",
        prompt_tokens=8,
        completion_tokens=1,
        cost_micro=30,
    )
    return {"org": org, "team": team, "key": api_key, "provider": provider}


def test_every_registered_model_changelist_add_and_change_pages_load(admin_client, rows):
    checked = []
    for model, model_admin in admin.site._registry.items():
        opts = model._meta
        base = f"admin:{opts.app_label}_{opts.model_name}"
        response = admin_client.get(reverse(f"{base}_changelist"))
        assert response.status_code == 200, f"{opts.label} changelist: {response.status_code}"
        request = response.wsgi_request
        if model_admin.has_add_permission(request):
            response = admin_client.get(reverse(f"{base}_add"))
            assert response.status_code == 200, f"{opts.label} add: {response.status_code}"
        obj = model._default_manager.first()
        if obj is not None:
            response = admin_client.get(reverse(f"{base}_change", args=[obj.pk]))
            assert response.status_code == 200, f"{opts.label} change: {response.status_code}"
        checked.append(opts.label)
    ours = {
        "tenants.Tenant",
        "tenants.Plan",
        "tenants.ApiKey",
        "budgets.Budget",
        "tenants.AuditEvent",
        "gateway.Provider",
        "gateway.LLMModel",
        "ledger.UsageRecord",
        "ledger.ProbeRecord",
        "otp_totp.TOTPDevice",
    }
    assert ours <= set(checked)


def test_tenant_pages_show_the_tree(admin_client, rows):
    page = admin_client.get(reverse("admin:tenants_tenant_changelist")).content.decode()
    assert "acme › acme-ml" in page
    page = admin_client.get(reverse("admin:tenants_tenant_change", args=[rows["org"].pk])).content.decode()
    assert f'href="/admin/tenants/tenant/{rows["team"].pk}/change/">acme-ml</a>' in page
    subtree = admin_client.get(reverse("admin:tenants_tenant_changelist") + f"?subtree={rows['org'].pk}")
    assert subtree.status_code == 200 and "acme-ml" in subtree.content.decode()


def test_staff_without_a_device_is_sent_to_enrolment_and_a_session_without_otp_is_refused(db):
    staff = get_user_model().objects.create_user("bob", "bob@example.com", PASSWORD, is_staff=True)
    client = Client()
    response = otp_login(client, staff, None)
    assert response.status_code == 302 and response["Location"] == "/admin/otp/enrol/?next=/admin/"
    # Enrolment is all the password opens (tests/test_admin_otp_enrolment.py has the rest).
    assert client.get(reverse("admin:tenants_tenant_changelist")).status_code == 302
    # A password-only session of someone who has a device still cannot reach the admin.
    TOTPDevice.objects.create(user=staff, name="phone", confirmed=True)
    client = Client()
    client.force_login(staff)
    response = client.get(reverse("admin:index"))
    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))
    page = client.get(response["Location"]).content.decode()
    assert "needs your authenticator code" in page and 'name="otp_token"' in page
    assert client.get(reverse("admin:tenants_tenant_changelist")).status_code == 302


def test_wrong_code_is_refused_and_right_code_lets_staff_in(db):
    staff = get_user_model().objects.create_superuser("carol", "carol@example.com", PASSWORD)
    device = TOTPDevice.objects.create(user=staff, name="phone", confirmed=True)
    client = Client()
    wrong = f"{(int(current_code(device)) + 1) % 10**6:06d}"
    response = otp_login(client, staff, device, code=wrong)
    assert response.status_code == 200 and "Invalid token" in response.content.decode()
    assert client.get(reverse("admin:index")).status_code == 302
    device.refresh_from_db()
    device.throttling_failure_count = 0
    device.throttling_failure_timestamp = None
    device.save()
    response = otp_login(client, staff, device)
    assert response.status_code == 302
    assert client.get(reverse("admin:index")).status_code == 200


def test_otp_can_be_switched_off_for_development(db, settings):
    settings.CHITTYCAN_ADMIN_REQUIRE_OTP = False
    staff = get_user_model().objects.create_superuser("dev", "dev@example.com", PASSWORD)
    client = Client()
    response = otp_login(client, staff, None)
    assert response.status_code == 302
    assert client.get(reverse("admin:index")).status_code == 200
    assert 'name="otp_token"' not in Client().get(reverse("admin:login")).content.decode()


def test_issuing_a_key_shows_the_plaintext_once(admin_client, rows):
    response = admin_client.post(
        reverse("admin:tenants_apikey_add"),
        {
            "tenant": rows["org"].pk,
            "name": "from-admin",
            "scopes": '{"models": ["gpt-4o"], "endpoints": ["chat"]}',
            "rpm_limit": "",
            "tpm_limit": "",
            "expires_at_0": "",
            "expires_at_1": "",
        },
    )
    # On the answer to the POST itself (no redirect), never in a cookie, never cached.
    assert response.status_code == 200
    page = response.content.decode()
    shown = re.findall(r'class="chittycan-new-key">(chitty_[0-9A-Za-z]+)<', page)
    assert len(shown) == 1
    plaintext = shown[0]
    assert all(plaintext not in morsel.OutputString() for morsel in response.cookies.values())
    assert "messages" not in response.cookies
    assert "no-store" in response["Cache-Control"]
    assert plaintext not in str(admin_client.session.items())
    row = ApiKey.objects.get(name="from-admin")
    assert keys.key_prefix(plaintext) == row.prefix and keys.verify_key(plaintext, row.hashed_secret)
    assert row.scopes == {"models": ["gpt-4o"], "endpoints": ["chat"]}
    # Never again: not on the change page, not in the list, and the hash is never displayed.
    for url in (reverse("admin:tenants_apikey_change", args=[row.pk]), reverse("admin:tenants_apikey_changelist")):
        again = admin_client.get(url).content.decode()
        assert plaintext not in again and row.hashed_secret not in again
        assert row.prefix in again


def test_bad_scopes_are_refused_in_the_admin(admin_client, rows):
    response = admin_client.post(
        reverse("admin:tenants_apikey_add"),
        {"tenant": rows["org"].pk, "name": "x", "scopes": '{"endpoints": ["pictures"]}'},
    )
    assert response.status_code == 200 and "unknown endpoint pictures" in response.content.decode()
    assert not ApiKey.objects.filter(name="x").exists()


def test_revoke_and_rotate_actions(admin_client, rows):
    url = reverse("admin:tenants_apikey_changelist")
    key = rows["key"]
    response = admin_client.post(url, {"action": "rotate_keys", "_selected_action": [key.pk]})
    assert response.status_code == 200
    shown = re.findall(r'class="chittycan-new-key">(chitty_[0-9A-Za-z]+)<', response.content.decode())
    assert len(shown) == 1
    assert all(shown[0] not in morsel.OutputString() for morsel in response.cookies.values())
    assert "no-store" in response["Cache-Control"]
    key.refresh_from_db()
    new = ApiKey.objects.get(prefix=keys.key_prefix(shown[0]))
    assert key.revoked_at is not None and new.rotated_from_id == key.pk
    admin_client.post(url, {"action": "revoke_keys", "_selected_action": [new.pk]}, follow=True)
    new.refresh_from_db()
    assert new.revoked_at is not None


def test_provider_credential_is_write_only(admin_client, rows):
    provider = rows["provider"]
    url = reverse("admin:gateway_provider_change", args=[provider.pk])
    page = admin_client.get(url).content.decode()
    assert "sk-very-secret-upstream" not in page and provider.api_key_encrypted not in page
    form = {
        "slug": "up",
        "kind": "openai",
        "base_url": "https://up.example/v1",
        "is_active": "on",
        "api_key": "",
        "extra_headers": "{}",
        "connect_timeout": "5",
        "read_timeout": "600",
        "max_retries": "2",
    }
    assert admin_client.post(url, form).status_code == 302
    provider.refresh_from_db()
    assert provider.api_key == "sk-very-secret-upstream"  # empty field keeps the stored key
    assert admin_client.post(url, {**form, "api_key": "sk-rotated"}).status_code == 302
    provider.refresh_from_db()
    assert provider.api_key == "sk-rotated" and "sk-rotated" not in provider.api_key_encrypted


def test_budget_in_usd_stored_in_micro_usd(admin_client, rows):
    response = admin_client.post(
        reverse("admin:budgets_budget_add"),
        {
            "tenant": rows["team"].pk,
            "period": "day",
            "limit_usd": "12.345678",
            "hard": "on",
            "alert_thresholds": "[50, 80, 100]",
            "alert_emails": '["ops@example.com"]',
            "webhook_url": "https://hooks.example/b",
            "new_webhook_secret": "whsec-admin-typed",
        },
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    budget = Budget.objects.get(tenant=rows["team"], period="day")
    assert budget.limit_micro == 12_345_678 and budget.webhook_secret == "whsec-admin-typed"
    event = AuditEvent.objects.get(action="budget.create", tenant=rows["team"])
    assert event.actor_label == "admin" and event.data["limit_micro"] == 12_345_678
    page = admin_client.get(reverse("admin:budgets_budget_change", args=[budget.pk])).content.decode()
    assert "whsec-admin-typed" not in page and 'value="12.345678"' in page
    page = admin_client.get(reverse("admin:budgets_budget_changelist")).content.decode()
    assert "$12.345678" in page and "12345678" in page and "$12.50" in page


def test_ledger_is_read_only(admin_client, rows):
    record = UsageRecord.objects.get(request_id="req_admin1")
    assert admin_client.get(reverse("admin:ledger_usagerecord_add")).status_code == 403
    page = admin_client.get(reverse("admin:ledger_usagerecord_changelist")).content.decode()
    assert "req_admin1" in page and "acme-ml" in page and "$0.000095" in page
    response = admin_client.post(reverse("admin:ledger_usagerecord_change", args=[record.pk]), {"cost_micro": "1"})
    assert response.status_code == 403
    record.refresh_from_db()
    assert record.cost_micro == 95
    assert (
        admin_client.get(reverse("admin:ledger_usagerecord_changelist") + "?created_at__year=2026").status_code == 200
    )


def test_model_admin_edits_go_to_the_audit_log(admin_client, rows):
    model = LLMModel.objects.get(name="gpt-4o")
    url = reverse("admin:gateway_llmmodel_change", args=[model.pk])
    response = admin_client.get(url)
    assert response.status_code == 200
    Tenant.objects.filter(pk=rows["team"].pk).update(rpm_limit=None)
    response = admin_client.post(
        reverse("admin:tenants_plan_change", args=[Plan.objects.get(slug="pro").pk]),
        {
            "slug": "pro",
            "name": "Pro plus",
            "monthly_request_quota": "",
            "rpm_limit": "60",
            "tpm_limit": "",
            "created_at_0": "2025-01-01",
            "created_at_1": "00:00:00",
        },
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    event = AuditEvent.objects.get(action="plan.update")
    assert event.actor is not None
    assert event.actor.get_username() == "root" and event.actor_label == "admin"
    assert set(event.data["fields"]) >= {"name", "rpm_limit"}
    assert datetime.now(UTC) >= event.at


def test_otp_enrol_prints_url_and_qr_and_the_device_logs_in(db):
    import io
    from urllib.parse import parse_qs, urlparse

    from django.core.management import call_command

    staff = get_user_model().objects.create_superuser("dana", "dana@example.com", PASSWORD)
    out, err = io.StringIO(), io.StringIO()
    call_command("otp", "enrol", "--user", "dana", stdout=out, stderr=err)
    text = out.getvalue()
    url = next(line for line in text.splitlines() if line.startswith("otpauth://totp/"))
    assert "ChittyCan" in url and parse_qs(urlparse(url).query)["secret"][0]
    assert "█" in text or "▀" in text or "▄" in text  # the terminal QR code
    device = TOTPDevice.objects.get(user=staff)
    client = Client()
    assert otp_login(client, staff, device).status_code == 302
    assert client.get(reverse("admin:index")).status_code == 200
    call_command("otp", "enrol", "--user", "dana", "--replace", "--no-qr", stdout=io.StringIO(), stderr=err)
    assert TOTPDevice.objects.filter(user=staff).count() == 1
    call_command("otp", "remove", "--user", "dana", stdout=io.StringIO())
    assert not TOTPDevice.objects.filter(user=staff).exists()


def test_tenant_created_in_the_admin_goes_through_the_service(admin_client, rows):
    form = {
        "slug": "acme-web",
        "name": "Acme Web",
        "kind": "team",
        "parent": rows["org"].pk,
        "is_active": "on",
        "plan": "",
        "time_zone": "Europe/Paris",
        "stripe_customer_id": "",
        "rpm_limit": "30",
        "tpm_limit": "",
        "allowed_models": '["gpt-4o"]',
        "budgets-TOTAL_FORMS": "1",
        "budgets-INITIAL_FORMS": "0",
        "budgets-MIN_NUM_FORMS": "0",
        "budgets-MAX_NUM_FORMS": "1000",
        "budgets-0-period": "month",
        "budgets-0-limit_usd": "50.00",
        "budgets-0-hard": "on",
        "budgets-0-alert_thresholds": "[80, 100]",
        "budgets-0-alert_emails": "[]",
        "budgets-0-webhook_url": "",
        "budgets-0-new_webhook_secret": "",
    }
    response = admin_client.post(reverse("admin:tenants_tenant_add"), form)
    assert response.status_code == 302, response.content.decode()[:3000]
    web = Tenant.objects.get(slug="acme-web")
    assert (web.parent_id, web.time_zone, web.rpm_limit, web.allowed_models) == (
        rows["org"].pk,
        "Europe/Paris",
        30,
        ["gpt-4o"],
    )
    assert Budget.objects.get(tenant=web).limit_micro == 50_000_000
    assert AuditEvent.objects.filter(action="tenant.create", target="acme-web", actor_label="admin").exists()
    bad = {**form, "slug": "acme-bad", "allowed_models": '{"gpt-4o": 1}', "budgets-TOTAL_FORMS": "0"}
    response = admin_client.post(reverse("admin:tenants_tenant_add"), bad)
    assert response.status_code == 200 and "A list of public model names" in response.content.decode()
    # A tenant cannot become its own ancestor.
    org_form = {**form, "slug": "acme", "name": "Acme", "kind": "organisation", "parent": web.pk}
    org_form.update({"budgets-TOTAL_FORMS": "0", "allowed_models": "[]"})
    response = admin_client.post(reverse("admin:tenants_tenant_change", args=[rows["org"].pk]), org_form)
    assert response.status_code == 200 and "cannot be its own ancestor" in response.content.decode()


def test_a_key_added_from_a_budgets_plus_popup_is_shown_then_handed_to_the_form(admin_client, rows):
    """The "+" beside a budget's key opens "Add API key" in a popup: the popup shows the secret
    first (Django's own popup answer would close at once and lose it), then its link gives the
    opener the new key's id and label, never the secret."""
    response = admin_client.post(
        reverse("admin:tenants_apikey_add") + "?_to_field=id&_popup=1",
        {"tenant": rows["org"].pk, "name": "from-popup", "scopes": "{}", "_popup": "1", "_to_field": "id"},
    )
    assert response.status_code == 200
    page = response.content.decode()
    plaintext = re.findall(r'class="chittycan-new-key">(chitty_[0-9A-Za-z]+)<', page)[0]
    row = ApiKey.objects.get(name="from-popup")
    found = re.search(r'id="use-new-key" href="([^"]+)"', page)
    assert found is not None
    link = found.group(1).replace("&amp;", "&")
    assert link == f"/admin/tenants/apikey/{row.pk}/popup-done/?_popup=1&_to_field=id"
    done = admin_client.get(link)
    assert done.status_code == 200
    body = done.content.decode()
    assert "popup_response.js" in body and f"&quot;value&quot;: &quot;{row.pk}&quot;" in body
    assert plaintext not in body and row.prefix in body
    # Not a way to read other things: an unknown key, a field that may not be referenced.
    assert admin_client.get(f"/admin/tenants/apikey/{row.pk + 999}/popup-done/?_popup=1").status_code == 404
    assert admin_client.get(f"/admin/tenants/apikey/{row.pk}/popup-done/?_to_field=hashed_secret").status_code == 400
    assert Client().get(link).status_code == 302  # signed-out: to the login

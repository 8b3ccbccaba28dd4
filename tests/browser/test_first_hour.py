"""Issue 8's "done when", in the browser: a new operator signs into the admin with a second factor
they enrolled themselves, creates a tenant, a budget and a key, and the key works against /v1."""

from __future__ import annotations

from playwright.sync_api import Page, expect

from budgets.models import Budget
from tenants.models import ApiKey, Tenant
from tests.browser.admin_flows import (
    add_budget,
    add_key,
    enrolled_staff,
    next_login_code,
    saved,
    sign_in,
    sign_out,
    signed_in_as,
)
from tests.browser.test_api_keys import chat
from tests.fakes.server import ServerThread


def test_first_hour_of_a_new_operator(page: Page, app_server: ServerThread, upstream: object) -> None:
    # First sign-in: the password, then enrolling the authenticator (QR page, backup codes).
    secret, codes = enrolled_staff(page, "ops")
    assert len(codes) == 10
    # Later sign-ins need the second factor.
    sign_out(page)
    sign_in(page, "ops", code=next_login_code(secret, "ops"))
    signed_in_as(page, "ops")

    # A tenant.
    page.goto("/admin/tenants/tenant/add/")
    page.fill("#id_slug", "acme")
    page.fill("#id_name", "Acme Corp")
    page.click("input[name=_save]")
    saved(page)
    expect(page.locator("#result_list")).to_contain_text("acme")
    tenant = Tenant.objects.get(slug="acme")
    assert tenant.name == "Acme Corp" and tenant.parent_id is None

    # A hard cap on it, $5.00 a month with alerts at 50 % and 80 %, and a soft alert level at $8.
    add_budget(page, "acme", "5.00", hard=True, alerts=[50, 80])
    add_budget(page, "acme", "8.00", hard=False, alerts=[100])
    budgets = sorted(Budget.objects.filter(tenant=tenant), key=lambda b: b.limit_micro)
    assert [(b.period, b.limit_micro, b.hard, b.alert_thresholds) for b in budgets] == [
        ("month", 5_000_000, True, [50, 80]),
        ("month", 8_000_000, False, [100]),
    ]

    # A key, shown once, that works.
    plaintext = add_key(page, "acme", "first-key")
    assert ApiKey.objects.get(name="first-key").tenant_id == tenant.pk
    assert chat(app_server, plaintext)


def test_autocomplete_tenant_picker_on_add_api_key(page: Page, upstream: object) -> None:
    """The select2 tenant picker works (it needs the admin's static files to be served)."""
    assert page.request.get("/static/admin/js/vendor/select2/select2.full.min.js").status == 200
    enrolled_staff(page, "pat")
    Tenant.objects.create(slug="acme", name="Acme")
    Tenant.objects.create(slug="globex", name="Globex")
    page.goto("/admin/tenants/apikey/add/")
    page.locator(".field-tenant .select2-selection").click(timeout=3000)
    page.fill(".select2-search__field", "glob")
    page.locator(".select2-results__option", has_text="globex").click()
    page.fill("#id_name", "picked")
    page.click("input[name=_save]")
    expect(page.locator(".chittycan-new-key")).to_have_count(1)
    assert ApiKey.objects.get(name="picked").tenant.slug == "globex"

"""The tenant dashboard in a real browser: sign in with the second factor, create a key and see it
once, revoke it, watch a request appear in the live feed within a second of finishing, filter the
usage table and download the CSV (its totals equal the ledger), and a viewer who cannot create keys.

With ``CHITTYCAN_DASHBOARD_SCREENSHOTS=<dir>`` the main pages are saved there as PNG (docs/img/
holds the ones the README and docs/dashboard.md show).
"""

from __future__ import annotations

import csv
import io
import os
import re
import time
from pathlib import Path

import openai
from django.contrib.auth import get_user_model
from django.db.models import Sum
from django_otp.plugins.otp_totp.models import TOTPDevice
from playwright.sync_api import Page, expect

from budgets import services as budget_services
from control.models import TenantMembership
from gateway import policies
from ledger.models import UsageRecord
from tenants import services
from tenants.models import ApiKey
from tests.conftest import exact_usage
from tests.fakes.server import ServerThread
from tests.test_admin import current_code

PASSWORD = "a long passphrase for the dashboard"
SHOTS = os.environ.get("CHITTYCAN_DASHBOARD_SCREENSHOTS", "")


def shot(page: Page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"dashboard-{name}.png"), full_page=True)


def sign_in(page: Page, username: str, code: str | None) -> None:
    page.goto("/dashboard/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    if code is not None:
        page.fill("#id_otp_token", code)
    page.click("#sign-in")
    page.wait_for_load_state()


def chat(server: ServerThread, key: str, model: str = "gpt-4o") -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": "hi"}])
    return str(raw.headers["x-request-id"])


def test_owner_signs_in_with_totp_manages_keys_watches_the_feed_and_downloads_usage(
    page: Page, app_server: ServerThread, upstream: object
) -> None:
    acme = services.tenant_create(slug="acme", name="Acme Corp", require_otp=True)
    team = services.tenant_create(slug="acme-search", name="Search team", parent=acme, kind="team")
    services.tenant_create(slug="acme-ads", name="Ads team", parent=acme, kind="team")
    lee = get_user_model().objects.create_user("lee", password=PASSWORD)
    TenantMembership.objects.create(user=lee, tenant=acme, role="owner")
    device = TOTPDevice.objects.create(user=lee, name="phone", confirmed=True)
    budget_services.budget_set(tenant=team, period="month", limit_micro=5_000_000, actor_label="test")
    _, team_key = services.key_issue(tenant=team, name="search-api", actor_label="test")
    policies.policy_put(name="acme-routing", rules=[{"name": "all-to-gpt-4o", "route": "gpt-4o"}], tenant=acme)
    for _ in range(3):
        chat(app_server, team_key)
    exact_usage(team, 3, settle=0)

    # The tenant asks for a second factor: the password alone is not enough.
    sign_in(page, "lee", code=None)
    expect(page.locator(".errorlist")).to_contain_text("authenticator")
    sign_in(page, "lee", code=current_code(device))
    expect(page).to_have_url(re.compile(r"/dashboard/t/acme/$"))
    expect(page.locator("#stat-requests")).to_have_text("3")
    expect(page.locator("#spend-chart")).to_be_visible()
    page.wait_for_function("() => window.Chart && Object.keys(Chart.instances).length === 1")
    shot(page, "overview")

    # Keys: created and shown once, then revoked.
    page.click("nav.tabs >> text=Keys")
    page.fill("#id_name", "from-browser")
    page.select_option("#id_tenant", label="acme-search")
    page.click("#create-key button[type=submit]")
    secret = page.inner_text("#new-key-secret")
    assert re.fullmatch(r"chitty_[0-9A-Za-z]+", secret)
    shot(page, "keys")
    created = ApiKey.objects.get(name="from-browser")
    assert created.user_id == lee.pk and created.tenant_id == team.pk
    page.goto("/dashboard/t/acme/keys/")
    assert secret not in page.content()
    row = page.locator(f"tr[data-prefix='{created.prefix}']")
    row.locator("button.revoke").click()
    expect(page.locator(f"tr[data-prefix='{created.prefix}'] td.state")).to_have_text("revoked")
    created.refresh_from_db()
    assert created.revoked_at is not None

    # The live feed: a request shows up within a second of finishing.
    page.goto("/dashboard/t/acme/live/")
    expect(page.locator("#feed-state")).to_have_attribute("data-state", "open")
    request_id = chat(app_server, team_key)
    finished = time.monotonic()
    expect(page.locator(f"#feed tr[data-request-id='{request_id}']")).to_be_visible(timeout=1000)
    assert time.monotonic() - finished < 1.0
    shot(page, "live")
    exact_usage(team, 4, settle=0)

    # Usage: filter, then download the CSV; its total is the ledger's.
    page.goto("/dashboard/t/acme/usage/")
    page.fill("#id_model", "gpt-4o")
    page.click("#usage-filters button[type=submit]")
    expect(page).to_have_url(re.compile(r"model=gpt-4o"))
    expect(page.locator("#usage tbody tr")).to_have_count(4)
    shot(page, "usage")
    with page.expect_download() as info:
        page.click("#csv")
    body = Path(info.value.path()).read_text()
    rows = list(csv.DictReader(io.StringIO(body)))
    ledger = UsageRecord.objects.filter(tenant_id=team.pk, requested_model="gpt-4o").aggregate(s=Sum("cost_micro"))["s"]
    assert len(rows) == 4 and sum(int(r["cost_micro"]) for r in rows) == ledger > 0

    # A request's detail: stage timings, the upstream attempts and the routing policy's decision.
    page.click(f"#usage a:has-text('{request_id}')")
    expect(page.locator("#timings")).to_be_visible()
    expect(page.locator("#attempts tbody tr")).to_have_count(1)
    expect(page.locator("#attempts")).to_contain_text("primary")
    expect(page.locator("#route-summary")).to_contain_text("all-to-gpt-4o")
    expect(page.locator("#route-outcome")).to_contain_text("served by")
    shot(page, "request")
    page.goto("/dashboard/t/acme/tree/")
    expect(page.locator("#tree")).to_contain_text("acme-ads")
    shot(page, "tree")
    page.goto("/dashboard/t/acme/budgets/")
    shot(page, "budgets")
    page.goto("/dashboard/t/acme/audit/")
    expect(page.locator("#audit")).to_contain_text("key.revoke")
    shot(page, "audit")


def test_a_viewer_cannot_create_keys(page: Page, app_server: ServerThread) -> None:
    acme = services.tenant_create(slug="acme", name="Acme Corp")
    services.key_issue(tenant=acme, name="existing", actor_label="test")
    viv = get_user_model().objects.create_user("viv", password=PASSWORD)
    TenantMembership.objects.create(user=viv, tenant=acme, role="viewer")
    sign_in(page, "viv", code=None)
    expect(page).to_have_url(re.compile(r"/dashboard/t/acme/$"))
    expect(page.locator("#role")).to_have_text("viewer")
    page.goto("/dashboard/t/acme/keys/")
    expect(page.locator("#keys")).to_contain_text("existing")
    expect(page.locator("#read-only")).to_be_visible()
    assert page.locator("#create-key").count() == 0
    assert page.locator("button.revoke").count() == 0
    # Posting the form anyway (no page offers it) is refused.
    token = page.context.cookies()
    csrf = next(c["value"] for c in token if c["name"] == "csrftoken")
    response = page.request.post(
        "/dashboard/t/acme/keys/",
        form={"name": "sneaky", "tenant": str(acme.pk), "csrfmiddlewaretoken": csrf},
        headers={"Referer": page.url},
    )
    assert response.status == 404
    assert not ApiKey.objects.filter(name="sneaky").exists()

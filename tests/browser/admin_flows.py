"""What an operator does in the admin, step by step, as browser actions (shared by the browser tests)."""

from __future__ import annotations

import base64
import re
import time

from django.contrib.auth import get_user_model
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice
from playwright.sync_api import Page, expect

PASSWORD = "a long passphrase for the admin"
TOTP_STEP = 30


def totp_key(secret: str) -> bytes:
    clean = secret.replace(" ", "").upper()
    return base64.b32decode(clean + "=" * (-len(clean) % 8))


def totp_code(secret: str) -> str:
    """The code an authenticator app shows now for ``secret`` (base32, as on the enrolment page)."""
    totp = TOTP(totp_key(secret), step=TOTP_STEP, t0=0, digits=6, drift=0)
    return f"{totp.token():06d}"


def next_login_code(secret: str, username: str) -> str:
    """The code a user who waits for a fresh one types at their next sign-in. django-otp refuses a
    code of a step it already accepted, and follows the phone's clock drift it saw last time
    (within one step either way): so the step after the last one used, or the earliest the
    device accepts now, whichever is later (no waiting for the next 30-second window)."""
    device = TOTPDevice.objects.get(user__username=username, confirmed=True)
    now = int((time.time() - device.t0) // device.step) + device.drift
    step = max(device.last_t + 1, now - 1)
    assert step <= now + 1, "no code is acceptable before the next window"
    totp = TOTP(totp_key(secret), step=device.step, t0=device.t0, digits=device.digits, drift=0)
    totp.time = device.t0 + step * device.step + device.step / 2
    return f"{totp.token():0{device.digits}d}"


def sign_in(page: Page, username: str, code: str | None, password: str = PASSWORD, next_url: str = "/admin/") -> None:
    """Fill in the admin login form (the code field left empty when ``code`` is None) and submit."""
    page.goto(f"/admin/login/?next={next_url}")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    if code is not None:
        page.fill("#id_otp_token", code)
    page.click("#login-form input[type=submit]")
    page.wait_for_load_state()


def enrol(page: Page) -> tuple[str, list[str]]:
    """On the enrolment page after a first sign-in: read the secret, confirm with the app's code,
    return the secret and the backup codes shown once."""
    expect(page).to_have_url(re.compile(r"/admin/otp/enrol/"))
    expect(page.locator(".chittycan-qr svg")).to_be_visible()
    secret = page.inner_text("#otp-secret")
    page.fill("#id_token", totp_code(secret))
    page.click("#otp-enrol-form input[type=submit]")
    expect(page.locator("#backup-codes")).to_be_visible()
    codes = page.locator(".chittycan-backup-code").all_inner_texts()
    return secret, codes


def enrolled_staff(page: Page, username: str) -> tuple[str, list[str]]:
    """A new superuser (as `can createsuperuser` makes one) who signs in for the first time and
    enrols their authenticator: the browser is left signed in, with a verified session."""
    get_user_model().objects.create_superuser(username, f"{username}@example.com", PASSWORD)
    sign_in(page, username, code=None)
    secret, codes = enrol(page)
    page.click("#otp-continue")
    signed_in_as(page, username)
    return secret, codes


def sign_out(page: Page) -> None:
    page.click("#logout-form button[type=submit]")
    expect(page.locator("#content h1")).to_have_text("Logged out")


def signed_in_as(page: Page, username: str) -> None:
    """The admin index, with the user's name in the header."""
    page.goto("/admin/")
    expect(page).to_have_url(re.compile(r"/admin/$"))
    expect(page.locator("#user-tools")).to_contain_text(username)


def saved(page: Page) -> None:
    """The admin's confirmation after a save (the changelist, with its success message)."""
    expect(page.locator("ul.messagelist li.success")).to_be_visible()


def choose_related(page: Page, field: str, label: str) -> None:
    """Choose a related row in an autocomplete (select2) field as a person does: open the
    picker, type part of the label, click the match."""
    page.locator(f".field-{field} .select2-selection").click()
    page.fill(".select2-container--open .select2-search__field", label)
    page.locator(".select2-results__option", has_text=label).first.click()
    expect(page.locator(f".field-{field} .select2-selection__rendered")).to_contain_text(label)


def add_tenant(page: Page, slug: str, name: str) -> None:
    page.goto("/admin/tenants/tenant/add/")
    page.fill("#id_slug", slug)
    page.fill("#id_name", name)
    page.select_option("#id_kind", "organisation")
    page.click("input[name=_save]")
    saved(page)


def add_budget(
    page: Page,
    tenant_slug: str,
    limit_usd: str,
    *,
    hard: bool,
    alerts: list[int],
    period: str = "month",
) -> None:
    """One budget row on the budget form: the scope's hard cap (``hard=True``) or one of its soft
    alert levels (a scope and period hold one hard budget and any number of soft levels)."""
    page.goto("/admin/budgets/budget/add/")
    choose_related(page, "tenant", tenant_slug)
    page.select_option("#id_period", period)
    page.fill("#id_limit_usd", limit_usd)
    page.set_checked("#id_hard", hard)
    page.fill("#id_alert_thresholds", str(alerts))
    page.click("input[name=_save]")
    saved(page)


def add_key(page: Page, tenant_slug: str, name: str) -> str:
    """Add an API key; return its plaintext, read off the page the add POST answered with."""
    page.goto("/admin/tenants/apikey/add/")
    choose_related(page, "tenant", tenant_slug)
    page.fill("#id_name", name)
    page.click("input[name=_save]")
    expect(page.locator(".chittycan-new-key")).to_have_count(1)
    return page.inner_text(".chittycan-new-key")

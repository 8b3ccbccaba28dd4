"""What an operator does in the admin, step by step, as browser actions (shared by the browser tests)."""

from __future__ import annotations

import base64
import re
import time

from django_otp.oath import TOTP
from playwright.sync_api import Page, expect

PASSWORD = "a long passphrase for the admin"
TOTP_STEP = 30


def totp_code(secret: str, ahead: int = 0) -> str:
    """The code an authenticator app shows for ``secret`` (base32, as on the enrolment page),
    ``ahead`` steps from now. django-otp refuses a code of a step it has already accepted, so a
    second sign-in right after the first uses the next step's code (within its tolerance of one)."""
    clean = secret.replace(" ", "").upper()
    key = base64.b32decode(clean + "=" * (-len(clean) % 8))
    totp = TOTP(key, step=TOTP_STEP, t0=0, digits=6, drift=0)
    totp.time = time.time() + ahead * TOTP_STEP
    return f"{totp.token():06d}"


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


def sign_out(page: Page) -> None:
    page.click("#logout-form button[type=submit]")
    expect(page.locator("#content h1")).to_have_text("Logged out")


def signed_in_as(page: Page, username: str) -> None:
    """The admin index, with the user's name in the header."""
    page.goto("/admin/")
    expect(page).to_have_url(re.compile(r"/admin/$"))
    expect(page.locator("#user-tools")).to_contain_text(username)

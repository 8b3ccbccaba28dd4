"""Second factor, self-service: a staff member with no authenticator signs in with the password,
enrols one from the QR page (the test reads the secret off the page, as an app would from the QR
code), gets backup codes once, and from then on needs the app's code or an unused backup code."""

from __future__ import annotations

import re
import time

from django.contrib.auth import get_user_model
from django_otp.plugins.otp_static.models import StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice
from playwright.sync_api import Page, expect

from tenants.models import AuditEvent
from tests.browser.admin_flows import PASSWORD, enrol, next_login_code, sign_in, sign_out, signed_in_as, totp_code


def test_enrol_at_first_sign_in_then_token_then_backup_code_once(page: Page) -> None:
    get_user_model().objects.create_superuser("olive", "olive@example.com", PASSWORD)

    # The admin itself is closed to a password-only session: first sign-in goes to enrolment.
    sign_in(page, "olive", code=None)
    expect(page).to_have_url(re.compile(r"/admin/otp/enrol/"))
    page.goto("/admin/tenants/tenant/")
    expect(page).to_have_url(re.compile(r"/admin/otp/enrol/"))

    # A wrong code is refused and the device stays unconfirmed.
    secret = page.inner_text("#otp-secret")
    wrong = f"{(int(totp_code(secret)) + 1) % 10**6:06d}"
    page.fill("#id_token", wrong)
    page.click("#otp-enrol-form input[type=submit]")
    expect(page.locator(".errorlist")).to_contain_text("does not match")
    assert not TOTPDevice.objects.filter(user__username="olive", confirmed=True).exists()
    time.sleep(1.1)  # django-otp refuses every code for 1 s after a failure (doubling after each)

    # The same secret on a reload (the QR code already scanned stays valid); then the right code.
    page.goto(page.url)
    assert page.inner_text("#otp-secret") == secret
    enrolled_secret, codes = enrol(page)
    assert enrolled_secret == secret
    assert len(codes) == 10 and len(set(codes)) == 10
    assert all(re.fullmatch(r"[a-z2-7]{8}", code) for code in codes)
    assert TOTPDevice.objects.filter(user__username="olive", confirmed=True).count() == 1
    assert AuditEvent.objects.filter(action="otp.enrol", target="olive").exists()
    page.click("#otp-continue")
    signed_in_as(page, "olive")

    # Shown once: the enrolment page is gone now that a device is confirmed.
    page.goto("/admin/otp/enrol/")
    expect(page).to_have_url(re.compile(r"/admin/$"))
    expect(page.locator(".chittycan-backup-code")).to_have_count(0)
    sign_out(page)

    # Password alone no longer opens anything.
    sign_in(page, "olive", code=None)
    expect(page.locator(".errorlist, .errornote").first).to_be_visible()
    page.goto("/admin/")
    expect(page).to_have_url(re.compile(r"/admin/login/"))

    # Password and the app's code.
    sign_in(page, "olive", code=next_login_code(secret, "olive"))
    signed_in_as(page, "olive")
    sign_out(page)

    # Password and a backup code (typed in upper case with a space, as people copy them).
    backup = codes[3]
    sign_in(page, "olive", code=f"{backup[:4].upper()} {backup[4:].upper()}")
    signed_in_as(page, "olive")
    assert not StaticToken.objects.filter(token=backup).exists()
    sign_out(page)

    # The same backup code a second time: refused.
    sign_in(page, "olive", code=backup)
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator(".errornote, .errorlist").first).to_contain_text("Invalid token")
    page.goto("/admin/")
    expect(page).to_have_url(re.compile(r"/admin/login/"))

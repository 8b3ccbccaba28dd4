"""Second-factor self-enrolment over HTTP (the browser walk-through is tests/browser/test_otp_enrolment.py):
who may open the enrolment page, what it shows, what a confirmation does, and what it refuses."""

from __future__ import annotations

import base64
import io
import re
import time

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_otp.oath import TOTP
from django_otp.plugins.otp_static.models import StaticDevice, StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from chittycan import otp_views
from tests.browser.admin_flows import next_login_code

PASSWORD = "correct horse battery staple"
ENROL = "/admin/otp/enrol/"


def code_for(secret_text: str) -> str:
    secret = secret_text.replace(" ", "")
    totp = TOTP(base64.b32decode(secret + "=" * (-len(secret) % 8)), 30, 0, 6, 0)
    return f"{totp.token():06d}"


def password_login(client: Client, username: str, token: str = ""):
    data = {"username": username, "password": PASSWORD, "next": "/admin/tenants/"}
    if token:
        data["otp_token"] = token
    return client.post(reverse("admin:login"), data)


def shown_secret(page: str) -> str:
    match = re.search(r'id="otp-secret"[^>]*>([A-Z2-7 ]+)<', page)
    assert match, page[:3000]
    return match.group(1)


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_user("erin", "erin@example.com", PASSWORD, is_staff=True, is_superuser=True)


def test_enrolment_page_shows_qr_and_secret_and_confirmation_gives_backup_codes(staff):
    client = Client()
    response = password_login(client, "erin")
    assert response.status_code == 302 and response["Location"] == f"{ENROL}?next=/admin/tenants/"
    # The password alone logs nobody in: the REST API (which takes session logins) sees no one.
    assert "_auth_user_id" not in client.session
    assert client.get("/api/me/").status_code in (401, 403)
    assert client.get("/api/tenants/").status_code in (401, 403)
    response = client.get(response["Location"])
    page = response.content.decode()
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    assert "<svg" in page and "Authenticator QR code" in page
    secret = shown_secret(page)
    device = TOTPDevice.objects.get(user=staff)
    assert not device.confirmed
    assert base64.b32encode(device.bin_key).decode().rstrip("=") == secret.replace(" ", "")
    # Not yet verified: every admin page still sends the user back here (through the login).
    response = client.get("/admin/tenants/tenant/")
    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))
    assert client.get(response["Location"])["Location"].startswith(ENROL)

    # Bad input: a clear error on the page, nothing confirmed.
    for bad, error in [
        ("", "This field is required"),
        ("12345", "6-digit"),
        ("abcdef", "6-digit"),
        ("1234567", "6-digit"),
    ]:
        response = client.post(ENROL, {"token": bad, "next": "/admin/tenants/"})
        assert response.status_code == 200 and error in response.content.decode()
        assert shown_secret(response.content.decode()) == secret  # same device, same QR code
    assert not TOTPDevice.objects.filter(user=staff, confirmed=True).exists()

    response = client.post(ENROL, {"token": code_for(secret), "next": "/admin/tenants/"})
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    page = response.content.decode()
    codes = re.findall(r'class="chittycan-backup-code">([a-z2-7]+)<', page)
    assert len(codes) == otp_views.BACKUP_CODE_COUNT == len(set(codes))
    assert all(code not in morsel.OutputString() for morsel in response.cookies.values() for code in codes)
    assert 'href="/admin/tenants/"' in page
    device.refresh_from_db()
    assert device.confirmed
    assert sorted(StaticToken.objects.filter(device__user=staff).values_list("token", flat=True)) == sorted(codes)
    # This session is logged in and verified now: the admin opens, and the enrolment page is gone.
    assert client.get("/admin/tenants/tenant/").status_code == 200
    assert client.get("/api/me/").status_code == 200
    assert client.get(ENROL)["Location"] == "/admin/"


def test_after_wrong_codes_even_the_right_one_waits(staff):
    """django-otp's throttle (1 s after a failure, doubling): set as after ten failures, so the
    right code is refused however slow the machine."""
    client = Client()
    password_login(client, "erin")
    secret = shown_secret(client.get(ENROL).content.decode())
    TOTPDevice.objects.filter(user=staff).update(
        throttling_failure_count=10, throttling_failure_timestamp=timezone.now()
    )
    response = client.post(ENROL, {"token": code_for(secret)})
    assert response.status_code == 200 and "Too many wrong codes" in response.content.decode()
    assert not TOTPDevice.objects.filter(user=staff, confirmed=True).exists()


def test_a_password_only_session_of_someone_enrolled_cannot_enrol_again(staff):
    """The enrolment page never becomes a way round the second factor."""
    TOTPDevice.objects.create(user=staff, name="phone", confirmed=True)
    client = Client()
    response = password_login(client, "erin")
    assert response.status_code == 200 and "Please enter your OTP token" in response.content.decode()
    client.force_login(staff)  # a session with the password only
    response = client.get(ENROL)
    assert response.status_code == 302 and response["Location"] == "/admin/"
    assert client.post(ENROL, {"token": "123456"}).status_code == 302
    assert TOTPDevice.objects.filter(user=staff).count() == 1
    assert not StaticDevice.objects.filter(user=staff).exists()


def test_enrolment_is_only_for_signed_in_staff(db):
    assert Client().get(ENROL)["Location"].startswith(reverse("admin:login"))
    user = get_user_model().objects.create_user("finn", "finn@example.com", PASSWORD)  # not staff
    client = Client()
    client.force_login(user)
    assert client.get(ENROL).status_code == 302
    assert client.post(ENROL, {"token": "123456"}).status_code == 302
    assert not TOTPDevice.objects.filter(user=user).exists()
    # Nor does a wrong password start one.
    get_user_model().objects.create_user("gus", "gus@example.com", PASSWORD, is_staff=True)
    client = Client()
    response = client.post(reverse("admin:login"), {"username": "gus", "password": "wrong", "next": "/admin/"})
    assert response.status_code == 200 and "enter the correct username and password" in response.content.decode()
    assert client.get(ENROL)["Location"].startswith(reverse("admin:login"))


def test_the_password_opens_enrolment_for_a_few_minutes_and_while_it_is_unchanged(staff):
    client = Client()
    password_login(client, "erin")
    assert client.get(ENROL).status_code == 200
    session = client.session
    session[otp_views.PENDING_KEY] = {**session[otp_views.PENDING_KEY], "until": time.time() - 1}
    session.save()
    assert client.get(ENROL)["Location"].startswith(reverse("admin:login"))

    client = Client()
    password_login(client, "erin")
    staff.set_password("a new one entirely")
    staff.save()
    assert client.get(ENROL)["Location"].startswith(reverse("admin:login"))
    assert not TOTPDevice.objects.filter(user=staff, confirmed=True).exists()


def test_next_must_stay_on_this_site(staff):
    client = Client()
    password_login(client, "erin")
    page = client.get(f"{ENROL}?next=https://evil.example/").content.decode()
    assert "evil.example" not in page
    secret = shown_secret(page)
    page = client.post(ENROL, {"token": code_for(secret), "next": "https://evil.example/"}).content.decode()
    assert "evil.example" not in page and 'id="otp-continue" href="/admin/"' in page


def test_next_with_a_query_string_survives_the_trip(db):
    get_user_model().objects.create_user("hana", "hana@example.com", PASSWORD, is_staff=True)
    client = Client()
    target = "/admin/tenants/tenant/?kind=team&is_active=1"
    response = client.post(reverse("admin:login"), {"username": "hana", "password": PASSWORD, "next": target})
    assert response.status_code == 302
    assert client.get(response["Location"]).context["next"] == target


def test_backup_code_works_once_and_a_reset_means_enrolling_again(staff):
    client = Client()
    password_login(client, "erin")
    secret = shown_secret(client.get(ENROL).content.decode())
    page = client.post(ENROL, {"token": code_for(secret)}).content.decode()
    codes = re.findall(r'class="chittycan-backup-code">([a-z2-7]+)<', page)

    response = password_login(Client(), "erin", token=codes[0].upper())
    assert response.status_code == 302 and response["Location"] == "/admin/tenants/"
    response = password_login(Client(), "erin", token=codes[0])
    assert response.status_code == 200 and "Invalid token" in response.content.decode()
    # The app's code still works (a fresh one: the one used at enrolment is spent).
    assert password_login(Client(), "erin", token=next_login_code(secret, "erin")).status_code == 302

    # An operator resets the user: the next sign-in enrols a new device with new backup codes.
    call_command("otp", "remove", "--user", "erin", stdout=io.StringIO())
    client = Client()
    assert password_login(client, "erin")["Location"].startswith(ENROL)
    new_secret = shown_secret(client.get(ENROL).content.decode())
    assert new_secret != secret
    page = client.post(ENROL, {"token": code_for(new_secret)}).content.decode()
    new_codes = re.findall(r'class="chittycan-backup-code">([a-z2-7]+)<', page)
    assert len(new_codes) == otp_views.BACKUP_CODE_COUNT and not set(new_codes) & set(codes)
    assert StaticDevice.objects.filter(user=staff).count() == 1
    assert password_login(Client(), "erin", token=codes[1]).status_code == 200  # old codes are void


def test_backup_codes_never_look_like_an_app_code():
    codes = otp_views.new_backup_codes(200)
    assert len(set(codes)) == 200
    assert not any(otp_views.is_totp_code(code) for code in codes)
    assert otp_views.normalise_token(" AB12-cd34 ") == "ab12cd34"


def test_one_users_codes_never_sign_in_another(staff):
    other = get_user_model().objects.create_user("ivan", "ivan@example.com", PASSWORD, is_staff=True)
    TOTPDevice.objects.create(user=other, name="phone", confirmed=True)
    client = Client()
    password_login(client, "erin")
    secret = shown_secret(client.get(ENROL).content.decode())
    page = client.post(ENROL, {"token": code_for(secret)}).content.decode()
    codes = re.findall(r'class="chittycan-backup-code">([a-z2-7]+)<', page)
    # erin's backup code and erin's app code, with ivan's password: refused.
    for token in (codes[0], next_login_code(secret, "erin")):
        response = password_login(Client(), "ivan", token=token)
        assert response.status_code == 200 and "Invalid token" in response.content.decode()
    assert StaticToken.objects.filter(token=codes[0]).exists()  # not spent by the attempt

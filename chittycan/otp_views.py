"""Second-factor self-enrolment for the admin (django-otp).

A staff user with no confirmed TOTP authenticator who signs in with their password is sent here
(``ChittyCanAdminSite.login``): the page shows a QR code and the secret in text, the user confirms
with a code from the app, and gets a set of single-use backup codes, shown once. From then on the
admin login needs the password and either the app's code or an unused backup code.

The password alone never logs anyone in: it only marks the session as "enrolling user N" (for a
few minutes), which opens this page and nothing else (the REST API, which accepts session
logins, sees an anonymous session). The user is logged in, with a verified second factor, when
the first code is confirmed.

An operator can still enrol a device from the shell (``can otp enrol``); ``can otp remove`` resets
a user, who then enrols again at their next sign-in.
"""

from __future__ import annotations

import base64
import functools
import re
import time
from typing import Any
from urllib.parse import quote

import segno
from django import forms
from django.conf import settings
from django.contrib.admin import AdminSite
from django.contrib.auth import get_user_model
from django.contrib.auth import login as auth_login
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.crypto import constant_time_compare
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.safestring import mark_safe
from django_otp import login as otp_login
from django_otp.middleware import is_verified as otp_is_verified
from django_otp.plugins.otp_static.models import StaticDevice, StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from dashboard.access import otp_required_for
from tenants import audit

PENDING_KEY = "chittycan_otp_enrolling"
PENDING_SECONDS = 600
BACKUP_CODE_COUNT = 10
DEVICE_NAME = "authenticator"
BACKUP_DEVICE_NAME = "backup codes"
ACTOR_LABEL = "admin"
TOTP_CODE = re.compile(r"^\d{6,8}$")


def normalise_token(value: str) -> str:
    """What the user typed, without the spaces and dashes people copy along, lower case (backup
    codes are lower-case base32; the app's codes are digits)."""
    return re.sub(r"[\s-]+", "", value).lower()


def is_totp_code(token: str) -> bool:
    return bool(TOTP_CODE.match(token))


def has_authenticator(user: Any) -> bool:
    return bool(TOTPDevice.objects.filter(user=user, confirmed=True).exists())


def needs_enrolment(user: Any) -> bool:
    """A signed-in, active staff member (or a dashboard user who needs a second factor:
    ``dashboard.access.otp_required_for``) with no confirmed authenticator app."""
    needs = bool(user.is_authenticated and user.is_active and (user.is_staff or otp_required_for(user)))
    return needs and not has_authenticator(user)


def start_enrolment(request: HttpRequest, user: Any) -> None:
    """The password was right and ``user`` has no authenticator: remember who is enrolling in this
    session (a new session key, as a login would), without logging them in."""
    request.session.cycle_key()
    request.session[PENDING_KEY] = {
        "user": user.pk,
        "hash": user.get_session_auth_hash(),
        "until": time.time() + PENDING_SECONDS,
    }


def enrolling_user(request: HttpRequest) -> Any:
    """Who may enrol in this request: a signed-in staff member with no authenticator (a session
    that predates the second factor), or the user whose password this session just checked
    (same password still, within PENDING_SECONDS). None otherwise."""
    if request.user.is_authenticated:
        return request.user if needs_enrolment(request.user) else None
    pending = request.session.get(PENDING_KEY)
    if not isinstance(pending, dict) or float(pending.get("until", 0)) < time.time():
        return None
    pk = pending.get("user")
    if not isinstance(pk, int):
        return None
    user = get_user_model().objects.filter(pk=pk).first()
    if user is None or not constant_time_compare(str(pending.get("hash", "")), user.get_session_auth_hash()):
        return None
    return user if needs_enrolment(user) else None


def new_backup_codes(count: int = BACKUP_CODE_COUNT) -> list[str]:
    """Random single-use codes; never all digits, so the login form can tell one from an app code."""
    codes: list[str] = []
    while len(codes) < count:
        code = StaticToken.random_token()
        if not is_totp_code(code) and code not in codes:
            codes.append(code)
    return codes


def pending_device(user: Any) -> TOTPDevice:
    """The unconfirmed device this user is enrolling (the same one on a reload, so the QR code
    already scanned stays valid)."""
    device = TOTPDevice.objects.filter(user=user, confirmed=False).order_by("id").first()
    if device is None:
        device = TOTPDevice.objects.create(user=user, name=DEVICE_NAME, confirmed=False)
    return device


def secret_text(device: TOTPDevice) -> str:
    """The base32 secret an authenticator app accepts when typed in, in groups of four."""
    secret = base64.b32encode(device.bin_key).decode("ascii").rstrip("=")
    return " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))


def qr_svg(url: str) -> str:
    return str(segno.make(url, error="m").svg_inline(scale=5, title="Authenticator QR code"))


def safe_next(request: HttpRequest, default: str) -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return default


class EnrolForm(forms.Form):
    token = forms.CharField(
        label="Code from the app",
        max_length=20,
        widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric", "autofocus": True}),
    )

    def clean_token(self) -> str:
        token = normalise_token(self.cleaned_data["token"])
        if not re.fullmatch(r"\d{6}", token):
            raise forms.ValidationError("Enter the 6-digit code the authenticator app shows.", code="format")
        return token


def confirm(request: HttpRequest, user: Any, device: TOTPDevice) -> list[str]:
    """Confirm the device, replace the user's backup codes, log the user in with it (verified)."""
    with transaction.atomic():
        device.confirmed = True
        device.save(update_fields=["confirmed"])
        TOTPDevice.objects.filter(user=user, confirmed=False).delete()
        StaticDevice.objects.filter(user=user).delete()
        backup = StaticDevice.objects.create(user=user, name=BACKUP_DEVICE_NAME, confirmed=True)
        codes = new_backup_codes()
        StaticToken.objects.bulk_create([StaticToken(device=backup, token=code) for code in codes])
        audit.record(
            "otp.enrol",
            target=user.get_username(),
            data={"device": device.pk, "backup_codes": len(codes), "self_service": True},
            actor=user if isinstance(user, AbstractBaseUser) else None,
            actor_label=ACTOR_LABEL,
        )
    request.session.pop(PENDING_KEY, None)
    if not request.user.is_authenticated:
        auth_login(request, user, backend=settings.AUTHENTICATION_BACKENDS[0])
        # What OTPMiddleware gives request.user at the start of a request, for this response.
        setattr(user, "is_verified", functools.partial(otp_is_verified, user))  # noqa: B010
    otp_login(request, device)
    return codes


def enrol_view(site: AdminSite, request: HttpRequest) -> HttpResponse:
    """GET: the QR code and the secret. POST: the first code; on success the backup codes."""
    login_url = reverse("admin:login", current_app=site.name)
    index_url = reverse("admin:index", current_app=site.name)
    next_url = safe_next(request, index_url)
    user = enrolling_user(request)
    if user is None:
        # Nobody to enrol: already enrolled (then the login asks for the code), not staff, or
        # no password checked in this session (recently).
        target = next_url if request.user.is_authenticated else f"{login_url}?next={quote(next_url, safe='/')}"
        return HttpResponseRedirect(target)
    device = pending_device(user)
    form = EnrolForm(request.POST if request.method == "POST" else None)
    context: dict[str, Any] = {
        **site.each_context(request),
        "title": "Set up your authenticator",
        "next": next_url,
        "username": user.get_username(),
    }
    if request.method == "POST" and form.is_valid():
        allowed, extra = device.verify_is_allowed()
        if not allowed:
            form.add_error("token", "Too many wrong codes: wait a moment, then try the current code.")
        elif device.verify_token(form.cleaned_data["token"]):
            codes = confirm(request, user, device)
            context.update({**site.each_context(request), "title": "Your backup codes", "codes": codes})
            return TemplateResponse(request, "admin/otp/backup_codes.html", context)
        else:
            form.add_error("token", "That code does not match: check the phone's clock and type the current code.")
    context.update(
        {
            "form": form,
            "qr_svg": mark_safe(qr_svg(device.config_url)),  # segno's own markup
            "secret": secret_text(device),
            "config_url": device.config_url,
            "digits": device.digits,
            "step": device.step,
        }
    )
    return TemplateResponse(request, "admin/otp/enrol.html", context)

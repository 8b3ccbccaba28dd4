"""The admin site: staff need a TOTP second factor (django-otp) unless
``CHITTYCAN_ADMIN_REQUIRE_OTP`` is off (development only).

It replaces Django's default site (``chittycan.apps.ChittyCanAdminConfig``), so every app's
``@admin.register`` lands here. Staff without an authenticator enrol one themselves at their first
sign-in (``chittycan.otp_views``: QR code, then single-use backup codes); ``can otp enrol --user
NAME`` still enrols one from the shell. After that the login needs the password and either the
app's 6-digit code or one unused backup code.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from django import forms
from django.conf import settings
from django.contrib.admin import AdminSite
from django.contrib.admin.forms import AdminAuthenticationForm
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import URLPattern, URLResolver, path, reverse
from django.utils.decorators import method_decorator
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django_otp import devices_for_user
from django_otp.admin import OTPAdminAuthenticationForm
from django_otp.plugins.otp_static.models import StaticDevice
from django_otp.plugins.otp_totp.models import TOTPDevice

from chittycan import otp_views

ENROL_FIRST = "Set up your authenticator app first."


def otp_required() -> bool:
    return bool(settings.CHITTYCAN_ADMIN_REQUIRE_OTP)


class AdminLoginForm(OTPAdminAuthenticationForm):
    """Password, then the authenticator app's code or a backup code (skipped when OTP is switched
    off). A right password with no authenticator enrolled sets ``enrolling_user`` instead."""

    enrolling_user: Any = None
    # No device of the kind the code looks like (a backup code from someone with none): the same
    # answer as a wrong code, not django-otp's "Please select a device" (there is no list here).
    otp_error_messages = {
        **OTPAdminAuthenticationForm.otp_error_messages,
        "device_required": OTPAdminAuthenticationForm.otp_error_messages["invalid_token"],
    }

    def clean(self) -> dict[str, Any]:
        if not otp_required():
            return AdminAuthenticationForm.clean(self)
        return super().clean()  # type: ignore[no-any-return]

    def clean_otp_token(self) -> str:
        return otp_views.normalise_token(self.cleaned_data.get("otp_token") or "")

    def clean_otp(self, user: Any) -> None:
        if user is not None and otp_views.needs_enrolment(user):
            # First sign-in: the password was right but there is no authenticator yet. Do not log
            # in; ChittyCanAdminSite.login sends the user to enrol one.
            self.enrolling_user = user
            raise forms.ValidationError(ENROL_FIRST, code="enrol_first")
        super().clean_otp(user)

    def _chosen_device(self, user: Any) -> Any:
        device = super()._chosen_device(user)
        if device is None:
            # No list to pick from: the code's shape says which device it is for, the
            # authenticator app's (digits) or the backup codes (letters and digits).
            token = self.cleaned_data.get("otp_token") or ""
            kind = TOTPDevice if otp_views.is_totp_code(token) else StaticDevice
            devices = [d for d in devices_for_user(user, confirmed=True, for_verify=True) if isinstance(d, kind)]
            if devices:
                device = devices[0]
        return device


class ChittyCanAdminSite(AdminSite):
    site_header = "ChittyCan"
    site_title = "ChittyCan admin"
    index_title = "Gateway configuration"
    login_form = AdminLoginForm
    login_template = "admin/chittycan_login.html"

    def has_permission(self, request: HttpRequest) -> bool:
        if not super().has_permission(request):
            return False
        if otp_required():
            return bool(request.user.is_verified())  # type: ignore[union-attr]
        return True

    def login(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        if otp_required() and request.method == "GET" and otp_views.enrolling_user(request) is not None:
            # The password was checked (or a session predates the second factor) and nothing is
            # enrolled: set it up (the enrolment page's "Cancel" signs out).
            return self.enrolment_redirect(request)
        context = {"otp_required": otp_required(), **(extra_context or {})}
        response = super().login(request, context)
        form = (getattr(response, "context_data", None) or {}).get("form")
        if request.method == "POST" and getattr(form, "enrolling_user", None) is not None:
            # The password was right and nothing is enrolled: on to the enrolment page, not logged in.
            otp_views.start_enrolment(request, form.enrolling_user)  # type: ignore[union-attr]
            return self.enrolment_redirect(request)
        return response

    def enrolment_redirect(self, request: HttpRequest) -> HttpResponseRedirect:
        url = reverse("admin:otp_enrol", current_app=self.name)
        target = otp_views.safe_next(request, "")
        return HttpResponseRedirect(f"{url}?next={quote(target, safe='/')}" if target else url)

    @method_decorator(never_cache)
    @method_decorator(csrf_protect)
    def otp_enrol(self, request: HttpRequest) -> HttpResponse:
        return otp_views.enrol_view(self, request)

    def get_urls(self) -> list[URLPattern | URLResolver]:
        return [path("otp/enrol/", self.otp_enrol, name="otp_enrol"), *super().get_urls()]

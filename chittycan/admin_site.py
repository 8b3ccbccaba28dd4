"""The admin site: staff need a TOTP second factor (django-otp) unless
``CHITTYCAN_ADMIN_REQUIRE_OTP`` is off (development only).

It replaces Django's default site (``chittycan.apps.ChittyCanAdminConfig``), so every app's
``@admin.register`` lands here. Enrol a device with ``can otp enrol --user NAME``.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib.admin import AdminSite
from django.contrib.admin.forms import AdminAuthenticationForm
from django.http import HttpRequest, HttpResponse
from django_otp import devices_for_user
from django_otp.admin import OTPAdminAuthenticationForm

NO_DEVICE = "No authenticator is enrolled for this account: an operator runs `can otp enrol --user {username}`."


def otp_required() -> bool:
    return bool(settings.CHITTYCAN_ADMIN_REQUIRE_OTP)


class AdminLoginForm(OTPAdminAuthenticationForm):
    """Password, then the code from the authenticator app (skipped when OTP is switched off)."""

    def clean(self) -> dict[str, Any]:
        if not otp_required():
            return AdminAuthenticationForm.clean(self)
        return super().clean()  # type: ignore[no-any-return]

    def clean_otp(self, user: Any) -> None:
        if user is not None and not any(True for _ in devices_for_user(user, confirmed=True)):
            raise forms.ValidationError(NO_DEVICE.format(username=user.get_username()), code="no_device")
        super().clean_otp(user)

    def _chosen_device(self, user: Any) -> Any:
        device = super()._chosen_device(user)
        if device is None:
            # One device (the usual case): no need to pick it from a list first.
            devices = list(devices_for_user(user, confirmed=True, for_verify=True))
            if len(devices) == 1:
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
        context = {"otp_required": otp_required(), **(extra_context or {})}
        return super().login(request, context)

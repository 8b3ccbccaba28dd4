"""Dashboard forms: plain Django forms (CSRF-protected, work without JavaScript)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from django import forms
from django.contrib.auth import authenticate, get_user_model
from django.http import HttpRequest

from budgets.models import Budget
from control.models import TenantMembership
from core.money import to_micro
from tenants.keyinfo import USAGE_READ

ENDPOINTS = ["chat", "completions", "embeddings", "messages", USAGE_READ]


class LoginForm(forms.Form):
    username = forms.CharField(
        max_length=150, widget=forms.TextInput(attrs={"autofocus": True, "autocomplete": "username"})
    )
    password = forms.CharField(strip=False, widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}))
    otp_token = forms.CharField(
        label="Authenticator code",
        required=False,
        max_length=20,
        help_text="The 6-digit code of your authenticator app, or a backup code (if your account needs one).",
        widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric"}),
    )

    def __init__(self, request: HttpRequest, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request = request
        self.user: Any = None

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        username, password = data.get("username"), data.get("password")
        if username and password:
            self.user = authenticate(self.request, username=username, password=password)
            if self.user is None or not self.user.is_active:
                self.user = None
                raise forms.ValidationError("Wrong user name or password.", code="invalid_login")
        return data


def _scopes_field(initial: list[str] | None = None) -> forms.MultipleChoiceField:
    return forms.MultipleChoiceField(
        choices=[(e, e) for e in ENDPOINTS],
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="Endpoints this key may call; none ticked = all.",
    )


class KeyCreateForm(forms.Form):
    name = forms.CharField(max_length=200)
    tenant = forms.ChoiceField(help_text="The tenant the key belongs to (and is billed to).")
    endpoints = _scopes_field()
    models = forms.CharField(
        required=False,
        max_length=2000,
        help_text="Public model names, comma-separated; empty = all the tenant may use.",
    )
    expires_at = forms.DateTimeField(
        required=False,
        help_text="Empty = never. e.g. 2027-01-31 23:59 (UTC).",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
    )

    def __init__(self, *args: Any, tenants: list[tuple[int, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["tenant"].choices = [(str(pk), slug) for pk, slug in tenants]  # type: ignore[attr-defined]

    def scopes(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        endpoints = self.cleaned_data.get("endpoints") or []
        if endpoints:
            out["endpoints"] = list(endpoints)
        models = [m.strip() for m in (self.cleaned_data.get("models") or "").split(",") if m.strip()]
        if models:
            out["models"] = list(dict.fromkeys(models))
        return out


class BudgetForm(forms.Form):
    owner = forms.ChoiceField(help_text="A tenant (its whole subtree) or one key.")
    period = forms.ChoiceField(choices=Budget.Period.choices, initial=Budget.Period.MONTH)
    limit_usd = forms.CharField(label="Limit (USD)", max_length=30)
    hard = forms.BooleanField(
        required=False, initial=True, help_text="Hard: refuse requests past it. Soft: alert only."
    )
    alert_thresholds = forms.CharField(required=False, initial="50,80,100", help_text="Percentages, comma-separated.")
    alert_emails = forms.CharField(required=False, max_length=2000, help_text="Comma-separated.")
    allow_weaken = forms.BooleanField(
        required=False, label="Allow raising a hard limit", help_text="Needed to raise a hard budget or turn it soft."
    )

    def __init__(self, *args: Any, owners: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["owner"].choices = owners  # type: ignore[attr-defined]

    def clean_limit_usd(self) -> int:
        raw = self.cleaned_data["limit_usd"].strip().lstrip("$")
        try:
            amount = Decimal(raw)
        except InvalidOperation:
            raise forms.ValidationError("An amount in USD, e.g. 250 or 12.50.") from None
        if not amount.is_finite() or amount < 0:
            raise forms.ValidationError("An amount in USD, zero or more.")
        return to_micro(amount * 1_000_000)

    def clean_alert_thresholds(self) -> list[int]:
        raw = self.cleaned_data.get("alert_thresholds") or ""
        try:
            values = sorted({int(v) for v in raw.split(",") if v.strip()})
        except ValueError:
            raise forms.ValidationError("Whole percentages, e.g. 50,80,100.") from None
        if any(v <= 0 or v > 1000 for v in values):
            raise forms.ValidationError("Each between 1 and 1000.")
        return values

    def clean_alert_emails(self) -> list[str]:
        raw = self.cleaned_data.get("alert_emails") or ""
        emails = [e.strip() for e in raw.split(",") if e.strip()]
        validator = forms.EmailField()
        for e in emails:
            validator.clean(e)
        return emails


class MemberForm(forms.Form):
    username = forms.CharField(max_length=150)
    tenant = forms.ChoiceField()
    role = forms.ChoiceField(choices=TenantMembership.Role.choices)

    def __init__(self, *args: Any, tenants: list[tuple[int, str]], roles: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["tenant"].choices = [(str(pk), slug) for pk, slug in tenants]  # type: ignore[attr-defined]
        self.fields["role"].choices = [(r, r) for r in roles]  # type: ignore[attr-defined]

    def clean_username(self) -> Any:
        name = self.cleaned_data["username"]
        user = get_user_model().objects.filter(username=name, is_active=True).first()
        if user is None:
            raise forms.ValidationError("No active user with that name.")
        return user


class UsageFilterForm(forms.Form):
    start = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    end = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    key = forms.ChoiceField(required=False)
    model = forms.CharField(required=False, max_length=200)
    status = forms.CharField(required=False, max_length=30, help_text="429, 4xx, ok, upstream_error...")

    def __init__(self, *args: Any, keys: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["key"].choices = [("", "any key"), *keys]  # type: ignore[attr-defined]


class AuditFilterForm(forms.Form):
    """The audit page's filters and cursor: ``before`` is the ``seq`` of the last row shown (the
    chain's order), so a page never shifts when new rows are written meanwhile."""

    action = forms.CharField(
        required=False,
        max_length=100,
        label="Action starts with",
        widget=forms.TextInput(attrs={"placeholder": "key."}),
    )
    since = forms.DateField(required=False, label="From (UTC)", widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, label="To (UTC, inclusive)", widget=forms.DateInput(attrs={"type": "date"}))
    before = forms.IntegerField(required=False, min_value=1, widget=forms.HiddenInput)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        if since is not None and until is not None and until < since:
            self.add_error("until", "must be on or after From")
        return data

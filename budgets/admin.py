"""Admin for budgets (edited in USD, written through ``budgets.services``), the PostgreSQL
fallback's counters and reservations, and the alerts sent.

The tenant page shows its budgets inline: ``tenants.admin`` knows nothing of budgets (they sit
above it), so this module registers the tenant admin again with the inline added.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from budgets import services
from budgets.models import AlertSent, Budget, BudgetCounter, BudgetReservation
from budgets.service import SpendStatus, spend_status
from core import egress
from tenants.admin import (
    ADMIN_LABEL,
    MICRO,
    URL_FIELDS,
    ApiKeyAdmin,
    AuditedAdmin,
    ReadOnlyAdmin,
    TenantAdmin,
    adopt,
    https_formfield,
    usd,
)
from tenants.models import ApiKey, Tenant

# --- budgets --------------------------------------------------------------------------------------


class BudgetForm(forms.ModelForm):
    """Budgets are edited in USD (up to 6 decimals) and stored as integer micro-USD."""

    limit_usd = forms.DecimalField(
        label="Limit (USD)", min_value=Decimal(0), decimal_places=6, max_digits=18, help_text="e.g. 500.00"
    )
    new_webhook_secret = forms.CharField(
        label="Webhook secret",
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only: type a new one to replace it; leave empty to keep the current one.",
    )
    clear_webhook_secret = forms.BooleanField(label="Remove the webhook secret", required=False)
    allow_weaken = forms.BooleanField(
        label="Allow weakening",
        required=False,
        help_text="Needed to raise a hard budget's limit, make it soft or move it to another scope or period.",
    )

    class Meta:
        model = Budget
        formfield_callback = https_formfield
        fields = [
            "tenant",
            "api_key",
            "period",
            "limit_usd",
            "hard",
            "alert_thresholds",
            "alert_emails",
            "webhook_url",
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None:
            self.fields["limit_usd"].initial = Decimal(self.instance.limit_micro) / MICRO

    def clean_alert_thresholds(self) -> list[int]:
        value = self.cleaned_data.get("alert_thresholds") or []
        if not isinstance(value, list) or not all(isinstance(v, int) and 0 < v <= 1000 for v in value):
            raise forms.ValidationError("A list of percentages, e.g. [50, 80, 100].")
        return sorted(set(value))

    def clean_alert_emails(self) -> list[str]:
        value = self.cleaned_data.get("alert_emails") or []
        if not isinstance(value, list) or not all(isinstance(v, str) and "@" in v for v in value):
            raise forms.ValidationError('A list of email addresses, e.g. ["ops@example.com"].')
        return value

    def clean_webhook_url(self) -> str:
        value = str(self.cleaned_data.get("webhook_url") or "")
        egress.validate_url(value)
        return value

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("limit_usd") is not None:
            self.instance.limit_micro = int(data["limit_usd"] * MICRO)
        if data.get("new_webhook_secret"):
            self.instance.webhook_secret = data["new_webhook_secret"]
        elif data.get("clear_webhook_secret"):
            self.instance.webhook_secret = ""
        if "tenant" in self.fields and "api_key" in self.fields:
            if bool(data.get("tenant")) == bool(data.get("api_key")):
                raise forms.ValidationError("A budget belongs to a tenant or to one API key: choose exactly one.")
        self._check_weaken(data)
        self._check_levels(data)
        return data

    def _check_levels(self, data: dict[str, Any]) -> None:
        """One hard budget per owner and period, soft ones at distinct limits (the database says
        so too, but an inline row is saved after its form is validated: say it on the form)."""
        tenant = data.get("tenant") if "tenant" in self.fields else None
        api_key = data.get("api_key") if "api_key" in self.fields else None
        tenant_id = tenant.pk if isinstance(tenant, Tenant) else self.instance.tenant_id
        api_key_id = api_key.pk if isinstance(api_key, ApiKey) else self.instance.api_key_id
        period, hard = data.get("period") or self.instance.period, bool(data.get("hard"))
        if data.get("limit_usd") is None or (tenant_id is None and api_key_id is None):
            return
        rows = Budget.objects.filter(tenant_id=tenant_id, api_key_id=api_key_id, period=period, hard=hard)
        if not hard:
            rows = rows.filter(limit_micro=int(data["limit_usd"] * MICRO))
        clash = rows.exclude(pk=self.instance.pk).first() if self.instance.pk else rows.first()
        if clash is not None:
            if hard:
                raise forms.ValidationError(
                    f"This scope already has a hard {period} budget ({usd(clash.limit_micro)}): change that one, "
                    "or make this one soft (an alert level)."
                )
            raise forms.ValidationError(f"This scope already has a soft {period} budget at {usd(clash.limit_micro)}.")

    def _check_weaken(self, data: dict[str, Any]) -> None:
        if self.instance.pk is None or data.get("allow_weaken"):
            return
        stored = Budget.objects.filter(pk=self.instance.pk).first()
        if stored is None or not stored.hard:
            return
        limit = int(data["limit_usd"] * MICRO) if data.get("limit_usd") is not None else stored.limit_micro
        moved = bool({"tenant", "api_key", "period"} & set(self.changed_data))
        if "hard" in data and not data["hard"]:
            raise forms.ValidationError("This would turn a hard budget soft: tick 'Allow weakening' to do it.")
        if limit > stored.limit_micro:
            raise forms.ValidationError(
                f"This would raise the hard limit from {usd(stored.limit_micro)} to {usd(limit)}: "
                "tick 'Allow weakening' to do it."
            )
        if moved:
            raise forms.ValidationError("This would move a hard budget: tick 'Allow weakening' to do it.")

    def save(self, commit: bool = True) -> Budget:
        self.instance.limit_micro = int(self.cleaned_data["limit_usd"] * MICRO)
        return super().save(commit)  # type: ignore[no-any-return]


# --- the tenant page ------------------------------------------------------------------------------


class SpendColumns:
    """Spent, reserved, remaining and percent used of a budget in its current period, for admin
    lists and inlines: from the ledger and the live counter (``budgets.service.spend_status``),
    the ledger alone when the counter is not reachable. One lookup per budget and page."""

    @staticmethod
    def _status(obj: Budget | None) -> SpendStatus | None:
        if obj is None or obj.pk is None:
            return None
        found: SpendStatus | None = getattr(obj, "_spend_status", None)
        if found is None:
            found = spend_status(obj)
            obj._spend_status = found  # type: ignore[attr-defined]
        return found

    @admin.display(description="spent (USD)")
    def spent(self, obj: Budget | None) -> str:
        status = self._status(obj)
        return "-" if status is None else usd(status.spent_micro)

    @admin.display(description="reserved (USD)")
    def reserved(self, obj: Budget | None) -> str:
        status = self._status(obj)
        if status is None:
            return "-"
        return usd(status.reserved_micro) if status.live else f"{usd(0)} (no live counter)"

    @admin.display(description="remaining (USD)")
    def remaining(self, obj: Budget | None) -> str:
        status = self._status(obj)
        return "-" if status is None else usd(status.remaining_micro)

    @admin.display(description="used")
    def used(self, obj: Budget | None) -> str:
        status = self._status(obj)
        return "-" if status is None else f"{status.percent:.1f}%"


class TenantBudgetInline(SpendColumns, admin.TabularInline):
    model = Budget
    form = BudgetForm
    fk_name = "tenant"
    formfield_overrides = URL_FIELDS
    fields = [
        "period",
        "limit_usd",
        "hard",
        "alert_thresholds",
        "alert_emails",
        "webhook_url",
        "new_webhook_secret",
        "clear_webhook_secret",
        "allow_weaken",
        "spent",
        "reserved",
        "remaining",
        "used",
    ]
    readonly_fields = ["spent", "reserved", "remaining", "used"]
    extra = 0


class TenantWithBudgetsAdmin(TenantAdmin):
    """The tenant admin of ``tenants.admin``, with the tenant's budgets inline (written through
    ``budgets.services`` like every other budget write)."""

    inlines = [*TenantAdmin.inlines, TenantBudgetInline]

    def save_formset(self, request: HttpRequest, form: ModelForm, formset: Any, change: bool) -> None:
        if formset.model is not Budget:
            super().save_formset(request, form, formset, change)
            return
        formset.save(commit=False)
        for budget in formset.deleted_objects:  # ticking "delete" and saving is the explicit consent
            services.budget_delete(budget=budget, allow_weaken=True, actor_label=ADMIN_LABEL)
        for budget in formset.new_objects:
            save_budget(budget)
        for budget, fields in formset.changed_objects:
            row = next((f for f in formset.forms if f.instance is budget), None)
            allow = bool(row is not None and row.cleaned_data.get("allow_weaken"))
            save_budget(budget, moved="period" in fields, allow_weaken=allow)


def save_budget(budget: Budget, *, moved: bool = False, allow_weaken: bool = False) -> Budget:
    """A budget as a form left it, through the budget service (the form has checked that a hard
    budget is only weakened with "Allow weakening" ticked). ``moved``: its scope or period
    changed, so the stored budget is deleted and one is set for the new scope and period."""
    fields: dict[str, Any] = {
        "alert_thresholds": budget.alert_thresholds,
        "alert_emails": budget.alert_emails,
        "webhook_url": budget.webhook_url,
        "webhook_secret": budget.webhook_secret,
        "allow_weaken": allow_weaken,
        "actor_label": ADMIN_LABEL,
    }
    if budget.pk is not None and not moved:
        stored = Budget.objects.select_related("tenant", "api_key__tenant").get(pk=budget.pk)
        saved = services.budget_update(stored, limit_micro=budget.limit_micro, hard=budget.hard, **fields).budget
    else:
        if moved:
            stored = Budget.objects.select_related("tenant", "api_key__tenant").get(pk=budget.pk)
            services.budget_delete(budget=stored, allow_weaken=allow_weaken, actor_label=ADMIN_LABEL)
        saved = services.budget_put(
            tenant=budget.tenant,
            api_key=budget.api_key,
            period=budget.period,
            limit_micro=budget.limit_micro,
            hard=budget.hard,
            **fields,
        ).budget
    adopt(budget, saved)
    return saved


admin.site.unregister(Tenant)
admin.site.register(Tenant, TenantWithBudgetsAdmin)


# --- the API key page -----------------------------------------------------------------------------


class ApiKeyWithBudgetsAdmin(ApiKeyAdmin):
    """The key admin of ``tenants.admin`` with, on an existing key's page, a read-only panel of its
    budgets and their spend (``tenants.admin`` knows nothing of budgets: they sit above it). A
    read-only field, not an inline, so the key's form posts exactly what it did before; the add
    page is ``ApiKeyAdmin``'s own."""

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[Any]:
        fields = list(super().get_fields(request, obj))
        return fields if obj is None else [*fields, "budget_spend"]

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[str]:
        fields = list(super().get_readonly_fields(request, obj))
        return fields if obj is None else [*fields, "budget_spend"]

    @admin.display(description="budgets of this key")
    def budget_spend(self, obj: ApiKey) -> str:
        """The key's own budgets (its tenants' budgets are on their pages), current period."""
        rows = []
        for budget in Budget.objects.filter(api_key=obj).select_related("api_key__tenant").order_by("period", "-hard"):
            status = spend_status(budget)
            reserved = usd(status.reserved_micro) if status.live else f"{usd(0)} (no live counter)"
            link = reverse("admin:budgets_budget_change", args=[budget.pk])
            rows.append(
                (
                    link,
                    budget.period,
                    "hard" if budget.hard else "soft",
                    usd(budget.limit_micro),
                    usd(status.spent_micro),
                    reserved,
                    usd(status.remaining_micro),
                    f"{status.percent:.1f}%",
                )
            )
        if not rows:
            return "none (add one under Budgets)"
        body = format_html_join(
            "",
            '<tr><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>',
            rows,
        )
        return format_html(
            '<table class="chittycan-key-budgets"><thead><tr><th>period</th><th>kind</th><th>limit</th>'
            "<th>spent</th><th>reserved</th><th>remaining</th><th>used</th></tr></thead><tbody>{}</tbody></table>",
            body,
        )


admin.site.unregister(ApiKey)
admin.site.register(ApiKey, ApiKeyWithBudgetsAdmin)


# --- budgets, counters, reservations, alerts ------------------------------------------------------


@admin.register(Budget)
class BudgetAdmin(SpendColumns, AuditedAdmin[Budget]):
    form = BudgetForm
    list_display = [
        "scope",
        "period",
        "limit_usd_display",
        "limit_micro",
        "hard",
        "spent",
        "reserved",
        "remaining",
        "used",
        "alert_thresholds",
    ]
    list_filter = ["period", "hard"]
    list_select_related = ["tenant", "api_key", "api_key__tenant"]
    search_fields = ["tenant__slug", "api_key__prefix"]
    autocomplete_fields = ["tenant", "api_key"]

    fields = [*BudgetForm.Meta.fields, "new_webhook_secret", "clear_webhook_secret", "allow_weaken"]

    def get_fields(self, request: HttpRequest, obj: Budget | None = None) -> list[Any]:
        if obj is None:
            return list(self.fields)
        return [*self.fields, "spent", "reserved", "remaining", "used"]

    def get_readonly_fields(self, request: HttpRequest, obj: Budget | None = None) -> list[str]:
        return [] if obj is None else ["spent", "reserved", "remaining", "used"]

    def save_model(self, request: HttpRequest, obj: Budget, form: ModelForm, change: bool) -> None:
        save_budget(
            obj,
            moved=change and bool({"tenant", "api_key", "period"} & set(form.changed_data)),
            allow_weaken=bool(form.cleaned_data.get("allow_weaken")),
        )

    # Deleting, confirmed on Django's "Are you sure?" page, is the explicit consent to lose a cap.
    def delete_model(self, request: HttpRequest, obj: Budget) -> None:
        services.budget_delete(budget=obj, allow_weaken=True, actor_label=ADMIN_LABEL)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Budget]) -> None:
        for budget in queryset.select_related("tenant", "api_key__tenant"):
            services.budget_delete(budget=budget, allow_weaken=True, actor_label=ADMIN_LABEL)

    @admin.display(description="scope")
    def scope(self, obj: Budget) -> str:
        return f"tenant {obj.tenant.slug}" if obj.tenant else f"key {obj.api_key.prefix if obj.api_key else '?'}"

    @admin.display(description="limit (USD)", ordering="limit_micro")
    def limit_usd_display(self, obj: Budget) -> str:
        return usd(obj.limit_micro)


@admin.register(BudgetCounter)
class BudgetCounterAdmin(ReadOnlyAdmin[BudgetCounter]):
    """The PostgreSQL fallback's spend counters (see docs/budgets.md): for inspection only."""

    list_display = ["name", "value", "synced_at"]
    search_fields = ["name"]


@admin.register(BudgetReservation)
class BudgetReservationAdmin(ReadOnlyAdmin[BudgetReservation]):
    list_display = ["request_id", "created_at", "expires_at", "swept"]
    list_filter = ["swept"]
    search_fields = ["request_id"]
    date_hierarchy = "created_at"


@admin.register(AlertSent)
class AlertSentAdmin(ReadOnlyAdmin[AlertSent]):
    list_display = ["created_at", "budget", "period_key", "threshold", "spend", "email_sent_at", "webhook_sent_at"]
    list_select_related = ["budget__tenant", "budget__api_key"]
    date_hierarchy = "created_at"

    @admin.display(description="spend / limit (USD)")
    def spend(self, obj: AlertSent) -> str:
        return f"{usd(obj.spend_micro)} / {usd(obj.limit_micro)}"

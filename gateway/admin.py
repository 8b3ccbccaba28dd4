"""Admin for providers (write-only credentials), public models with their deployments and prices,
(the ledger's read-only admin is in ``ledger/admin.py``).

Providers, models, deployments and prices are written through ``gateway.catalog`` (which audits
and announces each change), as ``can apply`` writes them."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin
from django.db.models import Count, Field, QuerySet
from django.forms import ModelForm
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from core import egress
from gateway import catalog
from gateway.models import DEFAULT_CACHE_TTL, Deployment, LLMModel, Price, Provider
from gateway.providers.base import ProviderConfig
from gateway.routing import breaker
from gateway.routing.table import DeploymentRoute, breaker_settings
from tenants.admin import AuditedAdmin, actor_of, adopt, https_formfield

ADMIN_LABEL = "admin"

# --- providers -----------------------------------------------------------------------------------


class ProviderForm(forms.ModelForm):
    """The credential is write-only: typed in, encrypted through ``Provider.api_key``, never shown."""

    api_key = forms.CharField(
        label="API key",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Stored encrypted and never displayed. Leave empty to keep the current key.",
    )
    clear_api_key = forms.BooleanField(label="Remove the stored API key", required=False)

    class Meta:
        model = Provider
        formfield_callback = https_formfield
        fields = [
            "slug",
            "kind",
            "base_url",
            "extra_headers",
            "connect_timeout",
            "read_timeout",
            "max_retries",
            "responses_api",
            "breaker_failures",
            "breaker_error_rate",
            "breaker_min_requests",
            "breaker_window",
            "breaker_cooldown",
            "is_active",
        ]

    BREAKER_FIELDS = (
        "breaker_failures",
        "breaker_error_rate",
        "breaker_min_requests",
        "breaker_window",
        "breaker_cooldown",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in self.BREAKER_FIELDS:  # left empty: the default (shown as the initial value)
            if name in self.fields:
                self.fields[name].required = False

    def _clean_fields(self) -> None:
        super()._clean_fields()  # type: ignore[misc]
        for name in self.BREAKER_FIELDS:
            field = Provider._meta.get_field(name)
            if self.cleaned_data.get(name, 0) is None and isinstance(field, Field):
                self.cleaned_data[name] = field.get_default()

    def clean_base_url(self) -> str:
        value = str(self.cleaned_data.get("base_url") or "")
        egress.validate_url(value)
        return value

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("api_key") and data.get("clear_api_key"):
            raise forms.ValidationError("Either type a new API key or remove the stored one, not both.")
        return data


@admin.register(Provider)
class ProviderAdmin(AuditedAdmin[Provider]):
    form = ProviderForm
    list_display = ["slug", "kind", "base_url", "has_credential", "deployment_count", "is_active"]
    list_filter = ["kind", "is_active"]
    search_fields = ["slug", "base_url"]
    fieldsets = [
        (None, {"fields": ["slug", "kind", "base_url", "responses_api", "is_active"]}),
        ("Credentials", {"fields": ["has_credential", "api_key", "clear_api_key", "extra_headers"]}),
        ("Timeouts and retries", {"fields": ["connect_timeout", "read_timeout", "max_retries"]}),
        (
            "Circuit breaker (each deployment's)",
            {
                "fields": [
                    "breaker_failures",
                    "breaker_error_rate",
                    "breaker_min_requests",
                    "breaker_window",
                    "breaker_cooldown",
                    "breaker_state",
                ]
            },
        ),
    ]
    readonly_fields = ["has_credential", "breaker_state"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Provider]:
        return super().get_queryset(request).annotate(n_deployments=Count("deployments"))

    @admin.display(description="API key set", boolean=True)
    def has_credential(self, obj: Provider) -> bool:
        return bool(obj.api_key_encrypted)

    @admin.display(description="deployments", ordering="n_deployments")
    def deployment_count(self, obj: Provider) -> int:
        return int(getattr(obj, "n_deployments", 0))

    @admin.display(description="Breaker state now")
    def breaker_state(self, obj: Provider) -> SafeString | str:
        """Each deployment's breaker as the gateway sees it (Redis; this process in embedded mode)."""
        if obj.pk is None:
            return "-"
        # Not provider_config(): the credential is not needed (nor decrypted) to show the state.
        config = ProviderConfig(
            id=obj.pk, slug=obj.slug, kind=obj.kind, base_url=obj.base_url, breaker=breaker_settings(obj)
        )
        deployments = [
            (d.model.name, DeploymentRoute(id=d.pk, provider=config, upstream_model=d.upstream_model))
            for d in obj.deployments.select_related("model").order_by("model__name")
        ]
        if not deployments:
            return "no deployments"
        rows = async_to_sync(breaker.status)(deployments)
        return format_html(
            "<ul>{}</ul>",
            format_html_join(
                "",
                "<li>{} &rarr; {}: <strong>{}</strong> ({} consecutive failures, opened {} times)</li>",
                (
                    (r["model"], r["upstream_model"], r["state"], r["consecutive_failures"], r["times_opened"])
                    for r in rows
                ),
            ),
        )

    def save_model(self, request: HttpRequest, obj: Provider, form: ModelForm, change: bool) -> None:
        values = self.field_values(obj, form.fields)
        api_key: str | None = None  # keep the stored key
        if form.cleaned_data.get("api_key"):
            api_key = form.cleaned_data["api_key"]
        elif form.cleaned_data.get("clear_api_key"):
            api_key = ""
        if change:
            catalog.provider_update(obj, **values, api_key=api_key, actor=actor_of(request), actor_label=ADMIN_LABEL)
            return
        created = catalog.provider_create(
            **values, api_key=api_key or "", actor=actor_of(request), actor_label=ADMIN_LABEL
        )
        adopt(obj, created)

    def delete(self, request: HttpRequest, obj: Provider) -> None:
        catalog.provider_delete(obj, actor=actor_of(request), actor_label=ADMIN_LABEL)


# --- models, deployments, prices -----------------------------------------------------------------


class DeploymentInline(admin.TabularInline):
    model = Deployment
    fields = ["provider", "upstream_model", "priority", "weight", "is_active"]
    autocomplete_fields = ["provider"]
    extra = 0


class PriceForm(forms.ModelForm):
    """The per-unit prices (docs/media.md) may be left empty: zero, and no image table."""

    UNIT_FIELDS = ("per_image", "audio_per_minute", "per_mchars")

    class Meta:
        model = Price
        fields = [
            "effective_from",
            "input_per_mtok",
            "cached_input_per_mtok",
            "cache_write_per_mtok",
            "output_per_mtok",
            "per_image",
            "image_prices",
            "audio_per_minute",
            "per_mchars",
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in (*self.UNIT_FIELDS, "image_prices"):
            if name in self.fields:
                self.fields[name].required = False

    def clean(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = super().clean() or {}
        for name in self.UNIT_FIELDS:
            if name in self.fields and cleaned.get(name) is None:
                cleaned[name] = Decimal(0)
        if "image_prices" in self.fields and not cleaned.get("image_prices"):
            cleaned["image_prices"] = {}
        return cleaned


class PriceInline(admin.TabularInline):
    model = Price
    form = PriceForm
    extra = 0


class LLMModelForm(forms.ModelForm):
    cache_ttl = forms.IntegerField(
        min_value=1,
        required=False,
        initial=DEFAULT_CACHE_TTL,
        help_text="Seconds a cached answer is served (default 24 h)",
    )

    class Meta:
        model = LLMModel
        fields = [
            "name",
            "kind",
            "aliases",
            "owned_by",
            "context_window",
            "max_output_tokens",
            "is_active",
            "cache_enabled",
            "cache_ttl",
        ]

    def clean_cache_ttl(self) -> int:
        """Left empty (a form posted without it): the model's default, 24 h."""
        value = self.cleaned_data.get("cache_ttl")
        return DEFAULT_CACHE_TTL if value is None else int(value)

    def clean_aliases(self) -> list[str]:
        value = self.cleaned_data.get("aliases") or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise forms.ValidationError('A list of names, e.g. ["gpt-4o-latest"].')
        taken: set[str] = set()
        for name, aliases in LLMModel.objects.exclude(pk=self.instance.pk).values_list("name", "aliases"):
            taken.add(name)
            taken.update(aliases or [])
        clash = [a for a in value if a in taken]
        if clash:
            raise forms.ValidationError(f"Already the name or an alias of another model: {', '.join(clash)}")
        return list(dict.fromkeys(value))


@admin.register(LLMModel)
class LLMModelAdmin(AuditedAdmin[LLMModel]):
    form = LLMModelForm
    list_display = [
        "name",
        "kind",
        "aliases",
        "deployment_count",
        "current_price",
        "max_output_tokens",
        "cache_enabled",
        "is_active",
    ]
    list_filter = ["kind", "is_active", "deployments__provider"]
    search_fields = ["name"]
    inlines = [DeploymentInline, PriceInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[LLMModel]:
        return super().get_queryset(request).annotate(n_deployments=Count("deployments")).prefetch_related("prices")

    @admin.display(description="deployments", ordering="n_deployments")
    def deployment_count(self, obj: LLMModel) -> int:
        return int(getattr(obj, "n_deployments", 0))

    def create(self, request: HttpRequest, obj: LLMModel, values: dict[str, Any]) -> LLMModel:
        return catalog.model_create(**values, actor=actor_of(request), actor_label=ADMIN_LABEL)

    def update(self, request: HttpRequest, obj: LLMModel, values: dict[str, Any]) -> None:
        catalog.model_update(obj, **values, actor=actor_of(request), actor_label=ADMIN_LABEL)

    def delete(self, request: HttpRequest, obj: LLMModel) -> None:
        catalog.model_delete(obj, actor=actor_of(request), actor_label=ADMIN_LABEL)

    def save_formset(self, request: HttpRequest, form: ModelForm, formset: Any, change: bool) -> None:
        """Deployments and prices, each through its service function."""
        actor = actor_of(request)
        formset.save(commit=False)  # fills new_objects, changed_objects and deleted_objects; writes nothing
        for row in formset.deleted_objects:
            if isinstance(row, Deployment):
                catalog.deployment_delete(row, actor=actor, actor_label=ADMIN_LABEL)
            else:
                catalog.price_delete(row, actor=actor, actor_label=ADMIN_LABEL)
        edited = [(row, True) for row in formset.new_objects] + [(row, False) for row, _ in formset.changed_objects]
        for row, new in edited:
            values = self.field_values(row, formset.form.base_fields)
            values[formset.fk.name] = form.instance
            if isinstance(row, Deployment):
                if new:
                    adopt(row, catalog.deployment_create(**values, actor=actor, actor_label=ADMIN_LABEL))
                else:
                    catalog.deployment_update(row, **values, actor=actor, actor_label=ADMIN_LABEL)
            elif new:
                adopt(row, catalog.price_create(**values, actor=actor, actor_label=ADMIN_LABEL))
            else:
                catalog.price_update(row, **values, actor=actor, actor_label=ADMIN_LABEL)

    @admin.display(description="price now (USD / 1M in, out)")
    def current_price(self, obj: LLMModel) -> str:
        now = timezone.now()
        current = [p for p in obj.prices.all() if p.effective_from <= now]
        if not current:
            return "-"
        price = max(current, key=lambda p: p.effective_from)
        return f"{price.input_per_mtok.normalize():f} / {price.output_per_mtok.normalize():f}"

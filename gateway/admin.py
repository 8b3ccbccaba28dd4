"""Admin for providers (write-only credentials), public models with their deployments and prices,
routing policies with their rules, and routing experiments (the ledger's read-only admin is in ``ledger/admin.py``).

Providers, models, deployments and prices are written through ``gateway.catalog`` (which audits
and announces each change), as ``can apply`` writes them."""

from __future__ import annotations

from collections.abc import Iterable
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
from gateway import cache, catalog, experiments, policies
from gateway.models import (
    DEFAULT_CACHE_TTL,
    DEFAULT_SEMANTIC_THRESHOLD,
    Deployment,
    Experiment,
    LLMModel,
    Price,
    Provider,
    RoutingPolicy,
    RoutingRule,
)
from gateway.providers.base import ProbeSettings, ProviderConfig
from gateway.routing import health
from gateway.routing.policy import PolicyError, check_includes, parse_policy
from gateway.routing.table import DeploymentRoute, breaker_settings
from tenants import audit
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
            "first_byte_timeout",
            "total_timeout",
            "max_retries",
            "responses_api",
            "probe_enabled",
            "probe_interval",
            "probe_request",
            "outlier_latency_factor",
            "breaker_failures",
            "breaker_error_rate",
            "breaker_min_requests",
            "breaker_window",
            "breaker_cooldown",
            "is_active",
        ]

    # Left empty (or absent from a form post): the default.
    BREAKER_FIELDS = (
        "breaker_failures",
        "breaker_error_rate",
        "breaker_min_requests",
        "breaker_window",
        "breaker_cooldown",
        "probe_interval",
        "outlier_latency_factor",
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

    def clean_probe_request(self) -> dict[str, Any]:
        value = self.cleaned_data.get("probe_request") or {}
        if not isinstance(value, dict):
            raise forms.ValidationError(
                'An OpenAI chat body as a JSON object, e.g. {"messages": [...], "max_tokens": 1}.'
            )
        return value

    def clean_base_url(self) -> str:
        value = str(self.cleaned_data.get("base_url") or "")
        egress.validate_url(value)
        return value

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("api_key") and data.get("clear_api_key"):
            raise forms.ValidationError("Either type a new API key or remove the stored one, not both.")
        return data


def health_text(row: dict[str, Any]) -> str:
    """One deployment's health in words: its last probe, average latency and last ejection."""
    info = row["health"]
    parts = []
    last = info["last_probe"]
    if last is not None:
        probe = f"last probe {last['result']} {last['seconds_ago']:.0f} s ago"
        if last["latency_ms"] is not None:
            probe += f" in {last['latency_ms']:.0f} ms"
        if last["error"]:
            probe += f" ({last['error']})"
        parts.append(probe)
    elif info["probes"]:
        parts.append("not probed yet")
    else:
        parts.append("probes off")
    if info["latency_ms"] is not None:
        parts.append(f"average latency {info['latency_ms']:.0f} ms")
    if info["last_ejection"] is not None:
        ejection = info["last_ejection"]
        parts.append(f"ejected {ejection['seconds_ago']:.0f} s ago: {ejection['reason']}")
    return "; ".join(parts)


def health_list(provider: Provider, deployments: Iterable[Deployment]) -> SafeString | str:
    """An HTML list of deployments' breaker state and health (``gateway.routing.health``)."""
    # Not provider_config(): the credential is not needed (nor decrypted) to show the state.
    config = ProviderConfig(
        id=provider.pk,
        slug=provider.slug,
        kind=provider.kind,
        base_url=provider.base_url,
        breaker=breaker_settings(provider),
        probe=ProbeSettings(enabled=provider.probe_enabled, interval=provider.probe_interval),
        outlier_latency_factor=provider.outlier_latency_factor,
    )
    pairs = [
        (d.model.name, DeploymentRoute(id=d.pk, provider=config, upstream_model=d.upstream_model)) for d in deployments
    ]
    if not pairs:
        return "no deployments"
    rows = async_to_sync(health.status)(pairs)
    return format_html(
        "<ul>{}</ul>",
        format_html_join(
            "",
            "<li>{} &rarr; {}: <strong>{}</strong> ({} consecutive failures, opened {} times); {}</li>",
            (
                (
                    r["model"],
                    r["upstream_model"],
                    r["state"],
                    r["consecutive_failures"],
                    r["times_opened"],
                    health_text(r),
                )
                for r in rows
            ),
        ),
    )


@admin.register(Provider)
class ProviderAdmin(AuditedAdmin[Provider]):
    form = ProviderForm
    list_display = ["slug", "kind", "base_url", "has_credential", "deployment_count", "is_active"]
    list_filter = ["kind", "is_active"]
    search_fields = ["slug", "base_url"]
    fieldsets = [
        (None, {"fields": ["slug", "kind", "base_url", "responses_api", "is_active"]}),
        ("Credentials", {"fields": ["has_credential", "api_key", "clear_api_key", "extra_headers"]}),
        (
            "Timeouts and retries",
            {"fields": ["connect_timeout", "first_byte_timeout", "total_timeout", "read_timeout", "max_retries"]},
        ),
        (
            "Health: active probes and outlier detection",
            {"fields": ["probe_enabled", "probe_interval", "probe_request", "outlier_latency_factor"]},
        ),
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

    @admin.display(description="Breaker state and health now")
    def breaker_state(self, obj: Provider) -> SafeString | str:
        """Each deployment's breaker and health as the gateway sees them (Redis; this process in
        embedded mode)."""
        if obj.pk is None:
            return "-"
        return health_list(obj, obj.deployments.select_related("model").order_by("model__name"))

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
    fields = ["provider", "upstream_model", "priority", "weight", "is_active", "health_now"]
    readonly_fields = ["health_now"]
    autocomplete_fields = ["provider"]
    extra = 0

    @admin.display(description="Breaker and health now")
    def health_now(self, obj: Deployment) -> SafeString | str:
        if obj.pk is None:
            return "-"
        return health_list(obj.provider, [obj])


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
    semantic_threshold = forms.FloatField(
        min_value=0.5,
        max_value=1.0,
        required=False,
        initial=DEFAULT_SEMANTIC_THRESHOLD,
        help_text="Cosine similarity (0.5 to 1) a cached prompt must reach to be served (default 0.95)",
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
            "semantic_cache_enabled",
            "semantic_threshold",
            "semantic_embedding_model",
            "strategy",
        ]

    def clean(self) -> dict[str, Any]:
        """The semantic cache needs the exact cache and an embedding model of the catalogue."""
        data: dict[str, Any] = super().clean() or {}
        if data.get("semantic_cache_enabled"):
            if not data.get("cache_enabled"):
                self.add_error("semantic_cache_enabled", "Turn the response cache on too: a semantic hit replays it.")
            name = data.get("semantic_embedding_model") or ""
            if not LLMModel.objects.filter(name=name, kind=LLMModel.Kind.EMBEDDING).exists():
                self.add_error("semantic_embedding_model", "The public name of an embedding model of the catalogue.")
        return data

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["strategy"].required = False  # absent from a post: the default, priority

    def clean_strategy(self) -> str:
        return self.cleaned_data.get("strategy") or "priority"

    def clean_semantic_threshold(self) -> float:
        value = self.cleaned_data.get("semantic_threshold")
        return DEFAULT_SEMANTIC_THRESHOLD if value is None else float(value)

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
    actions = ["drop_cached_answers"]

    @admin.action(description="Drop the selected models' cached answers (every tenant's)")
    def drop_cached_answers(self, request: HttpRequest, queryset: QuerySet[LLMModel]) -> None:
        dropped = 0
        for model in queryset:
            dropped += async_to_sync(cache.invalidate)(cache.Selection(None, model.name))
            audit.record("cache.invalidate", target=model.name, actor=actor_of(request))
        where = "" if cache.shared() else " (this process's cache; each gateway process keeps its own)"
        self.message_user(request, f"{dropped} cached answers dropped{where}.")

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


# --- routing policies ------------------------------------------------------------------------------


class RoutingRuleFormSet(forms.BaseInlineFormSet):
    """The rules together: names unique, and every ``include`` a known rule set without a cycle."""

    def clean(self) -> None:
        super().clean()
        rules = []
        for rule_form in self.forms:
            data = getattr(rule_form, "cleaned_data", None)
            if not data or data.get("DELETE"):
                continue
            rules.append(RoutingRule(**{k: v for k, v in data.items() if k not in ("DELETE", "id", "policy")}))
        name = self.instance.name or "this-policy"
        try:
            compiled = {
                row.name: parse_policy(row.name, policies.rules_config(row), row.fallback_chain)
                for row in RoutingPolicy.objects.filter(is_active=True).exclude(name=name).prefetch_related("rules")
            }
            compiled[name] = parse_policy(name, [r.as_config() for r in sorted(rules, key=lambda r: r.position)])
            check_includes(compiled)
        except PolicyError as err:
            raise forms.ValidationError(str(err)) from None


class RoutingRuleInline(admin.StackedInline):
    """A rule's CEL condition is compiled when the form is validated; an error shows at its field."""

    model = RoutingRule
    formset = RoutingRuleFormSet
    extra = 0
    ordering = ["position", "id"]
    fields = [
        ("position", "name"),
        "condition",
        ("route", "split"),
        "reject",
        ("fallback", "timeouts"),
        ("retries", "tags", "include"),
    ]


@admin.register(RoutingPolicy)
class RoutingPolicyAdmin(AuditedAdmin[RoutingPolicy]):
    """A policy and its rules are written as one unit through ``gateway.policies.policy_put``."""

    list_display = ["name", "attached_to", "rule_count", "is_active", "updated_at"]
    list_filter = ["is_active", "is_library"]
    search_fields = ["name", "tenant__slug"]
    raw_id_fields = ["tenant"]
    inlines = [RoutingRuleInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[RoutingPolicy]:
        return super().get_queryset(request).select_related("tenant").annotate(n_rules=Count("rules"))

    def get_readonly_fields(self, request: HttpRequest, obj: RoutingPolicy | None = None) -> list[str]:
        return ["name"] if obj is not None else []

    @admin.display(description="attached to")
    def attached_to(self, obj: RoutingPolicy) -> str:
        if obj.is_library:
            return "library (include)"
        return f"tenant {obj.tenant.slug}" if obj.tenant else "global"

    @admin.display(description="rules", ordering="n_rules")
    def rule_count(self, obj: RoutingPolicy) -> int:
        return int(getattr(obj, "n_rules", 0))

    def save_model(self, request: HttpRequest, obj: RoutingPolicy, form: ModelForm, change: bool) -> None:
        """Nothing yet: the policy is written with its rules in ``save_related``."""

    def save_related(self, request: HttpRequest, form: ModelForm, formsets: Any, change: bool) -> None:
        obj = form.instance
        rules: list[tuple[int, dict[str, Any]]] = []
        for formset in formsets:
            formset.save(commit=False)  # fills new/changed/deleted_objects for the change message; writes nothing
            for rule_form in formset.forms:
                data = getattr(rule_form, "cleaned_data", None)
                if not data or data.get("DELETE"):
                    continue
                row = RoutingRule(**{k: v for k, v in data.items() if k not in ("DELETE", "id", "policy")})
                rules.append((row.position, row.as_config()))
        rules.sort(key=lambda item: item[0])
        saved, _ = policies.policy_put(
            name=obj.name,
            rules=[config for _, config in rules],
            tenant=obj.tenant,
            is_library=obj.is_library,
            description=obj.description,
            fallback_chain=list(obj.fallback_chain or []),
            is_active=obj.is_active,
            actor=actor_of(request),
            actor_label=ADMIN_LABEL,
        )
        adopt(obj, saved)

    def delete(self, request: HttpRequest, obj: RoutingPolicy) -> None:
        policies.policy_delete(obj, actor=actor_of(request), actor_label=ADMIN_LABEL)


# --- routing experiments ----------------------------------------------------------------------------


@admin.register(Experiment)
class ExperimentAdmin(AuditedAdmin[Experiment]):
    """Written through ``gateway.experiments`` (validated, audited, announced); the results are
    ``can experiments show ID``."""

    list_display = ["slug", "applies_to", "scope", "status", "arm_summary", "auto_promote", "winner", "updated_at"]
    list_filter = ["status", "auto_promote"]
    search_fields = ["slug", "model", "rule", "tenant__slug"]
    raw_id_fields = ["tenant"]
    readonly_fields = ["promoted_at"]
    fields = [
        "slug",
        "tenant",
        ("model", "rule"),
        "arms",
        ("status", "winner", "promoted_at"),
        "description",
        ("auto_promote", "metric", "min_samples", "significance"),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Experiment]:
        return super().get_queryset(request).select_related("tenant")

    def get_readonly_fields(self, request: HttpRequest, obj: Experiment | None = None) -> list[str]:
        return ["slug", "promoted_at"] if obj is not None else ["promoted_at"]

    @admin.display(description="applies to")
    def applies_to(self, obj: Experiment) -> str:
        return obj.model or f"rule {obj.rule}"

    @admin.display(description="tenant")
    def scope(self, obj: Experiment) -> str:
        return obj.tenant.slug if obj.tenant else "(every tenant)"

    @admin.display(description="arms")
    def arm_summary(self, obj: Experiment) -> str:
        return ", ".join(
            f"{a.get('name')} -> {a.get('route')} ({a.get('weight', 1)})" for a in obj.arms if isinstance(a, dict)
        )

    def _put(self, request: HttpRequest, obj: Experiment) -> Experiment:
        saved, _ = experiments.experiment_put(
            slug=obj.slug,
            arms=list(obj.arms or []),
            tenant=obj.tenant,
            model=obj.model,
            rule=obj.rule,
            status=obj.status,
            description=obj.description,
            auto_promote=obj.auto_promote,
            metric=obj.metric,
            min_samples=obj.min_samples,
            significance=obj.significance,
            winner=obj.winner,
            actor=actor_of(request),
            actor_label=ADMIN_LABEL,
        )
        return saved

    def create(self, request: HttpRequest, obj: Experiment, values: dict[str, Any]) -> Experiment:
        return self._put(request, obj)

    def update(self, request: HttpRequest, obj: Experiment, values: dict[str, Any]) -> None:
        adopt(obj, self._put(request, obj))

    def delete(self, request: HttpRequest, obj: Experiment) -> None:
        experiments.experiment_delete(obj, actor=actor_of(request), actor_label=ADMIN_LABEL)

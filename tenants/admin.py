"""Admin for tenants (a tree), plans, API keys and the audit log (budgets: ``budgets.admin``).

Every write made here goes through ``tenants.services`` (which audit it and tell the gateway
processes after commit): the admin has no write path of its own. A new key's plaintext is shown
once, on the page that answers the add (or rotate) POST itself, and is never stored: not in the
database, the session, or a message cookie.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.exceptions import DisallowedModelAdminToField
from django.contrib.admin.options import IS_POPUP_VAR, TO_FIELD_VAR
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import FieldDoesNotExist
from django.db import models, transaction
from django.db.models import Count, Model, Q, QuerySet
from django.forms import ModelForm
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.html import format_html_join
from django.utils.http import urlencode

from tenants import services
from tenants.models import KNOWN_ENDPOINTS, ApiKey, AuditEvent, CacheScope, Plan, Tenant

MICRO = Decimal(1_000_000)
ADMIN_LABEL = "admin"


def usd(micro: int | None) -> str:
    """Micro-USD as dollars: at least cents, up to every micro-dollar, never through a float."""
    if micro is None:
        return "-"
    text = f"{Decimal(micro) / MICRO:,.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


_M = TypeVar("_M", bound=Model)

if TYPE_CHECKING:

    class TypedAdmin(admin.ModelAdmin[_M]):
        pass

else:

    class TypedAdmin(admin.ModelAdmin, Generic[_M]):
        """``ModelAdmin[Model]`` for mypy, without needing django-stubs-ext at run time."""


URL_FIELDS: Mapping[type[models.Field[Any, Any]], Mapping[str, Any]] = {models.URLField: {"assume_scheme": "https"}}


def https_formfield(field: models.Field[Any, Any], **kwargs: Any) -> Any:
    """Model form fields, with URLs read as https:// when typed without a scheme."""
    if isinstance(field, models.URLField):
        kwargs.setdefault("assume_scheme", "https")
    return field.formfield(**kwargs)


def actor_of(request: HttpRequest) -> AbstractBaseUser | None:
    """The logged-in person, for the audit log."""
    user = getattr(request, "user", None)
    return user if isinstance(user, AbstractBaseUser) and user.is_authenticated else None


def adopt(obj: Model, saved: Model) -> None:
    """Make the admin's form instance the row a service just created (so redirects and inlines see it)."""
    for field in obj._meta.concrete_fields:
        setattr(obj, field.attname, getattr(saved, field.attname))
    obj._state.adding = False
    obj._state.db = saved._state.db


class AuditedAdmin(TypedAdmin[_M]):
    """Saves and deletes go to the model's service functions, which validate, write, audit and
    announce the change after commit. Subclasses say which: ``create``, ``update``, ``delete``,
    and ``save_formset`` when they have inlines."""

    formfield_overrides = URL_FIELDS

    @staticmethod
    def field_values(obj: Model, names: Iterable[str]) -> dict[str, Any]:
        """The model fields among ``names`` (a form's fields), with the values the form put on ``obj``."""
        values: dict[str, Any] = {}
        for name in names:
            try:
                field = obj._meta.get_field(name)
            except FieldDoesNotExist:
                continue  # a form-only field (a write-only secret, an amount in USD...)
            if field.concrete and not field.auto_created:
                values[name] = getattr(obj, name)
        return values

    def create(self, request: HttpRequest, obj: _M, values: dict[str, Any]) -> _M:
        raise NotImplementedError(f"{type(self).__name__} cannot add: no service creates {obj._meta.label}")

    def update(self, request: HttpRequest, obj: _M, values: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot change: no service updates {obj._meta.label}")

    def delete(self, request: HttpRequest, obj: _M) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot delete: no service deletes {obj._meta.label}")

    def save_model(self, request: HttpRequest, obj: _M, form: ModelForm, change: bool) -> None:
        values = self.field_values(obj, form.fields)
        if change:
            self.update(request, obj, values)
        else:
            adopt(obj, self.create(request, obj, values))

    def save_formset(self, request: HttpRequest, form: ModelForm, formset: Any, change: bool) -> None:
        raise NotImplementedError(f"{type(self).__name__}: no service writes {formset.model._meta.label} inlines")

    def delete_model(self, request: HttpRequest, obj: _M) -> None:
        self.delete(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[_M]) -> None:
        with transaction.atomic():
            for obj in queryset:
                self.delete(request, obj)


class ReadOnlyAdmin(TypedAdmin[_M]):
    """Written by the gateway, never by hand: view only."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# --- tenants -------------------------------------------------------------------------------------


class SubtreeFilter(admin.SimpleListFilter):
    title = "organisation (whole subtree)"
    parameter_name = "subtree"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(str(pk), slug) for pk, slug in Tenant.objects.filter(parent=None).values_list("id", "slug")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if not self.value():
            return queryset
        children: dict[int | None, list[int]] = defaultdict(list)
        for pk, parent in Tenant.objects.values_list("id", "parent_id"):
            children[parent].append(pk)
        todo, ids = [int(self.value() or 0)], set()
        while todo:
            node = todo.pop()
            if node not in ids:
                ids.add(node)
                todo.extend(children[node])
        return queryset.filter(pk__in=ids)


class TenantForm(forms.ModelForm):
    class Meta:
        model = Tenant
        fields = [
            "slug",
            "name",
            "kind",
            "parent",
            "is_active",
            "require_otp",
            "plan",
            "time_zone",
            "stripe_customer_id",
            "rpm_limit",
            "tpm_limit",
            "allowed_models",
            "cache_enabled",
            "cache_scope",
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["cache_scope"].required = False  # left out: the tenant's entries are its own

    def clean_cache_scope(self) -> str:
        return str(self.cleaned_data.get("cache_scope") or CacheScope.TENANT)

    def clean_allowed_models(self) -> list[str]:
        value = self.cleaned_data.get("allowed_models") or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise forms.ValidationError('A list of public model names, e.g. ["gpt-4o", "gpt-4o-mini"]; [] for all.')
        return list(dict.fromkeys(value))


@admin.register(Tenant)
class TenantAdmin(AuditedAdmin[Tenant]):
    form = TenantForm
    list_display = [
        "slug",
        "name",
        "kind",
        "lineage",
        "plan",
        "time_zone",
        "children_count",
        "active_keys",
        "is_active",
    ]
    list_filter = [SubtreeFilter, "kind", "plan", "is_active"]
    # organisation > team > project: three levels of parents come with each row.
    list_select_related = ["plan", "parent__parent__parent"]
    search_fields = ["slug", "name", "stripe_customer_id"]
    ordering = ["slug"]  # a stable order for the changelist and the autocomplete pickers' pages
    autocomplete_fields = ["parent"]
    readonly_fields = ["lineage", "children_list", "created_at"]
    fieldsets = [
        (None, {"fields": ["slug", "name", "kind", "parent", "lineage", "children_list", "is_active", "require_otp"]}),
        ("Billing and limits", {"fields": ["plan", "time_zone", "stripe_customer_id", "rpm_limit", "tpm_limit"]}),
        ("Models", {"fields": ["allowed_models"]}),
        ("Response cache", {"fields": ["cache_enabled", "cache_scope"]}),
        (None, {"fields": ["created_at"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tenant]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                n_children=Count("children", distinct=True),
                n_keys=Count("api_keys", filter=Q(api_keys__revoked_at__isnull=True), distinct=True),
            )
        )

    @admin.display(description="lineage")
    def lineage(self, obj: Tenant) -> str:
        if obj.pk is None:
            return "-"
        return " › ".join([*(t.slug for t in reversed(obj.ancestors())), obj.slug])

    @admin.display(description="children", ordering="n_children")
    def children_count(self, obj: Tenant) -> int:
        return int(getattr(obj, "n_children", 0) or obj.children.count())

    @admin.display(description="active keys", ordering="n_keys")
    def active_keys(self, obj: Tenant) -> int:
        return int(getattr(obj, "n_keys", 0))

    @admin.display(description="children")
    def children_list(self, obj: Tenant) -> str:
        kids = list(obj.children.order_by("slug")) if obj.pk else []
        if not kids:
            return "-"
        return format_html_join(
            ", ",
            '<a href="{}">{}</a>',
            ((reverse("admin:tenants_tenant_change", args=[k.pk]), k.slug) for k in kids),
        )

    def has_delete_permission(self, request: HttpRequest, obj: Tenant | None = None) -> bool:
        # Tenants own keys and ledger history: deactivate them instead.
        return False

    def create(self, request: HttpRequest, obj: Tenant, values: dict[str, Any]) -> Tenant:
        return services.tenant_create(**values, actor=actor_of(request), actor_label=ADMIN_LABEL)

    def update(self, request: HttpRequest, obj: Tenant, values: dict[str, Any]) -> None:
        services.tenant_update(obj, **values, actor=actor_of(request), actor_label=ADMIN_LABEL)


# --- plans ---------------------------------------------------------------------------------------


@admin.register(Plan)
class PlanAdmin(AuditedAdmin[Plan]):
    list_display = ["slug", "name", "monthly_request_quota", "rpm_limit", "tpm_limit", "tenant_count"]
    search_fields = ["slug", "name"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Plan]:
        return super().get_queryset(request).annotate(n_tenants=Count("tenants"))

    @admin.display(description="tenants", ordering="n_tenants")
    def tenant_count(self, obj: Plan) -> int:
        return int(getattr(obj, "n_tenants", 0))

    def create(self, request: HttpRequest, obj: Plan, values: dict[str, Any]) -> Plan:
        return services.plan_create(**values, actor=actor_of(request), actor_label=ADMIN_LABEL)

    def update(self, request: HttpRequest, obj: Plan, values: dict[str, Any]) -> None:
        services.plan_update(obj, **values, actor=actor_of(request), actor_label=ADMIN_LABEL)

    def delete(self, request: HttpRequest, obj: Plan) -> None:
        services.plan_delete(obj, actor=actor_of(request), actor_label=ADMIN_LABEL)


# --- API keys ------------------------------------------------------------------------------------


class KeyStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "active"), ("revoked", "revoked"), ("expired", "expired")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        now = timezone.now()
        if self.value() == "active":
            return queryset.filter(revoked_at__isnull=True).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        if self.value() == "expired":
            return queryset.filter(revoked_at__isnull=True, expires_at__lte=now)
        return queryset


class ApiKeyForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = [
            "tenant",
            "user",
            "name",
            "scopes",
            "rpm_limit",
            "tpm_limit",
            "expires_at",
            "cache_enabled",
            "cache_own",
        ]

    def clean_scopes(self) -> dict[str, list[str]]:
        value = self.cleaned_data.get("scopes") or {}
        if not isinstance(value, dict) or set(value) - {"models", "endpoints"}:
            raise forms.ValidationError('{"models": [...], "endpoints": [...]}; leave a list out for "all".')
        for kind, items in value.items():
            if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
                raise forms.ValidationError(f"{kind} must be a list of names")
        unknown = [e for e in value.get("endpoints", []) if e not in KNOWN_ENDPOINTS]
        if unknown:
            raise forms.ValidationError(f"unknown endpoint {', '.join(unknown)}; known: {', '.join(KNOWN_ENDPOINTS)}")
        return {k: v for k, v in value.items() if v}


ISSUED_ATTR = "_chittycan_issued_keys"


def issued_keys(request: HttpRequest) -> list[tuple[ApiKey, str]]:
    """The keys issued while answering this request, with their plaintext (kept on the request
    object only, so it dies with the response)."""
    issued: list[tuple[ApiKey, str]] | None = getattr(request, ISSUED_ATTR, None)
    if issued is None:
        issued = []
        setattr(request, ISSUED_ATTR, issued)
    return issued


@admin.register(ApiKey)
class ApiKeyAdmin(AuditedAdmin[ApiKey]):
    form = ApiKeyForm
    list_display = ["prefix", "name", "tenant", "status", "scopes_display", "expires_at", "created_at"]
    list_filter = [KeyStatusFilter, "created_at"]
    list_select_related = ["tenant", "user"]
    search_fields = ["prefix", "name", "tenant__slug"]
    autocomplete_fields = ["tenant"]
    raw_id_fields = ["user"]
    actions = ["revoke_keys", "rotate_keys"]

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[Any]:
        if obj is None:
            return list(ApiKeyForm.Meta.fields)
        return [
            "prefix",
            "tenant",
            "user",
            "name",
            "scopes",
            "rpm_limit",
            "tpm_limit",
            "expires_at",
            "cache_enabled",
            "cache_own",
            "status",
            "revoked_at",
            "rotated_from",
            "created_at",
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[str]:
        if obj is None:
            return []
        return ["prefix", "tenant", "status", "revoked_at", "rotated_from", "created_at"]

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        if "hashed_secret" in lookup:
            return False
        return super().lookup_allowed(lookup, value, request)

    @admin.display(description="status")
    def status(self, obj: ApiKey) -> str:
        if obj.revoked_at is not None:
            return "revoked"
        if obj.expires_at is not None and obj.expires_at <= timezone.now():
            return "expired"
        return "active"

    @admin.display(description="scopes")
    def scopes_display(self, obj: ApiKey) -> str:
        scopes = obj.scopes or {}
        parts = [f"{k}: {', '.join(scopes[k])}" for k in ("models", "endpoints") if scopes.get(k)]
        return "; ".join(parts) or "all"

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False  # revoke instead: the key's usage history stays attributable

    def create(self, request: HttpRequest, obj: ApiKey, values: dict[str, Any]) -> ApiKey:
        issued, plaintext = services.key_issue(
            tenant=obj.tenant,
            name=obj.name,
            scopes=obj.scopes,
            expires_at=obj.expires_at,
            user=obj.user,
            rpm_limit=obj.rpm_limit,
            tpm_limit=obj.tpm_limit,
            actor=actor_of(request),
            actor_label=ADMIN_LABEL,
        )
        issued_keys(request).append((issued, plaintext))
        return issued

    def update(self, request: HttpRequest, obj: ApiKey, values: dict[str, Any]) -> None:
        services.key_update(obj, **values, actor=actor_of(request), actor_label=ADMIN_LABEL)

    def response_add(self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None) -> HttpResponse:
        if not issued_keys(request):
            return super().response_add(request, obj, post_url_continue)
        popup_done = ""
        if IS_POPUP_VAR in request.POST:
            # Added from another form's "+" (a budget's key): the popup shows the key first, and
            # its "use this key" link then hands the new row (never the secret) to that form.
            query = {IS_POPUP_VAR: "1", TO_FIELD_VAR: request.POST.get(TO_FIELD_VAR) or ""}
            popup_done = f"{reverse('admin:tenants_apikey_popup_done', args=[obj.pk])}?{urlencode(query)}"
        return self.keys_created(request, "API key added", popup_done=popup_done)

    def popup_done(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Close an "add key" popup: Django's popup response, with the key's id and label."""
        obj = self.get_object(request, object_id)
        if obj is None or not self.has_view_or_change_permission(request, obj):
            raise Http404("no such key")
        to_field = request.GET.get(TO_FIELD_VAR) or ""
        if to_field and not self.to_field_allowed(request, to_field):
            raise DisallowedModelAdminToField(f"The field {to_field} cannot be referenced.")
        value = obj.serializable_value(to_field or "pk")
        data = json.dumps({"value": str(value), "obj": str(obj)})
        return TemplateResponse(request, "admin/popup_response.html", {"popup_response_data": data})

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view(self.popup_done)
        return [path("<path:object_id>/popup-done/", view, name="tenants_apikey_popup_done"), *super().get_urls()]

    def keys_created(self, request: HttpRequest, title: str, popup_done: str = "") -> HttpResponse:
        """The page that shows the plaintext of the keys this request issued, once. A rendered
        response, not a redirect: Django's messages would carry the secret in a cookie."""
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.opts,
            "issued": issued_keys(request),
            "popup_done": popup_done,
            "is_popup": bool(popup_done),
        }
        response = TemplateResponse(request, "admin/tenants/apikey/key_created.html", context)
        add_never_cache_headers(response)
        return response

    @admin.action(description="Revoke selected keys")
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        count = 0
        for api_key in queryset.filter(revoked_at__isnull=True).select_related("tenant"):
            services.key_revoke(api_key=api_key, actor=actor_of(request), actor_label=ADMIN_LABEL)
            count += 1
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)

    @admin.action(description="Rotate selected keys (new key shown once, old key revoked)")
    def rotate_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> HttpResponse | None:
        for api_key in queryset.filter(revoked_at__isnull=True).select_related("tenant", "user"):
            new_key, plaintext = services.key_rotate(api_key=api_key, actor=actor_of(request), actor_label=ADMIN_LABEL)
            issued_keys(request).append((new_key, plaintext))
        if queryset.filter(revoked_at__isnull=False).exists():
            self.message_user(request, "Revoked keys were skipped.", messages.INFO)
        if not issued_keys(request):
            return None
        return self.keys_created(request, "API keys rotated")


# --- audit log -----------------------------------------------------------------------------------


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin[AuditEvent]):
    """The tamper-evident audit log: read only (no add, change or delete, for anyone); rows leave
    only by retention (``can audit prune``, the prune task). ``can audit verify`` checks the chain."""

    list_display = ["seq", "at", "action", "target", "tenant", "actor_name", "actor_label", "origin", "address"]
    list_display_links = ["seq", "at"]
    list_filter = [
        "origin",
        "action",
        "actor_label",
        ("tenant", admin.RelatedOnlyFieldListFilter),
        ("at", admin.DateFieldListFilter),
    ]
    list_select_related = ["tenant", "actor"]
    search_fields = ["action", "target", "tenant__slug", "actor_name", "address"]
    date_hierarchy = "at"
    ordering = ["-seq"]
    readonly_fields = [
        "seq",
        "at",
        "action",
        "target",
        "tenant",
        "actor",
        "actor_name",
        "actor_label",
        "origin",
        "address",
        "user_agent",
        "os_user",
        "data",
        "prev_hash",
        "hash",
    ]
    fields = tuple(readonly_fields)

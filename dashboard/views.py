"""The tenant dashboard's pages. Thin views: reads through ``dashboard.queries`` and
``ledger.analytics``, every write through the same service functions as the admin, the CLI, the
REST API and ``can apply`` (``tenants.services``, ``budgets.services``, ``control.members``), each
checked against the user's memberships first (``dashboard.access``)."""

from __future__ import annotations

import csv
import functools
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, time, timedelta
from typing import Any
from urllib.parse import quote, urlencode

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login as auth_login
from django.contrib.auth import logout as auth_logout
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db.models import Count, QuerySet, Sum, Value
from django.db.models.functions import Coalesce
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    HttpResponseRedirect,
    StreamingHttpResponse,
)
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_otp import login as otp_login
from django_otp import match_token
from django_otp.plugins.otp_totp.models import TOTPDevice
from rest_framework import exceptions as drf_exceptions

from budgets import services as budget_services
from control import members
from control.models import TenantMembership
from control.requests_api import FIELDS, RequestListView, row_dict
from core.money import format_usd, format_usd_short
from dashboard import queries
from dashboard.access import Access, otp_required_for
from dashboard.forms import AuditFilterForm, BudgetForm, KeyCreateForm, LoginForm, MemberForm, UsageFilterForm
from dashboard.security import LoginThrottle
from ledger import analytics
from ledger.models import UsageRecord
from tenants import audit as audit_log
from tenants import services as tenant_services
from tenants.models import ApiKey, AuditEvent, Tenant

ACTOR_LABEL = "dashboard"
PAGE_ROWS = 100

View = Callable[..., HttpResponseBase]


def _actor(request: HttpRequest) -> AbstractBaseUser | None:
    user = request.user
    return user if isinstance(user, AbstractBaseUser) else None


def _verified(user: Any) -> bool:
    """The session passed the second factor (``is_verified`` comes from django-otp's middleware)."""
    check = getattr(user, "is_verified", None)
    return bool(check()) if callable(check) else False


def _has_authenticator(user: Any) -> bool:
    return bool(TOTPDevice.objects.filter(user=user, confirmed=True).exists())


def _login_url(request: HttpRequest) -> str:
    return f"{reverse('dashboard:login')}?next={quote(request.get_full_path(), safe='/')}"


def _enrol_url() -> str:
    return f"{reverse('admin:otp_enrol')}?next={quote(reverse('dashboard:home'), safe='/')}"


def signed_in(view: View) -> View:
    """Signed in, with the second factor when the user needs one (staff, or a tenant asking for it)."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        user = request.user
        if not user.is_authenticated:
            return HttpResponseRedirect(_login_url(request))
        if otp_required_for(user) and not _verified(user):
            if not _has_authenticator(user):
                return HttpResponseRedirect(_enrol_url())
            auth_logout(request)
            return HttpResponseRedirect(_login_url(request))
        return view(request, *args, **kwargs)

    return never_cache(wrapper)


def tenant_page(view: View) -> View:
    """A page about one tenant (its subtree): 404 unless the user sees it."""

    @signed_in
    @functools.wraps(view)
    def wrapper(request: HttpRequest, slug: str, *args: Any, **kwargs: Any) -> HttpResponseBase:
        access = Access(request.user)
        tenant = Tenant.objects.filter(slug=slug, is_active=True).select_related("parent").first()
        if tenant is None or not access.can_see(tenant.pk):
            raise Http404("No such tenant.")
        return view(request, access, tenant, *args, **kwargs)

    return wrapper


def _context(request: HttpRequest, access: Access, tenant: Tenant, page: str, **extra: Any) -> dict[str, Any]:
    crumbs = [t for t in reversed(tenant.ancestors()) if access.can_see(t.pk)]
    return {
        "tenant": tenant,
        "crumbs": crumbs,
        "page": page,
        "role": access.role(tenant.pk),
        "can_manage": access.can_manage_team(tenant.pk),
        "can_audit": access.can_read_audit(tenant.pk),
        "homes": Tenant.objects.filter(pk__in=access.home_ids).order_by("slug"),
        **extra,
    }


# --- signing in -----------------------------------------------------------------------------------


def _safe_next(request: HttpRequest) -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target and url_has_allowed_host_and_scheme(target, {request.get_host()}, require_https=request.is_secure()):
        return target
    return reverse("dashboard:home")


@never_cache
@require_http_methods(["GET", "POST"])
def login_view(request: HttpRequest) -> HttpResponse:
    form = LoginForm(request, request.POST if request.method == "POST" else None)
    context: dict[str, Any] = {"form": form, "next": _safe_next(request), "oidc": settings.CHITTYCAN_OIDC_ENABLED}
    if request.method != "POST":
        return render(request, "dashboard/login.html", context)
    throttle = LoginThrottle(request, request.POST.get("username", ""))
    if throttle.blocked():
        context["throttled"] = True
        return render(request, "dashboard/login.html", context, status=429)
    if not form.is_valid():
        throttle.failed()
        return render(request, "dashboard/login.html", context, status=400)
    user = form.user
    device = None
    if otp_required_for(user):
        if _has_authenticator(user):
            token = "".join((form.cleaned_data.get("otp_token") or "").split())
            device = match_token(user, token) if token else None
            if device is None:
                throttle.failed()
                form.add_error("otp_token", "Enter the current code of your authenticator app (or a backup code).")
                return render(request, "dashboard/login.html", context, status=400)
        else:
            # First sign-in with a second factor required: signed in, unverified, so only the
            # enrolment page (the admin's, shared) answers until an authenticator is confirmed.
            auth_login(request, user)
            throttle.succeeded()
            return HttpResponseRedirect(_enrol_url())
    auth_login(request, user)
    if device is not None:
        otp_login(request, device)
    throttle.succeeded()
    return HttpResponseRedirect(context["next"])


@require_POST
def logout_view(request: HttpRequest) -> HttpResponse:
    auth_logout(request)
    return HttpResponseRedirect(reverse("dashboard:login"))


@signed_in
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    access = Access(request.user)
    homes = list(Tenant.objects.filter(pk__in=access.home_ids).order_by("slug"))
    if len(homes) == 1:
        return HttpResponseRedirect(reverse("dashboard:overview", args=[homes[0].slug]))
    return render(request, "dashboard/home.html", {"homes": homes, "page": "home"})


# --- overview and tree ----------------------------------------------------------------------------


@tenant_page
@require_GET
def overview(request: HttpRequest, access: Access, tenant: Tenant) -> HttpResponse:
    now = timezone.now()
    start, end = queries.period_bounds(tenant, now)
    ids = analytics.subtree_ids(tenant.pk)
    m = analytics.metrics(tenant_ids=ids, since=start, until=end)
    context = _context(
        request,
        access,
        tenant,
        "overview",
        period_start=start,
        period_end=end,
        metrics=m,
        spent_usd=format_usd_short(m.cost_micro),
        forecast_usd=format_usd_short(queries.forecast_micro(m.cost_micro, start, end, now) or 0),
        error_rate=(round(m.errors * 100 / m.requests, 2) if m.requests else 0),
        savings_usd=format_usd_short(m.savings_micro),
        budgets=queries.budget_lines(ids, now),
        chart=queries.daily_spend_by_model(tenant, start, end),
        children=queries.child_spend(tenant, start, end),
    )
    return render(request, "dashboard/overview.html", context)


@tenant_page
@require_GET
def tree(request: HttpRequest, access: Access, tenant: Tenant) -> HttpResponse:
    start, end = queries.period_bounds(tenant)
    rows = queries.tree(tenant, start, end)
    return render(
        request, "dashboard/tree.html", _context(request, access, tenant, "tree", rows=rows, period_start=start)
    )


# --- keys -----------------------------------------------------------------------------------------


def _subtree(tenant: Tenant) -> list[Tenant]:
    ids = analytics.subtree_ids(tenant.pk)
    return list(Tenant.objects.filter(pk__in=ids, is_active=True).order_by("slug"))


@tenant_page
@require_http_methods(["GET", "POST"])
def keys(request: HttpRequest, access: Access, tenant: Tenant) -> HttpResponse:
    subtree = _subtree(tenant)
    creatable = [(t.pk, t.slug) for t in subtree if access.can_create_key(t.pk)]
    form = KeyCreateForm(
        request.POST if request.method == "POST" else None, tenants=creatable, initial={"tenant": str(tenant.pk)}
    )
    created: tuple[ApiKey, str] | None = None
    if request.method == "POST":
        if not creatable:
            raise Http404("You cannot create keys here.")
        if form.is_valid():
            owner = Tenant.objects.get(pk=int(form.cleaned_data["tenant"]))
            created = tenant_services.key_issue(
                tenant=owner,
                name=form.cleaned_data["name"],
                scopes=form.scopes(),
                expires_at=form.cleaned_data.get("expires_at"),
                user=request.user,
                actor=_actor(request),
                actor_label=ACTOR_LABEL,
            )
            form = KeyCreateForm(tenants=creatable, initial={"tenant": str(tenant.pk)})
    ids = [t.pk for t in subtree]
    rows = queries.keys_of(ids)
    start, _ = queries.period_bounds(tenant)
    counts = queries.key_counts(ids, start)
    listing = [
        {
            "key": k,
            "manageable": access.can_manage_key(k),
            "requests": counts.get(k.pk, (0, 0))[0],
            "spent_usd": format_usd_short(counts.get(k.pk, (0, 0))[1]),
        }
        for k in rows
    ]
    context = _context(
        request, access, tenant, "keys", form=form, can_create=bool(creatable), rows=listing, created=created
    )
    return render(request, "dashboard/keys.html", context, status=201 if created else 200)


def _own_key(access: Access, tenant: Tenant, key_id: int) -> ApiKey:
    key = get_object_or_404(ApiKey.objects.select_related("tenant"), pk=key_id)
    if key.tenant_id not in analytics.subtree_ids(tenant.pk) or not access.can_see(key.tenant_id):
        raise Http404("No such key.")
    if not access.can_manage_key(key):
        raise Http404("No such key.")
    return key


@tenant_page
@require_POST
def key_revoke(request: HttpRequest, access: Access, tenant: Tenant, key_id: int) -> HttpResponse:
    key = _own_key(access, tenant, key_id)
    tenant_services.key_revoke(api_key=key, actor=_actor(request), actor_label=ACTOR_LABEL)
    messages.success(request, f"Key {key.prefix}… revoked: it stops working within seconds.")
    return HttpResponseRedirect(reverse("dashboard:keys", args=[tenant.slug]))


@tenant_page
@require_POST
def key_rotate(request: HttpRequest, access: Access, tenant: Tenant, key_id: int) -> HttpResponse:
    key = _own_key(access, tenant, key_id)
    if key.revoked_at is not None:
        messages.error(request, "A revoked key cannot be rotated.")
        return HttpResponseRedirect(reverse("dashboard:keys", args=[tenant.slug]))
    new_key, plaintext = tenant_services.key_rotate(api_key=key, actor=_actor(request), actor_label=ACTOR_LABEL)
    subtree = _subtree(tenant)
    creatable = [(t.pk, t.slug) for t in subtree if access.can_create_key(t.pk)]
    ids = [t.pk for t in subtree]
    listing = [
        {"key": k, "manageable": access.can_manage_key(k), "requests": 0, "spent_usd": ""} for k in queries.keys_of(ids)
    ]
    form = KeyCreateForm(tenants=creatable, initial={"tenant": str(tenant.pk)})
    context = _context(
        request,
        access,
        tenant,
        "keys",
        form=form,
        can_create=bool(creatable),
        rows=listing,
        created=(new_key, plaintext),
    )
    return render(request, "dashboard/keys.html", context, status=201)


# --- budgets --------------------------------------------------------------------------------------


def _budget_owners(access: Access, tenant: Tenant) -> list[tuple[str, str]]:
    subtree = _subtree(tenant)
    owners = [(f"t{t.pk}", t.slug) for t in subtree if access.can_budget(t.pk)]
    for k in ApiKey.objects.filter(tenant__in=subtree, revoked_at__isnull=True).select_related("tenant"):
        if access.can_budget_key(k):
            owners.append((f"k{k.pk}", f"key {k.prefix}… ({k.name or k.tenant.slug})"))
    return owners


@tenant_page
@require_http_methods(["GET", "POST"])
def budgets(request: HttpRequest, access: Access, tenant: Tenant) -> HttpResponse:
    owners = _budget_owners(access, tenant)
    form = BudgetForm(request.POST if request.method == "POST" else None, owners=owners)
    status = 200
    if request.method == "POST":
        if not owners:
            raise Http404("You cannot set budgets here.")
        if form.is_valid():
            owner = form.cleaned_data["owner"]
            target: dict[str, Any] = {}
            if owner.startswith("t"):
                target["tenant"] = Tenant.objects.get(pk=int(owner[1:]))
            else:
                target["api_key"] = ApiKey.objects.get(pk=int(owner[1:]))
            try:
                budget_services.budget_put(
                    **target,
                    period=form.cleaned_data["period"],
                    limit_micro=form.cleaned_data["limit_usd"],
                    hard=form.cleaned_data["hard"],
                    alert_thresholds=form.cleaned_data["alert_thresholds"] or None,
                    alert_emails=form.cleaned_data["alert_emails"],
                    allow_weaken=form.cleaned_data["allow_weaken"],
                    actor_label=f"{ACTOR_LABEL}:{request.user.get_username()}",
                )
            except budget_services.WeakenRefused as exc:
                form.add_error("allow_weaken", f"Refused: {exc}. Tick 'Allow raising a hard limit' to do it.")
                status = 400
            except ValidationError as exc:
                form.add_error(None, exc)
                status = 400
            else:
                messages.success(request, "Budget saved.")
                return HttpResponseRedirect(reverse("dashboard:budgets", args=[tenant.slug]))
        else:
            status = 400
    ids = analytics.subtree_ids(tenant.pk)
    context = _context(
        request,
        access,
        tenant,
        "budgets",
        form=form,
        can_budget=bool(owners),
        lines=queries.budget_lines(ids),
        alerts=queries.recent_alerts(ids),
    )
    return render(request, "dashboard/budgets.html", context, status=status)


# --- members --------------------------------------------------------------------------------------


@tenant_page
@require_http_methods(["GET", "POST"])
def team(request: HttpRequest, access: Access, tenant: Tenant) -> HttpResponse:
    subtree = _subtree(tenant)
    manageable = [(t.pk, t.slug) for t in subtree if access.can_manage_team(t.pk)]
    roles = access.grantable_roles(tenant.pk)
    form = MemberForm(request.POST if request.method == "POST" else None, tenants=manageable, roles=roles)
    status = 200
    if request.method == "POST":
        if not manageable:
            raise Http404("You cannot manage members here.")
        action = request.POST.get("action", "set")
        if action == "remove":
            membership = get_object_or_404(
                TenantMembership.objects.select_related("user", "tenant"),
                pk=int(request.POST.get("membership", "0") or 0)
                if str(request.POST.get("membership", "")).isdigit()
                else 0,
            )
            if membership.tenant_id not in dict(manageable) or membership.role not in access.grantable_roles(
                membership.tenant_id
            ):
                raise Http404("No such membership.")
            members.member_remove(
                user=membership.user, tenant=membership.tenant, actor=_actor(request), actor_label=ACTOR_LABEL
            )
            messages.success(request, f"{membership.user.get_username()} removed from {membership.tenant.slug}.")
            return HttpResponseRedirect(reverse("dashboard:team", args=[tenant.slug]))
        if form.is_valid():
            target = Tenant.objects.get(pk=int(form.cleaned_data["tenant"]))
            role = form.cleaned_data["role"]
            if role not in access.grantable_roles(target.pk):
                form.add_error("role", "You cannot give that role.")
                status = 400
            else:
                members.member_set(
                    user=form.cleaned_data["username"],
                    tenant=target,
                    role=role,
                    actor=_actor(request),
                    actor_label=ACTOR_LABEL,
                )
                messages.success(request, "Membership saved.")
                return HttpResponseRedirect(reverse("dashboard:team", args=[tenant.slug]))
        else:
            status = 400
    rows = (
        TenantMembership.objects.filter(tenant__in=subtree)
        .select_related("user", "tenant")
        .order_by("tenant__slug", "user__username")
    )
    listing = [
        {"m": m, "removable": m.tenant_id in dict(manageable) and m.role in access.grantable_roles(m.tenant_id)}
        for m in rows
    ]
    context = _context(request, access, tenant, "team", form=form, can_edit=bool(manageable and roles), rows=listing)
    return render(request, "dashboard/team.html", context, status=status)


# --- usage ----------------------------------------------------------------------------------------


def _usage_rows(request: HttpRequest, tenant: Tenant) -> tuple[UsageFilterForm, QuerySet[UsageRecord], str | None]:
    ids = analytics.subtree_ids(tenant.pk)
    key_choices = [
        (str(k.pk), f"{k.prefix}… {k.name}")
        for k in ApiKey.objects.filter(tenant_id__in=ids).order_by("-created_at")[:500]
    ]
    form = UsageFilterForm(request.GET or None, keys=key_choices)
    rows = UsageRecord.objects.filter(tenant_id__in=ids).select_related("tenant", "api_key")
    if not request.GET:
        return form, rows, None
    if not form.is_valid():
        return form, rows.none(), "Check the filters."
    params: dict[str, str] = {}
    for name in ("start", "end"):
        value = form.cleaned_data.get(name)
        if value is not None:
            params[name] = value.isoformat()
    for name in ("key", "model", "status"):
        value = form.cleaned_data.get(name)
        if value:
            params[name] = str(value)
    try:
        rows = RequestListView.filtered(rows, params)
    except drf_exceptions.ValidationError as exc:
        detail = exc.detail if isinstance(exc.detail, dict) else {"filters": exc.detail}
        for name, problems in detail.items():
            form.add_error(name if name in form.fields else None, " ".join(str(p) for p in problems))
        return form, rows.none(), "Check the filters."
    return form, rows, None


@tenant_page
@require_GET
def usage(request: HttpRequest, access: Access, tenant: Tenant) -> HttpResponse:
    form, rows, problem = _usage_rows(request, tenant)
    page = list(rows.order_by("-created_at", "-id")[:PAGE_ROWS])
    totals = rows.aggregate(n=Count("id"), c=Coalesce(Sum("cost_micro"), Value(0)))
    summary = {"requests": int(totals["n"]), "cost_usd": format_usd(int(totals["c"]))}
    query = urlencode({k: v for k, v in request.GET.items() if v})
    context = _context(
        request,
        access,
        tenant,
        "usage",
        form=form,
        rows=[row_dict(r) for r in page],
        summary=summary,
        problem=problem,
        csv_url=f"{reverse('dashboard:usage_csv', args=[tenant.slug])}{'?' + query if query else ''}",
        shown=len(page),
    )
    return render(request, "dashboard/usage.html", context, status=400 if problem else 200)


class _Echo:
    def write(self, value: str) -> str:
        return value


@tenant_page
@require_GET
def usage_csv(request: HttpRequest, access: Access, tenant: Tenant) -> HttpResponseBase:
    form, rows, problem = _usage_rows(request, tenant)
    if problem:
        return HttpResponse(problem, status=400, content_type="text/plain")
    writer = csv.writer(_Echo())

    async def lines() -> AsyncIterator[str]:
        # Asynchronous, so the ASGI server streams it as it is read (2,000 rows a query) instead
        # of Django collecting a synchronous iterator whole first.
        yield writer.writerow(FIELDS)
        async for record in rows.order_by("-created_at", "-id").aiterator(chunk_size=2000):
            row = row_dict(record)
            yield writer.writerow([row[f] for f in FIELDS])

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="usage-{tenant.slug}.csv"'
    return response


@tenant_page
@require_GET
def request_detail(request: HttpRequest, access: Access, tenant: Tenant, request_id: str) -> HttpResponse:
    ids = analytics.subtree_ids(tenant.pk)
    record = (
        UsageRecord.objects.filter(request_id=request_id, tenant_id__in=ids).select_related("tenant", "api_key").first()
    )
    if record is None:
        raise Http404("No such request.")
    row = row_dict(record, detail=True)
    for structured in ("timings_ms", "attempts", "route_decision"):  # shown in their own tables
        row.pop(structured, None)
    timings = sorted(
        (record.timings if isinstance(record.timings, dict) else {}).items(),
        key=lambda kv: -float(kv[1]) if isinstance(kv[1], int | float) else 0,
    )
    context = _context(
        request,
        access,
        tenant,
        "usage",
        row=row,
        timings=timings,
        route=queries.route_view(record),
        attempts=queries.attempt_rows(record),
    )
    return render(request, "dashboard/request.html", context)


# --- audit and live feed --------------------------------------------------------------------------


AUDIT_PAGE_ROWS = 100


@tenant_page
@require_GET
def audit(request: HttpRequest, access: Access, tenant: Tenant) -> HttpResponse:
    """The audit log of the tenant and its subtree, newest first, ``AUDIT_PAGE_ROWS`` a page; the
    "older" link carries the last row's ``seq`` as the cursor, with the filters."""
    if not access.can_read_audit(tenant.pk):
        raise Http404("No such page.")
    form = AuditFilterForm(request.GET or None)
    rows: list[AuditEvent] = []
    older_url = newest_url = None
    problem = None
    if request.GET and not form.is_valid():
        problem = "Check the filters."
    else:
        data = form.cleaned_data if request.GET else {}
        since, until = data.get("since"), data.get("until")
        events = audit_log.events(
            since=datetime.combine(since, time.min, tzinfo=UTC) if since else None,
            until=datetime.combine(until + timedelta(days=1), time.min, tzinfo=UTC) if until else None,
            tenant_ids=set(analytics.subtree_ids(tenant.pk)),
        ).select_related("actor")
        if data.get("action"):
            events = events.filter(action__startswith=data["action"])
        if data.get("before"):
            events = events.filter(seq__lt=data["before"])
        rows = list(events.order_by("-seq")[: AUDIT_PAGE_ROWS + 1])
        filters = {k: v for k, v in request.GET.items() if v and k in form.fields and k != "before"}
        base = reverse("dashboard:audit", args=[tenant.slug])
        if len(rows) > AUDIT_PAGE_ROWS:
            rows = rows[:AUDIT_PAGE_ROWS]
            older_url = f"{base}?{urlencode({**filters, 'before': rows[-1].seq})}"
        if data.get("before"):
            newest_url = f"{base}?{urlencode(filters)}" if filters else base
    context = _context(
        request,
        access,
        tenant,
        "audit",
        form=form,
        rows=rows,
        problem=problem,
        older_url=older_url,
        newest_url=newest_url,
        page_rows=AUDIT_PAGE_ROWS,
    )
    return render(request, "dashboard/audit.html", context, status=400 if problem else 200)


@tenant_page
@require_GET
def live(request: HttpRequest, access: Access, tenant: Tenant) -> HttpResponse:
    return render(request, "dashboard/live.html", _context(request, access, tenant, "live"))


__all__ = [
    "audit",
    "budgets",
    "home",
    "key_revoke",
    "key_rotate",
    "keys",
    "live",
    "login_view",
    "logout_view",
    "overview",
    "request_detail",
    "team",
    "tree",
    "usage",
    "usage_csv",
]

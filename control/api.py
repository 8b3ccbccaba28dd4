"""The management REST API (DRF): tenants, keys, budgets, usage and spend, scoped to the caller's
tenant subtrees (see control/permissions.py). Writes go through the service functions, which
audit them and tell every gateway process after commit."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from rest_framework import authentication, exceptions, mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from budgets import services as budget_services
from budgets.models import Budget
from budgets.service import spend_status
from budgets.spend import budget_spend
from control import serializers as s
from control.models import TenantMembership
from control.permissions import HasTenantAccess, Scope, scope_of
from control.tokens import ManagementTokenAuthentication
from ledger import analytics
from tenants import audit, services
from tenants.models import ApiKey, Tenant

log = logging.getLogger(__name__)

AUTHENTICATION = [ManagementTokenAuthentication, authentication.SessionAuthentication]


def _actor(request: Request) -> str:
    return f"api:{request.user.get_username()}"


def _not_found_as_invalid(field: str, value: Any) -> exceptions.ValidationError:
    # The same words as for an object that does not exist at all.
    return exceptions.ValidationError({field: [f"Object with {field}={value} does not exist."]})


def _django_errors(exc: DjangoValidationError) -> exceptions.ValidationError:
    detail: Any = exc.message_dict if hasattr(exc, "error_dict") else exc.messages
    return exceptions.ValidationError(detail)


class ScopedViewSet(viewsets.GenericViewSet[Any]):
    authentication_classes = AUTHENTICATION
    permission_classes = [HasTenantAccess]

    @property
    def scope(self) -> Scope:
        return scope_of(self.request)

    def require_admin(self, tenant_id: int) -> None:
        if not self.scope.can_admin(tenant_id):
            raise exceptions.PermissionDenied("You can read this tenant but not change it (member role).")


# --- tenants ------------------------------------------------------------------------------------


class TenantViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ScopedViewSet):
    serializer_class = s.TenantSerializer
    lookup_field = "slug"

    def get_queryset(self) -> QuerySet[Tenant]:
        qs = Tenant.objects.select_related("parent").order_by("slug")
        ids = self.scope.visible_ids
        return qs if ids is None else qs.filter(pk__in=ids)

    def create(self, request: Request) -> Response:
        data = s.TenantCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        parent = None
        if v["parent"]:
            parent = self.get_queryset().filter(slug=v["parent"]).first()
            if parent is None:
                raise _not_found_as_invalid("parent", v["parent"])
            self.require_admin(parent.pk)
        elif not self.scope.is_staff:
            raise exceptions.PermissionDenied("Only staff create top-level tenants; give a parent.")
        try:
            tenant = services.tenant_create(
                slug=v["slug"],
                name=v["name"],
                parent=parent,
                kind=v["kind"],
                time_zone=v["time_zone"] or (parent.time_zone if parent else "UTC"),
                actor_label=_actor(request),
            )
        except DjangoValidationError as exc:
            raise _django_errors(exc) from exc
        request._chittycan_scope = None  # type: ignore[attr-defined]  # the subtree grew
        return Response(s.TenantSerializer(tenant).data, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["get"])
    def spend(self, request: Request, slug: str | None = None) -> Response:
        """Real-time spend of every budget on this tenant and on its keys."""
        tenant = self.get_object()
        budgets = Budget.objects.filter(tenant=tenant) | Budget.objects.filter(api_key__tenant=tenant)
        return Response(
            {"tenant": tenant.slug, "budgets": [budget_status(b) for b in budgets.select_related("tenant", "api_key")]}
        )


# --- keys ---------------------------------------------------------------------------------------


class ApiKeyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ScopedViewSet):
    serializer_class = s.ApiKeySerializer

    def get_queryset(self) -> QuerySet[ApiKey]:
        qs = ApiKey.objects.select_related("tenant").order_by("-created_at")
        ids = self.scope.visible_ids
        if ids is not None:
            qs = qs.filter(tenant_id__in=ids)
        tenant = self.request.query_params.get("tenant")
        if tenant:
            qs = qs.filter(tenant__slug=tenant)
        return qs

    def create(self, request: Request) -> Response:
        data = s.ApiKeyCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        tenant = Tenant.objects.filter(slug=v["tenant"]).first()
        if tenant is None or not self.scope.can_see(tenant.pk):
            raise _not_found_as_invalid("tenant", v["tenant"])
        self.require_admin(tenant.pk)
        if v["expires_at"] is not None and v["expires_at"] <= timezone.now():
            raise exceptions.ValidationError({"expires_at": ["Must be in the future."]})
        api_key, plaintext = services.key_issue(
            tenant=tenant,
            name=v["name"],
            scopes=v["scopes"],
            expires_at=v["expires_at"],
            user=request.user,
            rpm_limit=v["rpm_limit"],
            tpm_limit=v["tpm_limit"],
            actor_label=_actor(request),
        )
        body = dict(s.ApiKeySerializer(api_key).data)
        body["key"] = plaintext  # shown this once; only a hash is stored
        return Response(body, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str | None = None) -> Response:
        api_key = self.get_object()
        self.require_admin(api_key.tenant_id)
        services.key_revoke(api_key=api_key, actor_label=_actor(request))
        return Response(s.ApiKeySerializer(api_key).data)

    @action(detail=True, methods=["post"])
    def rotate(self, request: Request, pk: str | None = None) -> Response:
        api_key = self.get_object()
        self.require_admin(api_key.tenant_id)
        if api_key.revoked_at is not None:
            raise exceptions.ValidationError({"detail": "A revoked key cannot be rotated; create a new one."})
        new_key, plaintext = services.key_rotate(api_key=api_key, actor_label=_actor(request))
        body = dict(s.ApiKeySerializer(new_key).data)
        body["key"] = plaintext
        return Response(body, status=status.HTTP_201_CREATED)


# --- budgets ------------------------------------------------------------------------------------


def budget_status(budget: Budget) -> dict[str, Any]:
    """Spend vs limit now: settled spend from the ledger, plus in-flight reservations when the
    budget enforcement layer can report them."""
    spend = budget_spend(budget)
    reserved: int | None = None
    try:
        reserved = int(spend_status(budget).reserved_micro)
    except Exception:  # no enforcement layer, or its counter store is unreachable: say so
        log.warning("in-flight reservations unavailable for budget %s", budget.pk, exc_info=True)
    return {
        "budget": budget.pk,
        "scope": "tenant" if budget.tenant_id else "key",
        "tenant": budget.tenant.slug if budget.tenant else None,
        "api_key": budget.api_key_id,
        "period": budget.period,
        "period_key": spend.period_key,
        "period_start": spend.period_start,
        "period_end": spend.period_end,
        "limit_micro": spend.limit_micro,
        "spent_micro": spend.spent_micro,
        "reserved_micro": reserved,  # null when unknown
        "remaining_micro": max(0, spend.limit_micro - spend.spent_micro - (reserved or 0)),
        "percent": str(spend.percent),
        "hard": budget.hard,
        "exceeded": spend.spent_micro >= spend.limit_micro,
    }


class BudgetViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    ScopedViewSet,
):
    serializer_class = s.BudgetSerializer

    def get_queryset(self) -> QuerySet[Budget]:
        qs = Budget.objects.select_related("tenant", "api_key__tenant").order_by("pk")
        ids = self.scope.visible_ids
        if ids is not None:
            qs = qs.filter(tenant_id__in=ids) | qs.filter(api_key__tenant_id__in=ids)
        tenant = self.request.query_params.get("tenant")
        if tenant:
            qs = qs.filter(tenant__slug=tenant) | qs.filter(api_key__tenant__slug=tenant)
        return qs.order_by("pk")

    def _check_budget_rights(self, tenant: Tenant | None, api_key: ApiKey | None) -> None:
        if tenant is not None:
            if not self.scope.can_see(tenant.pk):
                raise _not_found_as_invalid("tenant", tenant.slug)
            if not self.scope.can_budget(tenant.pk):
                raise exceptions.PermissionDenied(
                    "The budget of the tenant you administer is set from above; you can set budgets below it."
                )
        if api_key is not None:
            if not self.scope.can_see(api_key.tenant_id):
                raise _not_found_as_invalid("api_key", api_key.pk)
            self.require_admin(api_key.tenant_id)

    def _save(self, serializer: serializers.BaseSerializer[Budget], budget: Budget | None) -> Budget:
        v = dict(serializer.validated_data)
        allow_weaken = bool(v.pop("allow_weaken", False))
        tenant = v.pop("tenant", None) if budget is None else budget.tenant
        api_key = v.pop("api_key", None) if budget is None else budget.api_key
        period = v.pop("period", Budget.Period.MONTH) if budget is None else budget.period
        self._check_budget_rights(tenant, api_key)
        limit = v.pop("limit_micro", None if budget is None else budget.limit_micro)
        hard = v.pop("hard", True if budget is None else budget.hard)
        settings_: dict[str, Any] = {
            "alert_thresholds": v.get("alert_thresholds"),
            "alert_emails": v.get("alert_emails"),
            "webhook_url": v.get("webhook_url"),
            "webhook_secret": v.get("webhook_secret"),
            "allow_weaken": allow_weaken,
            "actor_label": _actor(self.request),
        }
        try:
            if budget is not None:
                return budget_services.budget_update(budget, limit_micro=limit, hard=hard, **settings_).budget
            same = Budget.objects.filter(tenant=tenant, api_key=api_key, period=period, hard=hard)
            if not hard:
                same = same.filter(limit_micro=limit)
            clash = same.first()
            if clash is not None:
                what = f"a hard {period} budget" if hard else f"a soft {period} budget at this limit"
                raise exceptions.ValidationError(
                    {"period": [f"This scope already has {what} (id {clash.pk}); update that one."]}
                )
            return budget_services.budget_put(
                tenant=tenant, api_key=api_key, period=period, limit_micro=limit, hard=hard, **settings_
            ).budget
        except budget_services.WeakenRefused as exc:
            raise exceptions.ValidationError(
                {"allow_weaken": [f"Refused: {exc}. Send allow_weaken: true to do it."]}
            ) from exc
        except DjangoValidationError as exc:
            raise _django_errors(exc) from exc
        except (ValueError, IntegrityError) as exc:
            raise exceptions.ValidationError({"detail": str(exc)}) from exc

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        budget = self._save(serializer, None)
        return Response(self.get_serializer(budget).data, status=status.HTTP_201_CREATED)

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        budget = self.get_object()
        serializer = self.get_serializer(budget, data=request.data, partial=kwargs.pop("partial", False))
        serializer.is_valid(raise_exception=True)
        budget = self._save(serializer, budget)
        return Response(self.get_serializer(budget).data)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        budget = self.get_object()
        self._check_budget_rights(budget.tenant, budget.api_key)
        allow_weaken = request.query_params.get("allow_weaken", "").lower() in ("1", "true", "yes")
        try:
            budget_services.budget_delete(budget=budget, allow_weaken=allow_weaken, actor_label=_actor(request))
        except budget_services.WeakenRefused as exc:
            raise exceptions.ValidationError(
                {"allow_weaken": [f"Refused: {exc}. Add ?allow_weaken=true to do it."]}
            ) from exc
        return Response(status=status.HTTP_204_NO_CONTENT)

    @action(detail=True, methods=["get"])
    def status(self, request: Request, pk: str | None = None) -> Response:
        return Response(budget_status(self.get_object()))


# --- usage --------------------------------------------------------------------------------------


class UsageView(APIView):
    """``GET /api/usage/?tenant=SLUG&period=day|month|total&group_by=model|key|provider|tenant|day``
    or ``start=...&end=...`` (ISO date-times) instead of ``period``."""

    authentication_classes = AUTHENTICATION
    permission_classes = [HasTenantAccess]

    def get(self, request: Request) -> Response:
        scope = scope_of(request)
        params = request.query_params
        group_by = params.get("group_by", "model")
        if group_by not in (*analytics.GROUPS, "day"):
            raise exceptions.ValidationError({"group_by": [f"One of {', '.join([*analytics.GROUPS, 'day'])}."]})
        tenant: Tenant | None = None
        if params.get("tenant"):
            tenant = Tenant.objects.filter(slug=params["tenant"]).first()
            if tenant is None or not scope.can_see(tenant.pk):
                raise exceptions.NotFound("No such tenant.")
            tenant_ids: list[int] | None = analytics.subtree_ids(tenant.pk)
        elif scope.visible_ids is None:
            tenant_ids = None
        else:
            tenant_ids = sorted(scope.visible_ids)
        start, end = self._window(params, tenant)
        if group_by == "day":
            if tenant is None or start is None or end is None:
                raise exceptions.ValidationError({"group_by": ["day needs a tenant and a bounded period."]})
            days = analytics.daily_costs(tenant, start, end)
            results: list[dict[str, Any]] = [
                {"day": d.isoformat(), "calls": c, "cost_micro": m} for d, (c, m) in sorted(days.items())
            ]
        else:
            results = analytics.usage_breakdown(tenant_ids=tenant_ids, start=start, end=end, group_by=group_by)
        total: dict[str, Any] = {
            "calls": sum(int(r["calls"]) for r in results),
            "cost_micro": sum(int(r["cost_micro"]) for r in results),
        }
        saved = analytics.cache_savings(tenant_ids, start, end)
        total.update(
            cache_hits=saved.cache_hits,
            coalesced=saved.coalesced,
            saved_micro=saved.saved_micro,
            saved_usd=f"{saved.saved_micro / 1_000_000:.6f}",
            cache_hit_rate=saved.hit_rate,
        )
        return Response(
            {
                "tenant": tenant.slug if tenant else None,
                "start": start,
                "end": end,
                "group_by": group_by,
                "results": results,
                "total": total,
            }
        )

    @staticmethod
    def _window(params: Any, tenant: Tenant | None) -> tuple[datetime | None, datetime | None]:
        period = params.get("period")
        if period:
            if period not in Budget.Period.values:
                raise exceptions.ValidationError({"period": [f"One of {', '.join(Budget.Period.values)}."]})
            zone = tenant.time_zone if tenant else "UTC"
            return analytics.period_bounds(period, zone, timezone.now())
        bounds: list[datetime | None] = []
        for name in ("start", "end"):
            raw = params.get(name)
            if not raw:
                bounds.append(None)
                continue
            moment = parse_datetime(raw)
            if moment is None:
                raise exceptions.ValidationError({name: ["An ISO 8601 date-time, e.g. 2026-11-01T00:00:00Z."]})
            if timezone.is_naive(moment):
                moment = moment.replace(tzinfo=ZoneInfo(tenant.time_zone if tenant else "UTC"))
            bounds.append(moment)
        return bounds[0], bounds[1]


# --- audit log ----------------------------------------------------------------------------------

AUDIT_PAGE_MAX = 1000


class AuditView(APIView):
    """``GET /api/audit/?since=...&until=...&tenant=SLUG&action=...&after_seq=N&limit=100``: the audit
    log of the tenants the caller administers (their whole subtrees; staff: every row), in chain
    order, ``limit`` rows at a time (``next_after_seq`` continues). Members who are not admins get 403."""

    authentication_classes = AUTHENTICATION
    permission_classes = [HasTenantAccess]

    def get(self, request: Request) -> Response:
        scope = scope_of(request)
        params = request.query_params
        allowed = scope.admin_ids
        if allowed is not None and not allowed:
            raise exceptions.PermissionDenied("Only tenant admins and staff read the audit log.")
        tenant_ids = allowed
        if params.get("tenant"):
            tenant = Tenant.objects.filter(slug=params["tenant"]).first()
            if tenant is None or not scope.can_see(tenant.pk):
                raise exceptions.NotFound("No such tenant.")
            if not scope.can_admin(tenant.pk):
                raise exceptions.PermissionDenied("Only tenant admins and staff read the audit log.")
            tenant_ids = audit.subtree_ids(tenant) if allowed is None else audit.subtree_ids(tenant) & allowed
        since, until = (self._moment(params, name) for name in ("since", "until"))
        limit = self._int(params, "limit", 100)
        if not 1 <= limit <= AUDIT_PAGE_MAX:
            raise exceptions.ValidationError({"limit": [f"Between 1 and {AUDIT_PAGE_MAX}."]})
        rows = audit.events(since=since, until=until, tenant_ids=tenant_ids).filter(
            seq__gt=self._int(params, "after_seq", 0)
        )
        if params.get("action"):
            rows = rows.filter(action=params["action"])
        page = list(rows[: limit + 1])
        more = len(page) > limit
        page = page[:limit]
        return Response(
            {
                "results": [audit.as_dict(e) for e in page],
                "next_after_seq": page[-1].seq if more and page else None,
            }
        )

    @staticmethod
    def _int(params: Any, name: str, default: int) -> int:
        raw = params.get(name)
        if raw in (None, ""):
            return default
        try:
            value = int(raw)
        except ValueError:
            raise exceptions.ValidationError({name: ["An integer."]}) from None
        if value < 0:
            raise exceptions.ValidationError({name: ["Zero or more."]})
        return value

    @staticmethod
    def _moment(params: Any, name: str) -> datetime | None:
        raw = params.get(name)
        if not raw:
            return None
        moment = parse_datetime(raw)
        if moment is None:
            day = parse_date(raw)
            if day is None:
                raise exceptions.ValidationError({name: ["A date (2026-11-01) or an ISO 8601 date-time."]})
            moment = datetime.combine(day, time.min)
        return moment if timezone.is_aware(moment) else moment.replace(tzinfo=UTC)


class MeView(APIView):
    """``GET /api/me/``: who you are and the tenants you belong to."""

    authentication_classes = AUTHENTICATION
    permission_classes = [HasTenantAccess]

    def get(self, request: Request) -> Response:
        memberships = TenantMembership.objects.filter(user_id=int(request.user.pk or 0)).select_related("tenant")
        return Response(
            {
                "username": request.user.get_username(),
                "staff": bool(request.user.is_staff),
                "memberships": [{"tenant": m.tenant.slug, "role": m.role} for m in memberships],
            }
        )

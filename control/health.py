"""``GET /health/providers``: each deployment's circuit breaker and health, as JSON (docs/resilience.md).

For a session that may use the admin (active staff, with its second factor when required) or any
management API token (``Authorization: Bearer ccm_...``).
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib import admin
from rest_framework import permissions
from rest_framework.authentication import SessionAuthentication
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from control.models import ManagementToken
from control.tokens import ManagementTokenAuthentication
from gateway.routing import health
from gateway.routing.table import load_route_table


class StaffOrManagementToken(permissions.BasePermission):
    message = "Provider health is for staff (admin session) or a management API token."

    def has_permission(self, request: Request, view: Any) -> bool:
        if isinstance(request.auth, ManagementToken):
            return True
        # A session: what the admin itself asks (active staff, second factor when required).
        return bool(admin.site.has_permission(request._request))


def provider_health() -> dict[str, Any]:
    deployments = async_to_sync(health.all_status)(load_route_table())
    return {
        "store": "redis" if settings.REDIS_URL else "process",
        "deployments": deployments,
        "open": sum(1 for d in deployments if d["state"] != "closed"),
    }


class ProviderHealthView(APIView):
    authentication_classes = [ManagementTokenAuthentication, SessionAuthentication]
    permission_classes = [StaffOrManagementToken]

    def get(self, request: Request) -> Response:
        return Response(provider_health())

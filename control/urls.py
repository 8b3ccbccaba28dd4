from __future__ import annotations

from django.urls import include, path
from rest_framework.routers import DefaultRouter

from control import api, requests_api

router = DefaultRouter()
router.register("tenants", api.TenantViewSet, basename="tenant")
router.register("keys", api.ApiKeyViewSet, basename="apikey")
router.register("budgets", api.BudgetViewSet, basename="budget")

urlpatterns = [
    path("usage/", api.UsageView.as_view(), name="usage"),
    path("me/", api.MeView.as_view(), name="me"),
    path("audit/", api.AuditView.as_view(), name="audit"),
    path("requests", requests_api.RequestListView.as_view(), name="requests"),
    path("requests/<str:request_id>", requests_api.RequestDetailView.as_view(), name="request"),
    path("", include(router.urls)),
]

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path

from gateway.api import api as v1_api


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("admin/", admin.site.urls),
    path("v1/", v1_api.urls),
    path("api/", include("control.urls")),
    path("healthz", healthz),
]

__all__ = ["include", "urlpatterns"]

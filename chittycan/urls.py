from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.urls import include, path, re_path, reverse_lazy
from django.views.generic import RedirectView

from chittycan.apps import discover_admin
from chittycan.probes import healthz, metrics_view, readyz
from control.health import ProviderHealthView
from gateway.api import api as v1_api
from gateway.api import unknown_url

discover_admin()  # done at start except in a serving gateway, which loads the admin here (chittycan/apps.py)

urlpatterns = [
    # `/` (and so the admin's "View site" link) leads to the control plane: the admin.
    path("", RedirectView.as_view(url=reverse_lazy("admin:index"), permanent=False), name="home"),
    path("admin/", admin.site.urls),
    path("v1/", v1_api.urls),
    re_path(r"^v1/(?P<rest>.*)$", unknown_url),  # after the API: any other /v1 path, in the envelope
    path("api/", include("control.urls")),
    path("dashboard/", include("dashboard.urls")),
    path("healthz", healthz),
    path("readyz", readyz),
    path("metrics", metrics_view),
    path("health/providers", ProviderHealthView.as_view(), name="provider-health"),
]

if settings.CHITTYCAN_OIDC_ENABLED:  # single sign-on (dashboard/oidc.py): /oidc/authenticate/, /oidc/callback/
    urlpatterns.append(path("oidc/", include("mozilla_django_oidc.urls")))

__all__ = ["include", "urlpatterns"]

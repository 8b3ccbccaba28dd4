"""The project's URLs plus mozilla-django-oidc's, as chittycan/urls.py adds them when single
sign-on is configured (settings are read at import; the SSO tests switch them on per test)."""

from __future__ import annotations

from django.urls import include, path

from chittycan.urls import urlpatterns as project_urls

urlpatterns = [*project_urls, path("oidc/", include("mozilla_django_oidc.urls"))]

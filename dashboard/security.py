"""The dashboard's sign-in throttle and response headers.

- ``LoginThrottle``: failed sign-ins counted in the cache (Redis in production, so every process
  shares the count) per user name and per client address; past ``CHITTYCAN_DASHBOARD_LOGIN_ATTEMPTS``
  failures of one user name (four times as many from one client address, which a whole office
  may share) in ``CHITTYCAN_DASHBOARD_LOGIN_WINDOW`` seconds, that name or address is refused (429)
  until the window has passed since the last failure.
- ``DashboardHeadersMiddleware``: a Content-Security-Policy without inline scripts or styles on
  every ``/dashboard/`` answer (our JS and CSS come from static files; data for the charts travels
  in ``<script type="application/json">``, which the browser never runs), no referrer to other
  sites, and no caching of pages that show secrets or spend. Frame denial (X-Frame-Options: DENY),
  HSTS behind TLS (``SECURE_HSTS_SECONDS``) and nosniff come from Django's middleware.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse

__all__ = ["CSP", "DashboardHeadersMiddleware", "LoginThrottle", "client_address"]

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
PREFIX = "/dashboard/"


def client_address(request: HttpRequest) -> str:
    return str(request.META.get("REMOTE_ADDR") or "unknown")


class LoginThrottle:
    def __init__(self, request: HttpRequest, username: str) -> None:
        name = hashlib.sha256(username.strip().lower().encode()).hexdigest()[:32]
        self.keys = [f"dashboard:login:u:{name}", f"dashboard:login:a:{client_address(request)}"]
        attempts = int(settings.CHITTYCAN_DASHBOARD_LOGIN_ATTEMPTS)
        self.limits = {self.keys[0]: attempts, self.keys[1]: attempts * 4}
        self.window = int(settings.CHITTYCAN_DASHBOARD_LOGIN_WINDOW)

    def blocked(self) -> bool:
        counts = cache.get_many(self.keys)
        return any(int(v) >= self.limits[k] for k, v in counts.items())

    def failed(self) -> None:
        for key in self.keys:
            count = int(cache.get(key) or 0) + 1
            cache.set(key, count, self.window)

    def succeeded(self) -> None:
        cache.delete(self.keys[0])


class DashboardHeadersMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if request.path.startswith(PREFIX):
            response.headers.setdefault("Content-Security-Policy", CSP)
            response.headers.setdefault("Referrer-Policy", "same-origin")
            response.headers.setdefault("Cache-Control", "no-store")
            response.headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        return response

"""WSGI entry point (admin and management API only; the /v1 data plane needs ASGI).

Outside dev mode it refuses to load without a real SECRET_KEY (core/preflight.py)."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chittycan.settings")
application = get_wsgi_application()

from core import preflight  # noqa: E402

preflight.require_secret_key()

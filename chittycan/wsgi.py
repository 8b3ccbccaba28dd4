"""WSGI entry point (admin and management API only; the /v1 data plane needs ASGI)."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chittycan.settings")
application = get_wsgi_application()

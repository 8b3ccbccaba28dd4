"""ASGI entry point: the hot /v1 routes go straight to their consumers (chittycan/routing.py),
/static/ is answered by WhiteNoise (chittycan/staticfiles.py), websockets (the dashboard's live
feed) to theirs, everything else to Django. Outside dev mode it refuses to load without a real
SECRET_KEY (core/preflight.py)."""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chittycan.settings")
# Optional imports that libraries make whenever a package happens to be installed, for features a
# gateway process never uses; marked absent, each library takes its documented fallback:
#: httpx's command-line tool (rich, pygments, click: ~6 MiB; installed with the CEL package's CLI);
#: redis-py's OpenTelemetry metrics through the OTel SDK's metrics package (~7 MiB; ChittyCan
#: exports Prometheus metrics and OTel traces, docs/observability.md).
LEFT_OUT = ("httpx._main", "opentelemetry.sdk.metrics")
for _module in LEFT_OUT:
    sys.modules.setdefault(_module, None)  # type: ignore[arg-type]

from gateway import tokens  # noqa: E402  (no Django import: safe before setup)

tokens.preload()  # before Django: see tokens.preload for why the order matters to peak memory

from django.core.asgi import get_asgi_application  # noqa: E402

django_asgi_app = get_asgi_application()

from core import preflight  # noqa: E402

preflight.require_secret_key()

from gateway import scheduler  # noqa: E402

if scheduler.enabled():
    # Its tasks are Celery's and may send others (an alert's delivery): the configured app first.
    # A gateway without it never loads Celery (chittycan/__init__.py).
    from chittycan import celery  # noqa: E402, F401

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from chittycan.routing import HotRoutes, websocket_routes  # noqa: E402
from chittycan.staticfiles import StaticFilesApp  # noqa: E402

application = HotRoutes(
    StaticFilesApp(
        ProtocolTypeRouter(
            {
                "http": django_asgi_app,
                # The dashboard's live feed: the session says who the user is; the Origin must be ours.
                "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_routes))),
            }
        )
    )
)

# Serving: the JSON log lines (chittycan/logging.py) carry no caller, thread or process fields, so
# no record looks them up (the logging HOWTO's "Optimization": a frame walk and three lookups per
# record, on a line per request).
logging._srcfile = None
logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False

from core.runtime import freeze_heap  # noqa: E402

freeze_heap()  # the app is built: keep the collector off its long-lived objects (gc.freeze)

__all__ = ["application"]

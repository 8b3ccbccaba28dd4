"""ChittyCan: a self-hosted, multi-tenant LLM gateway.

The Celery app (``chittycan/celery.py``) is configured here, before any task can be sent, in
every process but a serving gateway's (``can serve`` sets ``CHITTYCAN_SERVING``): workers, beat,
``manage.py`` commands and the tests. A gateway sends no task on its request path, so it loads
Celery (about 20 MiB resident) only when its embedded scheduler runs tasks (``chittycan/asgi.py``).
"""

import os

if not os.environ.get("CHITTYCAN_SERVING"):
    from chittycan.celery import app as celery_app

    __all__ = ["celery_app"]

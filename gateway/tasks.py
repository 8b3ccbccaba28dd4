"""Celery tasks of the gateway: active health probes of the deployments (``gateway.routing.health``).

Beat's ``provider-probes`` entry (``CELERY_BEAT_SCHEDULE``) runs ``probe_providers`` every
``CHITTYCAN_PROBE_TICK`` seconds; each run probes the deployments whose provider's interval has
passed. Without Celery beat the embedded scheduler (``gateway.scheduler``) runs it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from celery import shared_task

from gateway.routing import health
from gateway.routing.table import load_route_table


@shared_task(name="gateway.tasks.probe_providers")
def probe_providers() -> dict[str, Any]:
    results = asyncio.run(health.probe_in_own_loop(load_route_table()))
    return {"probed": len(results), "failed": sum(1 for r in results if r.get("probe_result") == "failed")}

"""Celery tasks of the gateway app: thin wrappers that call a service.

``CELERY_BEAT_SCHEDULE`` (settings) runs them; without Celery beat the embedded scheduler
(``gateway.scheduler``) does: the active health probes of the deployments
(``gateway.routing.health``; ``provider-probes`` every ``CHITTYCAN_PROBE_TICK`` seconds, each run
probing the deployments whose provider's interval has passed) and the experiments' auto-promotion.
"""

from __future__ import annotations

import asyncio
from typing import Any

from celery import shared_task
from django.db import OperationalError

from gateway import experiments
from gateway.routing import health
from gateway.routing.table import load_route_table


@shared_task(name="gateway.tasks.probe_providers")
def probe_providers() -> dict[str, Any]:
    results = asyncio.run(health.probe_in_own_loop(load_route_table()))
    return {"probed": len(results), "failed": sum(1 for r in results if r.get("probe_result") == "failed")}


@shared_task(
    name="gateway.tasks.auto_promote_experiments",
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    max_retries=5,
)
def auto_promote_experiments() -> list[list[str]]:
    """Promote the winners of experiments with auto-promotion (docs/routing.md, Experiments)."""
    return [[slug, arm] for slug, arm in experiments.experiments_auto_promote()]

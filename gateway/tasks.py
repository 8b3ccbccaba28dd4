"""Celery tasks of the gateway app: thin wrappers that call a service.

``CELERY_BEAT_SCHEDULE`` (settings) runs them; without Celery beat the embedded scheduler
(``gateway.scheduler``) does.
"""

from __future__ import annotations

from celery import shared_task
from django.db import OperationalError

from gateway import experiments


@shared_task(
    name="gateway.tasks.auto_promote_experiments",
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    max_retries=5,
)
def auto_promote_experiments() -> list[list[str]]:
    """Promote the winners of experiments with auto-promotion (docs/routing.md, Experiments)."""
    return [[slug, arm] for slug, arm in experiments.experiments_auto_promote()]

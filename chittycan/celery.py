"""The Celery app. Without REDIS_URL, tasks run eagerly in-process (embedded mode).

A worker or beat refuses to start outside dev mode without a real SECRET_KEY, as the gateway
does (core/preflight.py): alert webhooks are signed and provider credentials decrypted with keys
derived from it."""

from __future__ import annotations

import os
from contextvars import Token
from typing import Any

from celery import Celery
from celery.signals import beat_init, task_postrun, task_prerun, worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chittycan.settings")

from core import origin, preflight  # noqa: E402 (after the settings module is named)

app = Celery("chittycan")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_init.connect
@beat_init.connect
def _refuse_an_insecure_secret_key(**_: object) -> None:
    # Celery logs and swallows a signal handler's exception; SystemExit stops the process.
    problem = preflight.secret_key_problem()
    if problem:
        raise SystemExit(f"ChittyCan refuses to start: {problem}")


# A task's control-plane writes are audited with origin `task` and the task's name.
_origins: dict[str, Token[origin.Origin | None]] = {}


@task_prerun.connect
def _task_origin(task_id: str = "", task: Any = None, **_: object) -> None:
    _origins[task_id] = origin.enter(origin.for_command("task", str(getattr(task, "name", "") or "")))


@task_postrun.connect
def _task_origin_done(task_id: str = "", **_: object) -> None:
    token = _origins.pop(task_id, None)
    if token is not None:
        origin.leave(token)

"""The embedded scheduler: Celery beat's schedule, run inside the gateway process.

The embedded default (``make run``, ``can serve`` without a broker: tasks run eagerly) and dev mode
have no Celery beat, so nothing would roll usage up into the hourly and daily pages, prune raw rows
past retention, check budget alerts or reconcile counters. With ``CHITTYCAN_EMBEDDED_SCHEDULER``
(on by default when tasks run eagerly or ``CHITTYCAN_MODE=dev``; turn it off where Celery beat runs)
each gateway process runs every entry of ``CELERY_BEAT_SCHEDULE`` on its interval: the same task
functions, looked up by task name, run in a worker thread so the event loop never blocks.

It is one of the process's background tasks (``core.runtime.background``): it starts with them on
the first request and stops with them. Every scheduled task is idempotent (rollups recompute,
alerts are unique per threshold and period), so two gateway processes running it are safe.
A task that fails is logged and tried again at its next interval.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import celery
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.utils.module_loading import autodiscover_modules

from core import origin
from core.runtime import background

log = logging.getLogger(__name__)

__all__ = ["Entry", "enabled", "run_due", "schedule"]

#: Seconds between looks at the schedule (the shortest interval a scheduled task can have).
TICK = 1.0


class Entry:
    """One scheduled task: its beat name, task name, interval in seconds and when it is due next."""

    __slots__ = ("due", "interval", "name", "task")

    def __init__(self, name: str, task: str, interval: float, due: float) -> None:
        self.name = name
        self.task = task
        self.interval = interval
        self.due = due


def enabled() -> bool:
    """``CHITTYCAN_EMBEDDED_SCHEDULER`` (a setting, else the environment variable: 1/true/yes/on
    or 0/false/no/off); by default on when Celery tasks run eagerly (no broker) or in dev mode."""
    value = getattr(settings, "CHITTYCAN_EMBEDDED_SCHEDULER", None)
    if value is None:
        value = os.environ.get("CHITTYCAN_EMBEDDED_SCHEDULER", "").strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        if value:
            log.warning("CHITTYCAN_EMBEDDED_SCHEDULER=%r is not a boolean; using the default", value)
        return bool(getattr(settings, "CELERY_TASK_ALWAYS_EAGER", False)) or settings.CHITTYCAN_MODE == "dev"
    return bool(value)


def _seconds(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    return None  # crontab and solar schedules need Celery beat


def schedule(now: float | None = None) -> list[Entry]:
    """``CELERY_BEAT_SCHEDULE`` as entries, each first due one interval from ``now`` (a task
    that ran at every process start would make restarts expensive)."""
    now = time.monotonic() if now is None else now
    entries = []
    for name, spec in sorted(getattr(settings, "CELERY_BEAT_SCHEDULE", {}).items()):
        interval = _seconds(spec.get("schedule"))
        if interval is None or interval <= 0:
            log.warning("embedded scheduler: %s has no fixed interval; it needs Celery beat", name)
            continue
        entries.append(Entry(name, str(spec["task"]), interval, now + interval))
    return entries


def _task(name: str) -> Callable[[], Any] | None:
    autodiscover_modules("tasks")  # every app's tasks module, as Celery's autodiscovery does
    found: Callable[[], Any] | None = celery.current_app.tasks.get(name)
    return found


def _run(entry: Entry) -> None:
    close_old_connections()
    try:
        task = _task(entry.task)
        if task is None:
            log.warning("embedded scheduler: no task named %s (%s)", entry.task, entry.name)
            return
        started = time.monotonic()
        with origin.using(origin.for_command("task", entry.task)):  # the audit log's origin
            result = task()
        log.debug(
            "embedded scheduler ran %s",
            entry.name,
            extra={"task": entry.task, "seconds": round(time.monotonic() - started, 3), "result": str(result)[:200]},
        )
    except Exception:
        log.exception("embedded scheduler: %s failed; it runs again in %.0f s", entry.name, entry.interval)
    finally:
        close_old_connections()


async def run_due(entries: list[Entry], now: float | None = None) -> list[str]:
    """Run every entry that is due (one after another, off the event loop); returns their names."""
    now = time.monotonic() if now is None else now
    ran = []
    for entry in entries:
        if entry.due <= now:
            await sync_to_async(_run, thread_sensitive=False)(entry)
            entry.due = time.monotonic() + entry.interval
            ran.append(entry.name)
    return ran


@background("embedded-scheduler")
async def _scheduler_loop() -> None:
    if not enabled():
        return
    entries = schedule()
    log.info("embedded scheduler: %s", ", ".join(f"{e.name} every {e.interval:g} s" for e in entries) or "nothing")
    while True:
        await asyncio.sleep(TICK)
        await run_due(entries)

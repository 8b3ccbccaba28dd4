"""Configuration changes reach every cache in every gateway process.

A cache registers a function that drops it (``@subscribe``); a service that changed
configuration calls ``announce()`` after commit. Each gateway process listens on a Redis channel
and runs ``drop_local()``; without Redis (embedded mode) the announcement is local and other
processes catch up within the cache TTLs. This module sits at the bottom of the import graph:
the caches import it, never the other way round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis
from django.conf import settings
from django.db import transaction

log = logging.getLogger(__name__)

Dropper = Callable[[], None]
_subscribers: list[Dropper] = []


def subscribe(drop: Dropper) -> Dropper:
    """Register a function that drops a cache (usable as a decorator)."""
    if drop not in _subscribers:
        _subscribers.append(drop)
    return drop


def channel() -> str:
    return f"{settings.REDIS_PREFIX}:invalidate"


def drop_local() -> None:
    """Drop every subscribed cache of this process."""
    for drop in list(_subscribers):
        drop()


def announce() -> None:
    """Tell every process (this one included) that configuration changed."""
    drop_local()
    if not settings.REDIS_URL:
        return
    try:
        conn = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2)
        conn.publish(channel(), b"config")
        conn.close()
    except redis.RedisError:
        log.warning("could not announce a config change; other processes refresh within the cache TTL")


def announce_on_commit(using: str | None = None) -> None:
    """Announce once the current transaction commits; at once outside a transaction.

    However many writes one transaction makes (``can apply`` makes dozens), the processes are
    told once. A write inside a savepoint that is rolled back takes its registration with it, so a
    later write registers again."""
    connection = transaction.get_connection(using)
    if connection.in_atomic_block and any(entry[1] is announce for entry in connection.run_on_commit):
        return
    transaction.on_commit(announce, using=using)

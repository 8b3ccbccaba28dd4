"""Config changes reach every gateway process at once.

Service functions call ``announce()`` after commit; each gateway process listens on a Redis
channel and drops its key cache and route table. Without Redis (embedded mode) the announcement
is local, and other processes catch up within the cache TTLs.
"""

from __future__ import annotations

import logging

from django.conf import settings

log = logging.getLogger(__name__)


def channel() -> str:
    return f"{settings.REDIS_PREFIX}:invalidate"


def drop_local() -> None:
    from gateway import admission, auth, routing

    auth.invalidate()
    routing.invalidate()
    admission.forget_passthrough_key()


def announce() -> None:
    """Tell every process (this one included) that configuration changed."""
    drop_local()
    if not settings.REDIS_URL:
        return
    import redis

    try:
        conn = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2)
        conn.publish(channel(), b"config")
        conn.close()
    except redis.RedisError:
        log.warning("could not announce a config change; other processes refresh within the cache TTL")

"""Configuration changes reach every cache in every gateway process.

A cache registers a function that drops it (``@subscribe``); a service that changed
configuration calls ``announce()`` after commit, which drops this process's caches at once and
tells the others:

- with Redis (``REDIS_URL``), on a pub/sub channel every gateway process listens on
  (``core.runtime``), so they drop theirs within a second;
- in embedded mode (no Redis: ``make run``, one gateway process on one machine), by replacing a
  stamp file in ``VAR_DIR`` that the gateway checks several times a second, so a ``can keys revoke``
  run in another terminal takes effect as fast.

Besides "configuration changed" (every cache drops everything), the channel carries *topic*
messages, ``<topic>\t<payload>``, delivered only to the handlers of that topic
(``subscribe_topic``): a circuit breaker's state change (``gateway.routing.breaker``) reaches
every process in milliseconds and updates one cached entry, without dropping any other cache.

This module sits at the bottom of the import graph: the caches import it, never the other way round.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import redis
from django.conf import settings
from django.db import transaction

log = logging.getLogger(__name__)

Dropper = Callable[[], None]
_subscribers: list[Dropper] = []
#: A topic message's handler: gets the payload (the bytes after the topic and its tab).
TopicHandler = Callable[[bytes], None]
_topics: dict[bytes, list[TopicHandler]] = {}
TOPIC_SEPARATOR = b"\t"

#: How often an embedded-mode gateway looks at the stamp file (seconds).
STAMP_POLL_INTERVAL = 0.2
#: The longest a change takes to reach every gateway process (seconds), as the CLI states it.
PROPAGATION_SECONDS = 1


def subscribe(drop: Dropper) -> Dropper:
    """Register a function that drops a cache (usable as a decorator)."""
    if drop not in _subscribers:
        _subscribers.append(drop)
    return drop


def subscribe_topic(topic: str, handler: TopicHandler) -> TopicHandler:
    """Register a handler of the channel's ``topic`` messages (which then drop no cache)."""
    handlers = _topics.setdefault(topic.encode(), [])
    if handler not in handlers:
        handlers.append(handler)
    return handler


def topic_message(topic: str, payload: bytes) -> bytes:
    """The channel message that delivers ``payload`` to the handlers of ``topic``."""
    return topic.encode() + TOPIC_SEPARATOR + payload


def deliver(data: bytes | str) -> None:
    """Act on one message of the channel: a topic message goes to its handlers; anything else
    (``config``, or a topic no one here handles) drops every subscribed cache, as before topics."""
    raw = data.encode() if isinstance(data, str) else data
    topic, sep, payload = raw.partition(TOPIC_SEPARATOR)
    handlers = _topics.get(topic) if sep else None
    if not handlers:
        drop_local()
        return
    for handler in list(handlers):
        try:
            handler(payload)
        except Exception:  # one bad message must not stop the listener
            log.exception("invalidation handler of topic %s failed", topic.decode(errors="replace"))


def channel() -> str:
    return f"{settings.REDIS_PREFIX}:invalidate"


def stamp_path() -> Path:
    """The embedded mode's announcement: a file replaced on every change."""
    return Path(settings.VAR_DIR) / "config-changed.stamp"


def stamp() -> tuple[int, int] | None:
    """The stamp file's identity (inode, modification time), or None while there is none."""
    try:
        st = os.stat(stamp_path())
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def _replace_stamp() -> None:
    path = stamp_path()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(os.urandom(8))
        os.replace(tmp, path)  # a new inode: seen even within the file system's timestamp granularity
    except OSError as exc:
        log.warning(
            "could not announce a config change through %s (%s); the gateway refreshes within the cache TTL", path, exc
        )


def drop_local() -> None:
    """Drop every subscribed cache of this process."""
    for drop in list(_subscribers):
        drop()


def announce() -> None:
    """Tell every process (this one included) that configuration changed."""
    drop_local()
    if not settings.REDIS_URL:
        _replace_stamp()
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


def takes_effect() -> str:
    """When a change announced from this process is seen by the gateways, for the CLI to say."""
    if settings.REDIS_URL:
        return f"at once in this process and within {PROPAGATION_SECONDS} s in every gateway process sharing this Redis"
    return (
        f"at once in this process and within {PROPAGATION_SECONDS} s in the embedded gateway using {settings.VAR_DIR}"
    )

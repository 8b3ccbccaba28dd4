"""The live request feed: each finished request, as a small summary, to the Channels group of its
tenant and of every ancestor (``feed_group``), so a dashboard watching a tenant sees its whole
subtree and nothing else.

The record stage calls ``publish`` once per ledger row, after the hand-off; sending runs as a task
of its own, so the request never waits for it and a channel layer that fails only loses the feed
message (the row itself is in the ledger). The layer is Channels' in-process one in the embedded
default and the Redis one with ``REDIS_URL`` (``CHANNEL_LAYERS`` in settings).

Only watched tenants cost anything: a feed socket marks its tenant watched (``watch``: a Redis key
with a TTL, renewed while the socket is open; in-process without Redis), and each process asks
whether a tenant is watched at most once a second (``CHECK_EVERY``). A tenant nobody watches
costs one ``MGET`` a second per process, not a group send per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings

from core.money import format_usd
from core.runtime import key_prefix, redis_client

log = logging.getLogger(__name__)

#: The message type a feed consumer handles (``feed_request`` in dashboard.consumers).
MESSAGE_TYPE = "feed.request"
_pending: set[asyncio.Task[None]] = set()

#: A watch lasts this long unless renewed (the consumer renews it every WATCH_RENEW seconds).
WATCH_TTL = 90
WATCH_RENEW = 30.0
#: How often (seconds) a process asks again whether a tenant is watched.
CHECK_EVERY = 1.0
_local_watch: dict[int, float] = {}  # without Redis: tenant id -> watched until (monotonic)
_checked: dict[int, tuple[float, bool]] = {}  # tenant id -> (when asked, watched)


def feed_group(tenant_id: int) -> str:
    return f"feed.t{tenant_id}"


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """What the feed shows of a ledger row (no prompt, no end user)."""
    created = row.get("created_at")
    when = datetime.fromtimestamp(created, UTC).isoformat() if isinstance(created, int | float) else str(created)
    return {
        "request_id": row.get("request_id", ""),
        "created_at": when,
        "tenant_id": row.get("tenant_id"),
        "key_id": row.get("api_key_id"),
        "route": row.get("endpoint", ""),
        "model": row.get("requested_model", ""),
        "served_model": row.get("served_model", ""),
        "status": row.get("status", ""),
        "http_status": row.get("http_status"),
        "cache": "hit" if row.get("cache_hit") else "miss",
        "latency_ms": row.get("latency_ms"),
        "input_tokens": row.get("prompt_tokens", 0),
        "output_tokens": row.get("completion_tokens", 0),
        "cost_usd": format_usd(int(row.get("cost_micro") or 0)),
    }


def _watch_key(tenant_id: int) -> str:
    return f"{key_prefix()}:feed:watch:{tenant_id}"


async def watch(tenant_id: int) -> None:
    """A feed socket on ``tenant_id`` is open: its requests are published (for WATCH_TTL seconds;
    call again to renew). This process sees it at once, the others within CHECK_EVERY."""
    _local_watch[tenant_id] = time.monotonic() + WATCH_TTL
    _checked.pop(tenant_id, None)
    if settings.REDIS_URL:
        await redis_client().set(_watch_key(tenant_id), 1, ex=WATCH_TTL)


async def watched(tenant_ids: list[int]) -> list[int]:
    """Those of ``tenant_ids`` a feed socket watches (answers at most CHECK_EVERY seconds old)."""
    now = time.monotonic()
    stale = [t for t in tenant_ids if now - _checked.get(t, (float("-inf"), False))[0] >= CHECK_EVERY]
    if stale:
        if settings.REDIS_URL:
            values = await redis_client().mget([_watch_key(t) for t in stale])
            flags = [v is not None for v in values]
        else:
            flags = [_local_watch.get(t, 0.0) > now for t in stale]
        for tenant_id, flag in zip(stale, flags, strict=True):
            _checked[tenant_id] = (now, flag)
    return [t for t in tenant_ids if _checked[t][1]]


async def _send(tenant_ids: list[int], row: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        targets = await watched(tenant_ids)
        if not targets:
            return
        message = {"type": MESSAGE_TYPE, "row": summary(row)}
        for tenant_id in targets:
            await layer.group_send(feed_group(tenant_id), message)
    except Exception:  # the feed is best effort: the ledger row is already handed off
        log.warning("live feed: could not publish %s", row.get("request_id"), exc_info=True)


def publish(row: dict[str, Any], tenant_ids: Iterable[int]) -> None:
    """Send ``row``'s summary to the feed groups of ``tenant_ids`` (the tenant and its ancestors)
    that someone watches, without waiting; call from the event loop."""
    ids = list(tenant_ids)
    if not ids:
        return
    task = asyncio.get_running_loop().create_task(_send(ids, row))
    _pending.add(task)
    task.add_done_callback(_pending.discard)

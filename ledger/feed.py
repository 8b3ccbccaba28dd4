"""The live request feed: each finished request, as a small summary, to the Channels group of its
tenant and of every ancestor (``feed_group``), so a dashboard watching a tenant sees its whole
subtree and nothing else.

The record stage calls ``publish`` once per ledger row, after the hand-off; sending runs as a task
of its own, so the request never waits for it and a channel layer that fails only loses the feed
message (the row itself is in the ledger). The layer is Channels' in-process one in the embedded
default and the Redis one with ``REDIS_URL`` (``CHANNEL_LAYERS`` in settings).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from channels.layers import get_channel_layer

from core.money import format_usd

log = logging.getLogger(__name__)

#: The message type a feed consumer handles (``feed_request`` in dashboard.consumers).
MESSAGE_TYPE = "feed.request"
_pending: set[asyncio.Task[None]] = set()


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


async def _send(groups: list[str], message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        for group in groups:
            await layer.group_send(group, message)
    except Exception:  # the feed is best effort: the ledger row is already handed off
        log.warning("live feed: could not publish %s", message.get("row", {}).get("request_id"), exc_info=True)


def publish(row: dict[str, Any], tenant_ids: Iterable[int]) -> None:
    """Send ``row``'s summary to the feed groups of ``tenant_ids`` (the tenant and its ancestors)
    without waiting; call from the event loop."""
    groups = [feed_group(t) for t in tenant_ids]
    if not groups:
        return
    task = asyncio.get_running_loop().create_task(_send(groups, {"type": MESSAGE_TYPE, "row": summary(row)}))
    _pending.add(task)
    task.add_done_callback(_pending.discard)

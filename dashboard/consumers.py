"""The live feed's websocket: ``/ws/dashboard/feed/<tenant id>/``.

The browser's session (Channels' ``AuthMiddlewareStack``) says who is asking; the socket is
accepted only for a user who sees the tenant (``dashboard.access``) and, when a second factor is
required of that user, whose session passed it. It then joins that tenant's feed group
(``ledger.feed``), which carries the tenant's requests and its subtree's, and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib.auth import get_user_model
from django_otp import DEVICE_ID_SESSION_KEY
from django_otp.models import Device

from dashboard.access import Access, otp_required_for
from ledger import feed

log = logging.getLogger(__name__)

#: Close codes (4000-4999 are the application's): not signed in / no access.
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
#: How often (seconds) an open socket checks the user's access again and renews its watch.
RECHECK = feed.WATCH_RENEW


def same_origin(scope: dict[str, Any]) -> bool:
    """The socket was opened by a page of ours: its Origin is this host (or a trusted origin).

    Browsers always send Origin on a websocket; without the check any site could open the feed
    with the user's cookie (cross-site websocket hijacking). A client without Origin is not a
    browser and cannot carry someone else's cookie."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    origin = headers.get("origin")
    if origin is None:
        return True
    if origin in settings.CSRF_TRUSTED_ORIGINS:
        return True
    return bool(urlsplit(origin).netloc.lower() == headers.get("host", "").lower())


def _allowed(user: Any, session: Any, tenant_id: int) -> int | None:
    """None if ``user`` may watch ``tenant_id``; else the close code."""
    if user is None or not user.is_authenticated:
        return CLOSE_UNAUTHENTICATED
    user = get_user_model().objects.filter(pk=user.pk, is_active=True).first()  # as it is now, not at connect
    if user is None:
        return CLOSE_UNAUTHENTICATED
    if otp_required_for(user):
        persistent = session.get(DEVICE_ID_SESSION_KEY) if session is not None else None
        device = Device.from_persistent_id(persistent) if persistent else None
        if device is None or device.user_id != user.pk:
            return CLOSE_UNAUTHENTICATED
    if not Access(user).can_see(tenant_id):
        return CLOSE_FORBIDDEN
    return None


class FeedConsumer(AsyncJsonWebsocketConsumer):
    group: str | None = None
    renewer: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        tenant_id = int(self.scope["url_route"]["kwargs"]["tenant_id"])
        if not same_origin(self.scope):
            await self.close()  # the handshake is refused (HTTP 403): no page of ours asked
            return
        refused = await database_sync_to_async(_allowed)(self.scope.get("user"), self.scope.get("session"), tenant_id)
        if refused is not None:
            # Accepted, then closed with a code the page understands (sign in again / no access),
            # so it stops reconnecting; no message was sent.
            await self.accept()
            await self.close(code=refused)
            return
        self.group = feed.feed_group(tenant_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self._watch(tenant_id)
        await self.accept()
        self.renewer = asyncio.get_running_loop().create_task(self._keep_watching(tenant_id))

    @staticmethod
    async def _watch(tenant_id: int) -> None:
        try:
            await feed.watch(tenant_id)
        except Exception:  # Redis unreachable: the next renewal tries again
            log.warning("live feed: could not mark tenant %s watched", tenant_id, exc_info=True)

    async def _keep_watching(self, tenant_id: int) -> None:
        """While this socket is open: check the user's access again (a membership taken away, or
        the user deactivated, closes the socket within ``RECHECK`` seconds) and keep the tenant
        marked watched (its requests published)."""
        while True:
            await asyncio.sleep(RECHECK)
            refused = await database_sync_to_async(_allowed)(
                self.scope.get("user"), self.scope.get("session"), tenant_id
            )
            if refused is not None:
                if self.group is not None:
                    await self.channel_layer.group_discard(self.group, self.channel_name)
                    self.group = None
                await self.close(code=refused)
                return
            await self._watch(tenant_id)

    async def disconnect(self, code: int) -> None:
        if self.renewer is not None:
            self.renewer.cancel()
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """The feed is one-way; anything the browser sends is ignored."""

    async def feed_request(self, event: dict[str, Any]) -> None:
        await self.send_json(event["row"])

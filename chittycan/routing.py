"""The ASGI routes: the hot ``/v1`` consumers and the probes (``/healthz``, ``/readyz``,
``/metrics``), found by exact path before anything else, and the websockets (the tenant
dashboard's live feed, behind the session middleware in chittycan/asgi.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from django.urls import path

from chittycan import probes
from dashboard.consumers import FeedConsumer
from gateway import consumers

#: Path (without the leading slash) -> the consumer serving it. Matched exactly, as Django's
#: ``path()`` would (a trailing slash or another method goes on to Django, whose 404 is JSON).
HOT: dict[str, type[consumers.GatewayConsumer]] = {
    "v1/chat/completions": consumers.ChatCompletionsConsumer,
    "v1/completions": consumers.CompletionsConsumer,
    "v1/embeddings": consumers.EmbeddingsConsumer,
    "v1/messages": consumers.MessagesConsumer,
    "v1/messages/count_tokens": consumers.CountTokensConsumer,
    "v1/responses": consumers.ResponsesConsumer,
    "v1/images/generations": consumers.ImagesConsumer,
    "v1/images/edits": consumers.ImageEditsConsumer,
    "v1/audio/transcriptions": consumers.TranscriptionsConsumer,
    "v1/audio/speech": consumers.SpeechConsumer,
    "v1/moderations": consumers.ModerationsConsumer,
    "v1/cache/invalidate": consumers.CacheInvalidateConsumer,
    "v1/feedback": consumers.FeedbackConsumer,
}

#: The operational probes, answered without Django's URLconf for ``GET`` and ``HEAD`` (any other
#: method goes on to Django's views of the same paths). chittycan/probes.py says why.
PROBES: dict[str, Callable[[], Any]] = {
    "healthz": probes.HealthzProbe,
    "readyz": probes.ReadyzProbe,
    "metrics": probes.MetricsProbe,
}
_PROBE_METHODS = frozenset({"GET", "HEAD"})


class HotRoutes:
    """An HTTP request for a ``HOT`` path goes straight to a new instance of its consumer (one dict
    lookup: no URL resolver, router scope copies or wrapper coroutines on the hot path); anything
    else to ``app``. ``root_path`` is honoured as Channels' ``URLRouter`` does."""

    def __init__(
        self,
        app: Any,
        routes: Mapping[str, Callable[[], Any]] | None = None,
        probes: Mapping[str, Callable[[], Any]] | None = None,
    ) -> None:
        self.app = app
        self.routes: Mapping[str, Callable[[], Any]] = HOT if routes is None else routes
        self.probes: Mapping[str, Callable[[], Any]] = PROBES if probes is None else probes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            root_path: str = scope.get("root_path", "")
            if root_path and path.startswith(root_path):
                path = path[len(root_path) :]
            name = path.lstrip("/")
            consumer = self.routes.get(name)
            if consumer is None and scope["method"] in _PROBE_METHODS:
                consumer = self.probes.get(name)
            if consumer is not None:
                await consumer()(scope, receive, send)
                return
        await self.app(scope, receive, send)


websocket_routes: list[Any] = [
    path("ws/dashboard/feed/<int:tenant_id>/", FeedConsumer.as_asgi()),
]

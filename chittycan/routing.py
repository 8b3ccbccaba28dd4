"""Channels routes: the hot ``/v1`` consumers, reached before Django's URL resolver, and the
websockets (the tenant dashboard's live feed, behind the session middleware in chittycan/asgi.py).
"""

from __future__ import annotations

from typing import Any

from django.urls import path

from dashboard.consumers import FeedConsumer
from gateway import consumers

hot_routes: list[Any] = [
    path("v1/chat/completions", consumers.ChatCompletionsConsumer.as_asgi()),
    path("v1/completions", consumers.CompletionsConsumer.as_asgi()),
    path("v1/embeddings", consumers.EmbeddingsConsumer.as_asgi()),
    path("v1/messages", consumers.MessagesConsumer.as_asgi()),
    path("v1/messages/count_tokens", consumers.CountTokensConsumer.as_asgi()),
    path("v1/responses", consumers.ResponsesConsumer.as_asgi()),
    path("v1/images/generations", consumers.ImagesConsumer.as_asgi()),
    path("v1/images/edits", consumers.ImageEditsConsumer.as_asgi()),
    path("v1/audio/transcriptions", consumers.TranscriptionsConsumer.as_asgi()),
    path("v1/audio/speech", consumers.SpeechConsumer.as_asgi()),
    path("v1/moderations", consumers.ModerationsConsumer.as_asgi()),
    path("v1/cache/invalidate", consumers.CacheInvalidateConsumer.as_asgi()),
    path("v1/feedback", consumers.FeedbackConsumer.as_asgi()),
]

websocket_routes: list[Any] = [
    path("ws/dashboard/feed/<int:tenant_id>/", FeedConsumer.as_asgi()),
]

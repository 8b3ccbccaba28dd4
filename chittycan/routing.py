"""Channels routes: the hot /v1 consumers and the dashboard's websockets."""

from __future__ import annotations

from typing import Any

from django.urls import path


def hot_routes() -> list[Any]:
    from gateway import consumers

    return [
        path("v1/chat/completions", consumers.ChatCompletionsConsumer.as_asgi()),
        path("v1/completions", consumers.CompletionsConsumer.as_asgi()),
        path("v1/embeddings", consumers.EmbeddingsConsumer.as_asgi()),
        path("v1/messages", consumers.MessagesConsumer.as_asgi()),
        path("v1/messages/count_tokens", consumers.CountTokensConsumer.as_asgi()),
    ]


def websocket_routes() -> list[Any]:
    return []

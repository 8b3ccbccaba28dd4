"""Anthropic's Messages API.

Two faces:

- ``chat`` / ``chat_stream``: an OpenAI-format request translated to the Messages API and the
  answer translated back (``gateway.translate``), for OpenAI clients of Claude models.
- ``messages`` / ``messages_stream``: native passthrough for ``/v1/messages``; the body goes up
  untouched except ``model`` and 2.x-style ``system`` turns hoisted to the top-level ``system``
  (prompt-caching fields, thinking, betas preserved), and the events come back as they are.

``base_url`` is the API root (``https://api.anthropic.com``; a trailing ``/v1`` is accepted). The
key is sent as ``x-api-key``; the client's ``anthropic-version`` and ``anthropic-beta`` headers are
forwarded on the native route.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

from gateway.errors import UpstreamError
from gateway.providers.base import Provider, UpstreamCall, post_json, streamed_post
from gateway.sse import parse_events
from gateway.translate import requests, responses
from gateway.translate.streams import ChunksFromEvents, error_from_event

Json = dict[str, Any]

API_VERSION = "2023-06-01"
_FORWARDED = ("anthropic-version", "anthropic-beta", "traceparent", "tracestate")  # + W3C trace context


class AnthropicProvider(Provider):
    kind = "anthropic"

    @staticmethod
    def _url(call: UpstreamCall, path: str) -> str:
        root = call.provider.base_url.rstrip("/")
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        return f"{root}/v1{path}"

    @staticmethod
    def _headers(call: UpstreamCall) -> dict[str, str]:
        headers = {"content-type": "application/json", "anthropic-version": API_VERSION}
        headers.update(call.provider.extra_headers)
        headers.update({k: v for k, v in call.headers.items() if k in _FORWARDED})
        if call.key:
            headers["x-api-key"] = call.key
        return headers

    async def _post(self, call: UpstreamCall, path: str, body: Json) -> Json:
        data = await post_json(self._url(call, path), body, self._headers(call), call.timeout)
        if data.get("type") == "error":
            raise error_from_event(data)
        return data

    async def _events(self, call: UpstreamCall, body: Json) -> AsyncGenerator[Json, None]:
        """The upstream's stream events as dicts, each with its ``type``."""
        url = self._url(call, "/messages")
        async with streamed_post(url, {**body, "stream": True}, self._headers(call), call.timeout) as response:
            async for event in parse_events(response.aiter_bytes()):
                try:
                    obj = orjson.loads(event.data)
                except orjson.JSONDecodeError as exc:
                    raise UpstreamError("upstream sent a malformed stream event", retryable=False) from exc
                if isinstance(obj, dict):
                    obj.setdefault("type", event.event)
                    yield obj

    # --- OpenAI clients --------------------------------------------------------------------------

    @staticmethod
    def _translated(call: UpstreamCall) -> Json:
        body = requests.chat_to_messages(call.body, default_max_tokens=call.max_output_tokens)
        body["model"] = call.upstream_model
        return body

    async def chat(self, call: UpstreamCall) -> Json:
        message = await self._post(call, "/messages", self._translated(call))
        return responses.message_to_chat_completion(message)

    async def chat_stream(self, call: UpstreamCall) -> AsyncIterator[Json]:
        machine = ChunksFromEvents(call.upstream_model)
        events = self._events(call, self._translated(call))
        try:
            async for event in events:
                for chunk in machine.feed(event):
                    yield chunk
        finally:
            await events.aclose()
        if not machine.finished:
            raise UpstreamError("the upstream stream ended before message_stop", retryable=False)

    # --- Anthropic clients (native) --------------------------------------------------------------

    async def messages(self, call: UpstreamCall) -> Json:
        return await self._post(call, "/messages", requests.hoist_system_messages(call.body))

    async def messages_stream(self, call: UpstreamCall) -> AsyncIterator[Json]:
        events = self._events(call, requests.hoist_system_messages(call.body))
        started = False
        try:
            async for event in events:
                if event.get("type") == "error" and not started:
                    raise error_from_event(event)  # nothing sent yet: dispatch may retry or fail over
                started = True
                yield event
        finally:
            await events.aclose()

    async def count_tokens(self, call: UpstreamCall) -> Json:
        body = {k: v for k, v in requests.hoist_system_messages(call.body).items() if k not in ("max_tokens", "stream")}
        return await self._post(call, "/messages/count_tokens", body)

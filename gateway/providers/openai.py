"""Any OpenAI-compatible server: OpenAI, Groq, OpenRouter, Together, vLLM, LM Studio, Ollama's /v1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from gateway.errors import UpstreamError
from gateway.providers.base import Provider, UpstreamCall, post_json, post_multipart, streamed_post
from gateway.sse import parse_events


def _in_stream_error(obj: dict[str, Any]) -> UpstreamError | None:
    """OpenAI nests errors under ``error``; vLLM sends a flat ``{"object": "error", ...}``."""
    err = obj.get("error")
    if err is None and obj.get("object") == "error":
        err = obj
    if err is None:
        return None
    if isinstance(err, dict):
        message = str(err.get("message") or err)
        code = err.get("code")
        return UpstreamError(message, retryable=False, code=str(code) if code is not None else "upstream_error")
    return UpstreamError(str(err), retryable=False)


_URLS: dict[tuple[str, str], httpx.URL] = {}


class OpenAIProvider(Provider):
    kind = "openai"

    def _headers(self, call: UpstreamCall) -> dict[str, str]:
        headers = {"content-type": "application/json", **call.provider.extra_headers, **call.headers}
        if call.key:
            headers["authorization"] = f"Bearer {call.key}"
        return headers

    def _url(self, call: UpstreamCall, path: str) -> httpx.URL:
        # Parsed once per provider URL and path: httpx would parse the string on every request.
        key = (call.provider.base_url, path)
        url = _URLS.get(key)
        if url is None:
            if len(_URLS) > 1000:
                _URLS.clear()
            url = _URLS[key] = httpx.URL(call.provider.base_url.rstrip("/") + path)
        return url

    async def _post(self, call: UpstreamCall, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = await post_json(self._url(call, path), body, self._headers(call), call.timeout)
        err = _in_stream_error(data)
        if err is not None:
            raise err
        return data

    async def _stream(self, call: UpstreamCall, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with streamed_post(self._url(call, path), body, self._headers(call), call.timeout) as response:
            async for event in parse_events(response.aiter_bytes()):
                if event.data.startswith("[DONE]"):
                    return
                try:
                    obj = orjson.loads(event.data)
                except orjson.JSONDecodeError as exc:
                    raise UpstreamError("upstream sent a malformed stream chunk", retryable=False) from exc
                if not isinstance(obj, dict):
                    continue
                err = _in_stream_error(obj)
                if err is not None:
                    raise err
                yield obj

    @staticmethod
    def _streaming_body(call: UpstreamCall) -> dict[str, Any]:
        body = dict(call.body)
        body["stream"] = True
        # Always ask for usage so the cost is exact; the pipeline strips it if the client did not ask.
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return body

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        return await self._post(call, "/chat/completions", call.body)

    def chat_stream(self, call: UpstreamCall) -> AsyncIterator[dict[str, Any]]:
        return self._stream(call, "/chat/completions", self._streaming_body(call))

    async def completions(self, call: UpstreamCall) -> dict[str, Any]:
        return await self._post(call, "/completions", call.body)

    def completions_stream(self, call: UpstreamCall) -> AsyncIterator[dict[str, Any]]:
        return self._stream(call, "/completions", self._streaming_body(call))

    async def embeddings(self, call: UpstreamCall) -> dict[str, Any]:
        return await self._post(call, "/embeddings", call.body)

    # The Responses API, for upstreams that serve it (``ProviderConfig.responses_api``). A failed
    # response (``status: failed`` with its ``error``) is an upstream error like any other.

    async def responses(self, call: UpstreamCall) -> dict[str, Any]:
        return await self._post(call, "/responses", {**call.body, "stream": False})

    def responses_stream(self, call: UpstreamCall) -> AsyncIterator[dict[str, Any]]:
        return self._stream(call, "/responses", {**call.body, "stream": True})

    # The media routes (docs/media.md): multipart where OpenAI takes files, the speech streamed as bytes.

    async def images(self, call: UpstreamCall) -> dict[str, Any]:
        return await self._post(call, "/images/generations", call.body)

    async def image_edits(self, call: UpstreamCall) -> dict[str, Any]:
        return await post_multipart(self._url(call, "/images/edits"), call.body, self._headers(call), call.timeout)

    async def transcriptions(self, call: UpstreamCall) -> dict[str, Any]:
        url = self._url(call, "/audio/transcriptions")
        return await post_multipart(url, call.body, self._headers(call), call.timeout)

    async def speech_stream(self, call: UpstreamCall) -> AsyncIterator[dict[str, Any]]:
        async with streamed_post(
            self._url(call, "/audio/speech"), call.body, self._headers(call), call.timeout
        ) as response:
            async for piece in response.aiter_bytes():
                if piece:
                    yield {"audio": piece}

    async def moderations(self, call: UpstreamCall) -> dict[str, Any]:
        return await self._post(call, "/moderations", call.body)

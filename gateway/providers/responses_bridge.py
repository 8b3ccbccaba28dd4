"""Serve a Responses API request through a provider's Chat Completions face.

Dispatch wraps every provider that does not serve ``/v1/responses`` itself (Anthropic, whose
``chat`` translates on to Messages; Ollama; the mock; OpenAI-compatible servers whose provider row
says they lack it) in ``ResponsesViaChat``. The request is translated by
``gateway.translate.responses_api``; the stream yields nothing until the upstream's first chunk
arrived, so dispatch can still retry or fail over when the upstream refuses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from gateway import tokens
from gateway.providers.base import Provider, ResponseEvent, ResponseObject, UpstreamCall
from gateway.translate import responses_api

Json = dict[str, Any]


def _chat_call(call: UpstreamCall) -> UpstreamCall:
    body = responses_api.to_chat(call.body)
    body["model"] = call.upstream_model
    return dataclasses.replace(call, body=body)


def _estimated_usage(chat: UpstreamCall, output: str) -> Json:
    prompt = tokens.count_messages(chat.body.get("messages") or [], chat.upstream_model, chat.body.get("tools"))
    completion = tokens.count_text(output, chat.upstream_model)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ResponsesViaChat:
    """Responses API in and out, served by a provider's ``chat`` / ``chat_stream``."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider

    async def responses(self, call: UpstreamCall) -> ResponseObject:
        chat = _chat_call(call)
        completion = await self.provider.chat(chat)
        estimated = not completion.get("usage")
        response = responses_api.from_chat_completion(completion, call.body)
        if estimated:
            response["usage"] = responses_api.usage_from_chat(
                _estimated_usage(chat, responses_api.output_text(response))
            )
            response[responses_api.ESTIMATED_MARK] = True
        return response

    async def responses_stream(self, call: UpstreamCall) -> AsyncIterator[ResponseEvent]:
        chat = _chat_call(call)
        chat.body["stream"] = True
        machine = responses_api.EventsFromChunks(call.body)
        upstream = self.provider.chat_stream(chat)
        try:
            started = False
            async for chunk in upstream:
                if not started:
                    started = True
                    for event in machine.start():
                        yield event
                for event in machine.feed(chunk):
                    yield event
            if not started:
                for event in machine.start():
                    yield event
            fallback = None if machine.usage is not None else _estimated_usage(chat, "".join(machine.text))
            for event in machine.finish(fallback):
                if fallback is not None and isinstance(event.get("response"), dict):
                    event[responses_api.ESTIMATED_MARK] = True
                yield event
        finally:
            aclose = getattr(upstream, "aclose", None)
            if aclose is not None:
                await aclose()

"""Serve an Anthropic Messages request through a provider that speaks Chat Completions.

Dispatch wraps every provider that is not ``NativeMessages`` (OpenAI-compatible, Ollama and mock
upstreams) in ``MessagesViaChat``; the Anthropic provider answers natively. The stream yields
nothing until the upstream's first chunk arrived, so dispatch can still retry or fail over when
the upstream refuses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from gateway import tokens
from gateway.providers.base import Message, MessageEvent, Provider, UpstreamCall
from gateway.translate import requests, responses
from gateway.translate.streams import ESTIMATED_MARK, EventsFromChunks

Json = dict[str, Any]


def _chat_call(call: UpstreamCall) -> UpstreamCall:
    body = requests.messages_to_chat(call.body)
    body["model"] = call.upstream_model
    trace_context = {k: v for k, v in call.headers.items() if k in ("traceparent", "tracestate")}
    return dataclasses.replace(call, body=body, headers=trace_context)  # anthropic-* headers stay home


def _stop_sequences(call: UpstreamCall) -> list[str]:
    found = call.body.get("stop_sequences")
    return [s for s in found if isinstance(s, str)] if isinstance(found, list) else []


def _prompt_estimate(chat: UpstreamCall) -> int:
    return tokens.count_messages(chat.body.get("messages") or [], chat.upstream_model, chat.body.get("tools"))


def _estimated_usage(chat: UpstreamCall, output: str) -> Json:
    prompt = _prompt_estimate(chat)
    completion = tokens.count_text(output, chat.upstream_model)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class MessagesViaChat:
    """Anthropic Messages in and out, served by a provider's ``chat`` / ``chat_stream``."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider

    async def messages(self, call: UpstreamCall) -> Message:
        return await messages_via_chat(self.provider, call)

    def messages_stream(self, call: UpstreamCall) -> AsyncIterator[MessageEvent]:
        return messages_stream_via_chat(self.provider, call)


async def messages_via_chat(provider: Provider, call: UpstreamCall) -> Json:
    chat = _chat_call(call)
    completion = await provider.chat(chat)
    estimated = not completion.get("usage")
    if estimated:
        choices = completion.get("choices") or [{}]
        reply = (choices[0] or {}).get("message") or {}
        output = str(reply.get("content") or "") + "".join(
            str((c.get("function") or {}).get("arguments") or "") for c in reply.get("tool_calls") or []
        )
        completion["usage"] = _estimated_usage(chat, output)
    message = responses.chat_completion_to_message(completion, stop_sequences=_stop_sequences(call))
    if estimated:
        message[ESTIMATED_MARK] = True
    return message


async def messages_stream_via_chat(provider: Provider, call: UpstreamCall) -> AsyncIterator[Json]:
    chat = _chat_call(call)
    chat.body["stream"] = True
    machine = EventsFromChunks(
        chat.upstream_model, input_tokens=_prompt_estimate(chat), stop_sequences=_stop_sequences(call)
    )
    upstream = provider.chat_stream(chat)
    try:
        async for chunk in upstream:
            for event in machine.feed(chunk):
                yield event
        fallback = None if machine.usage is not None else _estimated_usage(chat, "".join(machine.text))
        for event in machine.finish(fallback):
            yield event
    finally:
        aclose = getattr(upstream, "aclose", None)
        if aclose is not None:
            await aclose()

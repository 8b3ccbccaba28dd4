"""The Anthropic wire format: ``/v1/messages`` (and what ``count_tokens`` shares with it).

Streams are relayed as ``event: <type>`` frames (with an ``event: ping`` after 15 s of upstream
silence), errors leave in the Anthropic envelope with Anthropic statuses, and the request id is
also sent as ``request-id``.
"""

from __future__ import annotations

from typing import Any

import orjson

from core.money import Usage
from gateway import tokens
from gateway.context import Headers, RequestContext
from gateway.errors import GatewayError, InvalidRequest
from gateway.formats.base import Json, Response, StreamTracker, WireFormat, response_headers
from gateway.providers.base import Operation
from gateway.sse import event_frame
from gateway.translate import usage as usage_tr
from gateway.translate.streams import ESTIMATED_MARK

_FORWARDED_HEADERS = (b"anthropic-version", b"anthropic-beta")
#: Seconds of upstream silence after which the client gets an ``event: ping`` (keeps proxies open).
KEEPALIVE_SECONDS = 15.0
_PING = event_frame("ping", {"type": "ping"})
_ROLES = frozenset({"user", "assistant", "system"})


def check_messages(data: Json) -> None:
    """The ``messages``, ``system`` and ``tools`` of a Messages or count_tokens body."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: at least one message is required", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise InvalidRequest(f"messages.{i}.role: must be 'user' or 'assistant'", param=f"messages.{i}.role")
        if not isinstance(message.get("content"), (str, list)):
            raise InvalidRequest(
                f"messages.{i}.content: must be a string or an array of content blocks", param=f"messages.{i}.content"
            )
    system = data.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise InvalidRequest("system: must be a string or an array of text blocks", param="system")
    tools = data.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("tools: must be an array", param="tools")


def validate(data: Json) -> None:
    """A Messages request body, checked just enough to route and bill it (``max_tokens`` required)."""
    check_messages(data)
    max_tokens = data.get("max_tokens")
    if max_tokens is None:
        raise InvalidRequest("max_tokens: Field required", param="max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidRequest("max_tokens: must be an integer of at least 1", param="max_tokens")
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream: must be a boolean", param="stream")
    stops = data.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise InvalidRequest("stop_sequences: must be an array of strings", param="stop_sequences")


def _block_text(block: Any) -> str:
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return ""
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text") or "")
    if kind == "tool_use":
        return str(block.get("name") or "") + orjson.dumps(block.get("input") or {}).decode()
    if kind == "tool_result":
        content = block.get("content")
        return "\n".join(_block_text(b) for b in content) if isinstance(content, list) else str(content or "")
    if kind in ("thinking", "redacted_thinking"):
        return str(block.get("thinking") or "")
    return " " * 340  # images and documents: about one low-detail image tile (as gateway.tokens)


def _content_text(content: Any) -> str:
    return "\n".join(_block_text(b) for b in content) if isinstance(content, list) else str(content or "")


def prompt_estimate(data: Json, model: str) -> int:
    """Input tokens of a Messages request, offline (exact only for OpenAI tokenizers)."""
    flat: list[Json] = [{"role": "system", "content": _content_text(data.get("system"))}] if data.get("system") else []
    flat.extend(
        {"role": m.get("role"), "content": _content_text(m.get("content"))}
        for m in data.get("messages") or []
        if isinstance(m, dict)
    )
    return tokens.count_messages(flat, model, data.get("tools") or None)


def forwarded_headers(headers: dict[bytes, bytes]) -> dict[str, str]:
    """The client's ``anthropic-version`` / ``anthropic-beta``, for Anthropic upstreams."""
    return {name.decode(): headers[name].decode("latin-1") for name in _FORWARDED_HEADERS if name in headers}


class EventTracker(StreamTracker):
    """``event: <type>`` frames; usage from ``message_start`` and ``message_delta``, else estimated."""

    keepalive = KEEPALIVE_SECONDS
    ping = _PING

    def __init__(self, ctx: RequestContext) -> None:
        super().__init__(ctx)
        self.reported: Json = {}
        self.started = False
        self.complete = False
        self.estimated = False
        self.output: list[str] = []

    def frame(self, item: Json) -> bytes | None:
        kind = str(item.get("type") or "")
        if kind == "message_start":
            self.started = True
            self._merge((item.get("message") or {}).get("usage"))
        elif kind == "message_delta":
            self.complete = True
            self.estimated = self.estimated or bool(item.pop(ESTIMATED_MARK, False))
            self._merge(item.get("usage"))
        elif kind == "content_block_start":
            self.output.append(_block_text(item.get("content_block")))
        elif kind == "content_block_delta":
            delta = item.get("delta") or {}
            self.output.append(str(delta.get("text") or delta.get("partial_json") or delta.get("thinking") or ""))
        elif kind == "error":  # an upstream's in-stream error, relayed as it came, and the end
            error = item.get("error") if isinstance(item.get("error"), dict) else {}
            self.ctx.status, self.ctx.error_type = "upstream_error", str((error or {}).get("type") or "error")
            self.stopped = True
        return event_frame(kind, item)

    def _merge(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.reported.update({k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)})

    def usage(self) -> Usage:
        if self.complete:
            found = usage_tr.from_anthropic(self.reported)
            if self.estimated:
                found.source = "estimated"
            return found
        ctx = self.ctx
        prompt = usage_tr.from_anthropic(self.reported).prompt_tokens if self.started else ctx.estimated_prompt_tokens
        return ctx.estimated_usage("".join(self.output), prompt_tokens=prompt)

    def error_frame(self, err: GatewayError) -> bytes:
        return event_frame("error", err.anthropic_body(self.ctx.request_id))

    def closing(self, cost_usd: str) -> bytes:
        # SDKs skip SSE comments; people reading the raw stream see the cost.
        return f": x-chittycan-cost={cost_usd}\n\n".encode()


class MessagesFormat(WireFormat):
    endpoint = "messages"
    operation = Operation.MESSAGES
    kinds = ("chat",)

    def parse(self, ctx: RequestContext, data: Json, headers: dict[bytes, bytes]) -> None:
        validate(data)
        ctx.stream = bool(data.get("stream"))
        metadata = data.get("metadata")
        user = metadata.get("user_id") if isinstance(metadata, dict) else None
        ctx.end_user = user if isinstance(user, str) else ""
        ctx.upstream_headers = forwarded_headers(headers)

    def prompt_tokens(self, ctx: RequestContext) -> int:
        return prompt_estimate(ctx.body, ctx.requested_model)

    def max_output_tokens(self, ctx: RequestContext) -> int:
        assert ctx.route is not None
        return min(int(ctx.body["max_tokens"]), ctx.route.max_output_tokens)

    def error_response(self, err: GatewayError, ctx: RequestContext) -> Response:
        rid = ctx.request_id.encode()
        headers: Headers = [(b"request-id", rid), (b"x-request-id", rid)]
        headers.extend((k.encode(), v.encode()) for k, v in err.headers.items())
        headers.extend(ctx.extra_headers)
        return err.status, orjson.dumps(err.anthropic_body(ctx.request_id)), headers

    def success_headers(self, ctx: RequestContext) -> Headers:
        headers = response_headers(ctx)
        headers.append((b"request-id", ctx.request_id.encode()))
        return headers

    def read_result(self, ctx: RequestContext, result: Json) -> Usage:
        estimated = bool(result.pop(ESTIMATED_MARK, False))
        if isinstance(result.get("usage"), dict):
            found = usage_tr.from_anthropic(result["usage"])
            if estimated:
                found.source = "estimated"
            return found
        return ctx.estimated_usage("".join(_block_text(b) for b in result.get("content") or []))

    def stream_tracker(self, ctx: RequestContext) -> StreamTracker:
        return EventTracker(ctx)


MESSAGES = MessagesFormat()

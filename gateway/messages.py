"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: the Anthropic front door.

The same stages as the OpenAI routes (``gateway.pipeline``): parse, authenticate, route (model
aliases let ``claude-sonnet-4`` mean whatever the operator mapped it to), admit, dispatch, relay,
settle and record — one ledger row, priced the same way. What differs is the wire format:

- each provider answers ``messages`` / ``messages_stream``: Anthropic upstreams natively, every
  other kind through ``gateway.translate.bridge``;
- streams are relayed as ``event: <type>`` frames, errors leave in the Anthropic envelope with
  Anthropic statuses, and the request id is also sent as ``request-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

from core import money
from core.money import Usage
from gateway import admission, dispatch, parse, tokens
from gateway.context import RequestContext
from gateway.errors import GatewayError, InvalidRequest, UpstreamError
from gateway.pipeline import (
    Headers,
    Responder,
    authenticate,
    chain,
    resolve_route,
    response_headers,
    settle_and_record,
    start_sse,
)
from gateway.providers import get_provider
from gateway.providers.anthropic import AnthropicProvider
from gateway.routing import DeploymentRoute
from gateway.sse import event_frame
from gateway.translate import usage as usage_tr
from gateway.translate.streams import ESTIMATED_MARK

log = logging.getLogger(__name__)

Json = dict[str, Any]

_FORWARDED_HEADERS = (b"anthropic-version", b"anthropic-beta")
#: Seconds of upstream silence after which the client gets an ``event: ping`` (keeps proxies open).
KEEPALIVE_SECONDS = 15.0
_PING = event_frame("ping", {"type": "ping"})
_ROLES = frozenset({"user", "assistant", "system"})


def error_response(err: GatewayError, ctx: RequestContext) -> tuple[int, bytes, Headers]:
    headers: Headers = [(b"request-id", ctx.request_id.encode()), (b"x-request-id", ctx.request_id.encode())]
    headers.extend((k.encode(), v.encode()) for k, v in err.headers.items())
    headers.extend(ctx.extra_headers)
    return err.status, orjson.dumps(err.anthropic_body(ctx.request_id)), headers


def _success_headers(ctx: RequestContext) -> Headers:
    headers = response_headers(ctx)
    headers.append((b"request-id", ctx.request_id.encode()))
    return headers


# --- parse ----------------------------------------------------------------------------------------


def _validate_messages(data: Json) -> None:
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
    _validate_messages(data)
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


def _parse(ctx: RequestContext, body: bytes, responder: Responder) -> Json:
    data = parse.json_object(body)
    ctx.requested_model = parse.model_name(data)
    validate(data)
    ctx.stream = bool(data.get("stream"))
    ctx.body = data
    user = (data.get("metadata") or {}).get("user_id") if isinstance(data.get("metadata"), dict) else None
    ctx.end_user = user if isinstance(user, str) else ""
    ctx.upstream_headers = {
        name.decode(): responder.headers[name].decode("latin-1")
        for name in _FORWARDED_HEADERS
        if name in responder.headers
    }
    return data


# --- /v1/messages ---------------------------------------------------------------------------------


async def handle_messages(responder: Responder, ctx: RequestContext, body: bytes) -> None:
    try:
        data = _parse(ctx, body, responder)
        ctx.stage("parse")
        await authenticate(ctx, responder.headers)
        ctx.stage("auth")
        route = await resolve_route(ctx, ctx.requested_model, ("chat",))
        ctx.estimated_prompt_tokens = prompt_estimate(data, ctx.requested_model)
        await admission.admit(ctx, min(int(data["max_tokens"]), route.max_output_tokens))
        ctx.stage("admit")
    except GatewayError as err:
        await responder.send_json(*error_response(err, ctx))
        return
    try:
        if ctx.stream:
            await _relay_stream(responder, ctx)
        else:
            await _respond_once(responder, ctx)
    finally:
        await asyncio.shield(settle_and_record(ctx))


def _fail(ctx: RequestContext, err: GatewayError) -> tuple[int, bytes, Headers]:
    ctx.status, ctx.http_status, ctx.error_type = "upstream_error", err.status, err.code or err.type
    return error_response(err, ctx)


def _price(ctx: RequestContext) -> None:
    assert ctx.route is not None and ctx.usage is not None
    ctx.cost_micro = money.cost_micro(ctx.route.price_at(), ctx.usage)


async def _respond_once(responder: Responder, ctx: RequestContext) -> None:
    try:
        message = await dispatch.call(ctx, "messages", ctx.body)
    except GatewayError as err:
        ctx.stage("upstream")
        await responder.send_json(*_fail(ctx, err))
        return
    ctx.stage("upstream")
    estimated = bool(message.pop(ESTIMATED_MARK, False))
    if isinstance(message.get("usage"), dict):
        ctx.usage = usage_tr.from_anthropic(message["usage"])
        if estimated:
            ctx.usage.source = "estimated"
    else:
        output = "".join(_block_text(b) for b in message.get("content") or [])
        ctx.usage = _estimate(ctx, ctx.estimated_prompt_tokens, output)
    _price(ctx)
    headers = _success_headers(ctx)
    headers.append((b"x-chittycan-cost", money.format_usd(ctx.cost_micro).encode()))
    await responder.send_json(200, orjson.dumps(message), headers)


def _estimate(ctx: RequestContext, prompt_tokens: int, output: str) -> Usage:
    model = ctx.deployment.upstream_model if ctx.deployment else ctx.requested_model
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=tokens.count_text(output, model), source="estimated")


class StreamUsage:
    """What a relayed Anthropic stream says about usage; an estimate if it ends early."""

    def __init__(self) -> None:
        self.reported: Json = {}
        self.started = False
        self.complete = False
        self.estimated = False
        self.output: list[str] = []

    def observe(self, event: Json) -> None:
        kind = event.get("type")
        if kind == "message_start":
            self.started = True
            self._merge((event.get("message") or {}).get("usage"))
        elif kind == "message_delta":
            self.complete = True
            self.estimated = self.estimated or bool(event.pop(ESTIMATED_MARK, False))
            self._merge(event.get("usage"))
        elif kind == "content_block_start":
            self.output.append(_block_text(event.get("content_block")))
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            self.output.append(str(delta.get("text") or delta.get("partial_json") or delta.get("thinking") or ""))

    def _merge(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.reported.update({k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)})

    def usage(self, ctx: RequestContext) -> Usage:
        if self.complete:
            found = usage_tr.from_anthropic(self.reported)
            if self.estimated:
                found.source = "estimated"
            return found
        prompt = usage_tr.from_anthropic(self.reported).prompt_tokens if self.started else ctx.estimated_prompt_tokens
        return _estimate(ctx, prompt, "".join(self.output))


async def _relay_stream(responder: Responder, ctx: RequestContext) -> None:
    try:
        first, stream = await dispatch.open_stream(ctx, "messages", ctx.body)
    except GatewayError as err:
        await responder.send_json(*_fail(ctx, err))
        return
    await start_sse(responder, ctx, _success_headers(ctx))
    tracker = StreamUsage()
    try:
        await _relay_events(responder, ctx, chain(first, stream), tracker)
        ctx.stage("relay")
    except asyncio.CancelledError:
        ctx.status, ctx.http_status = "client_disconnected", 499
        raise
    except GatewayError as err:
        ctx.status, ctx.error_type = "upstream_error", err.code or err.type
        await responder.write(event_frame("error", err.anthropic_body(ctx.request_id)))
    except Exception as exc:
        log.exception("messages stream relay failed", extra={"request_id": ctx.request_id})
        ctx.status, ctx.error_type = "error", type(exc).__name__
        failure = UpstreamError("The upstream stream failed.", retryable=False)
        await responder.write(event_frame("error", failure.anthropic_body(ctx.request_id)))
    finally:
        ctx.usage = tracker.usage(ctx)
        _price(ctx)
        await asyncio.shield(dispatch.close_stream(stream))
    if ctx.status == "ok":  # SDKs skip SSE comments; people reading the raw stream see the cost
        await responder.write(f": x-chittycan-cost={money.format_usd(ctx.cost_micro)}\n\n".encode())
    await responder.finish()


async def _relay_events(
    responder: Responder, ctx: RequestContext, events: AsyncIterator[Json], tracker: StreamUsage
) -> None:
    async with contextlib.aclosing(with_keepalive(events, KEEPALIVE_SECONDS)) as paced:
        async for event in paced:
            if event is None:
                await responder.write(_PING)
                continue
            tracker.observe(event)
            kind = str(event.get("type") or "")
            await responder.write(event_frame(kind, event))
            if kind == "error":  # an upstream's in-stream error, relayed as it came
                error = event.get("error") if isinstance(event.get("error"), dict) else {}
                ctx.status, ctx.error_type = "upstream_error", str((error or {}).get("type") or "error")
                return


async def _next_or_end(iterator: AsyncIterator[Json]) -> Json | None:
    try:
        return await anext(iterator)
    except StopAsyncIteration:
        return None


async def with_keepalive(events: AsyncIterator[Json], interval: float) -> AsyncGenerator[Json | None, None]:
    """The events, with ``None`` each time ``interval`` seconds pass without one."""
    pending: asyncio.Future[Json | None] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(_next_or_end(events))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            item, pending = pending.result(), None
            if item is None:
                return
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)


# --- /v1/messages/count_tokens --------------------------------------------------------------------


async def handle_count_tokens(responder: Responder, ctx: RequestContext, body: bytes) -> None:
    """Counted by the Anthropic upstream when the model's first deployment is one, else offline."""
    try:
        data = parse.json_object(body)
        ctx.requested_model = parse.model_name(data)
        _validate_messages(data)
        await authenticate(ctx, responder.headers)
        route = await resolve_route(ctx, ctx.requested_model, ("chat",))
    except GatewayError as err:
        await responder.send_json(*error_response(err, ctx))
        return
    counted = await _count_upstream(ctx, data, route.ordered_deployments()[:1])
    if counted is None:
        counted = prompt_estimate(data, ctx.requested_model)
    await responder.send_json(200, orjson.dumps({"input_tokens": counted}), _success_headers(ctx))


async def _count_upstream(ctx: RequestContext, data: Json, deployments: list[DeploymentRoute]) -> int | None:
    provider = get_provider(deployments[0].provider.kind) if deployments else None
    if not isinstance(provider, AnthropicProvider):
        return None
    try:
        result = await provider.count_tokens(dispatch.make_call(ctx, deployments[0], data))
    except UpstreamError as err:
        log.info("upstream count_tokens failed; counting offline", extra={"error": err.message})
        return None
    value = result.get("input_tokens")
    return value if isinstance(value, int) else None

"""The request pipeline for the OpenAI-compatible routes, one stage after another.

1. parse      gateway.parse          body, size, minimal validation
2. auth       gateway.auth           key by prefix + HMAC, cached
3. limit      gateway.admission      RPM/TPM per key and tenant
4. route      gateway.routing        public model -> ordered deployments
5. reserve    gateway.admission      worst-case cost on every budget scope
6. dispatch   gateway.dispatch       retries and fallback
7. relay      here                   JSON, or SSE chunk by chunk as it arrives
8. settle     gateway.admission      actual cost; reservation settled
9. record     gateway.usage          one ledger row, handed off before the response ends

Every stage that can refuse raises a ``GatewayError``; the consumer turns it into the envelope.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import struct
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson
from django.conf import settings

from core import money
from core.money import Usage
from gateway import admission, auth, dispatch, parse, tokens, usage
from gateway.context import RequestContext
from gateway.errors import GatewayError, NotFound, PermissionDenied, UpstreamError
from gateway.routing import ModelRoute, dev_route, route_table
from gateway.sse import DONE_FRAME, data_frame

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]


class Responder(Protocol):
    """How the pipeline writes to the client (implemented by the consumer)."""

    headers: dict[bytes, bytes]

    async def send_json(self, status: int, body: bytes, headers: Headers) -> None: ...
    async def start_stream(self, headers: Headers) -> None: ...
    async def write(self, data: bytes) -> None: ...
    async def finish(self) -> None: ...


def new_request_id() -> str:
    return f"req_{os.urandom(16).hex()}"  # 128 random bits, as uuid4().hex but 4x cheaper


def response_headers(ctx: RequestContext) -> Headers:
    headers: Headers = [(b"x-request-id", ctx.request_id.encode())]
    if ctx.deployment is not None:
        headers.append((b"x-chittycan-model", ctx.deployment.upstream_model.encode()))
        headers.append((b"x-chittycan-provider", ctx.deployment.provider.slug.encode()))
    if ctx.route_reason:
        headers.append((b"x-chittycan-route", ctx.route_reason.encode()))
    headers.extend(ctx.extra_headers)
    return headers


def error_response(err: GatewayError, ctx: RequestContext) -> tuple[int, bytes, Headers]:
    headers = [(b"x-request-id", ctx.request_id.encode())]
    headers.extend((k.encode(), v.encode()) for k, v in err.headers.items())
    headers.extend(ctx.extra_headers)
    return err.status, orjson.dumps(err.openai_body()), headers


# --- stages 2 and 4 -------------------------------------------------------------------------------


async def authenticate(ctx: RequestContext, headers: dict[bytes, bytes]) -> None:
    token = auth.bearer_token(headers)
    if settings.CHITTYCAN_PASSTHROUGH and token.startswith("sk-"):
        ctx.key = await admission.passthrough_key()
        ctx.passthrough_key = token
    else:
        ctx.key = await auth.authenticate(token)
    auth.check_endpoint(ctx.key, ctx.endpoint)


async def resolve_route(ctx: RequestContext, name: str, kinds: tuple[str, ...]) -> ModelRoute:
    table = await route_table()
    route = table.resolve(name)
    if settings.CHITTYCAN_MODE == "dev":
        route = dev_route(name, route)
    elif ctx.passthrough_key:
        route = await admission.passthrough_route(name, route)
    key = ctx.key
    assert key is not None
    if route is None or not key.allows_model(route.name, route.aliases):
        # Unknown and not-allowed look the same: a key never learns what other tenants may use.
        if route is not None and key.models is not None and name in key.models:
            raise PermissionDenied(f"This API key may not use the model {name}.")
        raise NotFound(f"The model `{name}` does not exist or you do not have access to it.", param="model")
    # Dev mode serves any kind from its one deployment; passthrough cannot know an unlisted model's kind.
    unlisted_passthrough = bool(ctx.passthrough_key) and route.id is None
    if route.kind not in kinds and settings.CHITTYCAN_MODE != "dev" and not unlisted_passthrough:
        raise GatewayError(
            f"The model `{name}` does not support the {ctx.endpoint} endpoint.",
            status=400,
            type="invalid_request_error",
            code="unsupported_model",
            param="model",
        )
    ctx.route = route
    return route


# --- settle and record ----------------------------------------------------------------------------


def reported_usage(reported: Any) -> Usage | None:
    """The upstream's usage object as ``Usage``; None when absent or not understandable."""
    if not isinstance(reported, dict):
        return None
    try:
        return Usage.from_openai(reported)
    except (TypeError, ValueError, AttributeError):
        log.warning("upstream sent a usage object we cannot read: %.200r", reported)
        return None


def _message_of(choice: dict[str, Any]) -> dict[str, Any]:
    message = choice.get("message")
    return message if isinstance(message, dict) else {}


def estimate_usage(ctx: RequestContext, output_text: str) -> Usage:
    model = ctx.deployment.upstream_model if ctx.deployment else ctx.requested_model
    return Usage(
        prompt_tokens=ctx.estimated_prompt_tokens,
        completion_tokens=tokens.count_text(output_text, model),
        source="estimated",
    )


async def settle_and_record(ctx: RequestContext) -> None:
    """Price the request, settle its reservations and hand the ledger row off. Runs once."""
    if ctx.usage is not None and ctx.route is not None:
        ctx.cost_micro = money.cost_micro(ctx.route.price_at(), ctx.usage)
    await admission.settle(ctx)
    if ctx.reached_provider:
        await usage.hand_off_or_spool(usage.row_from_context(ctx))


# --- chat completions and legacy completions -----------------------------------------------------


def _prompt_estimate(ctx: RequestContext) -> int:
    model = ctx.requested_model
    if ctx.endpoint == "chat":
        return tokens.count_messages(ctx.body.get("messages") or [], model, ctx.body.get("tools"))
    prompt = ctx.body.get("prompt")
    if isinstance(prompt, str):
        return tokens.count_text(prompt, model)
    if isinstance(prompt, list):
        return sum(
            len(p) if isinstance(p, list) else 1 if isinstance(p, int) else tokens.count_text(str(p), model)
            for p in prompt
        )
    return 0


def max_output_tokens(ctx: RequestContext) -> int:
    assert ctx.route is not None
    cap = ctx.body.get("max_completion_tokens") or ctx.body.get("max_tokens") or ctx.route.max_output_tokens
    # Every generated choice is billed: n of them, or best_of (legacy completions) when larger.
    best_of = ctx.body.get("best_of") if ctx.endpoint == "completions" else None  # validated there
    n = max(ctx.body.get("n") or 1, best_of or 1)
    return int(min(cap, ctx.route.max_output_tokens) if isinstance(cap, int) else ctx.route.max_output_tokens) * int(n)


async def handle_generation(responder: Responder, ctx: RequestContext, body: bytes) -> None:
    """``/v1/chat/completions`` (endpoint ``chat``) and ``/v1/completions`` (``completions``)."""
    try:
        data = parse.json_object(body)
        ctx.requested_model = parse.model_name(data)
        if ctx.endpoint == "chat":
            parse.chat(data)
        else:
            parse.completions(data)
        ctx.stream, ctx.client_wants_usage = parse.stream_flags(data)
        ctx.body = data
        user = data.get("user") or data.get("safety_identifier")
        ctx.end_user = user if isinstance(user, str) else ""
        ctx.stage("parse")
        await authenticate(ctx, responder.headers)
        ctx.stage("auth")
        kinds = ("chat",) if ctx.endpoint == "chat" else ("completion", "chat")
        await resolve_route(ctx, ctx.requested_model, kinds)
        ctx.estimated_prompt_tokens = _prompt_estimate(ctx)
        await admission.admit(ctx, max_output_tokens(ctx))
        ctx.stage("admit")
    except GatewayError as err:
        status, payload, headers = error_response(err, ctx)
        await responder.send_json(status, payload, headers)
        return
    operation = "chat" if ctx.endpoint == "chat" else "completions"
    try:
        if ctx.stream:
            await _relay_stream(responder, ctx, operation)
        else:
            await _respond_once(responder, ctx, operation)
    except asyncio.CancelledError:
        _client_left(ctx)
        raise
    finally:
        await asyncio.shield(settle_and_record(ctx))


def _client_left(ctx: RequestContext) -> None:
    """The client disconnected (the consumer cancelled us) before the answer was complete."""
    if ctx.status == "ok":
        ctx.status, ctx.http_status = "client_disconnected", 499
    if ctx.usage is None and ctx.reached_provider:
        ctx.usage = estimate_usage(ctx, "")  # the prompt was sent; bill it as the upstream will


async def _respond_once(responder: Responder, ctx: RequestContext, operation: str) -> None:
    try:
        result = await dispatch.call(ctx, operation)
    except GatewayError as err:
        ctx.status, ctx.http_status, ctx.error_type = "upstream_error", err.status, err.code or err.type
        ctx.stage("upstream")
        status, payload, headers = error_response(err, ctx)
        await responder.send_json(status, payload, headers)
        return
    ctx.stage("upstream")
    ctx.usage = reported_usage(result.get("usage"))
    if ctx.usage is None:
        choices = result.get("choices")
        text = "".join(
            str(_message_of(c).get("content") or c.get("text") or "")
            for c in (choices if isinstance(choices, list) else ())
            if isinstance(c, dict)
        )
        ctx.usage = estimate_usage(ctx, text)
    assert ctx.route is not None
    ctx.cost_micro = money.cost_micro(ctx.route.price_at(), ctx.usage)
    headers = response_headers(ctx)
    headers.append((b"x-chittycan-cost", money.format_usd(ctx.cost_micro).encode()))
    await responder.send_json(200, orjson.dumps(result), headers)


async def start_sse(responder: Responder, ctx: RequestContext, headers: Headers) -> None:
    """The upstream's first chunk is in: note the time to first token and open the client's stream."""
    ctx.ttft_ms = ctx.elapsed_ms()
    ctx.stage("upstream_first_chunk")
    headers.append((b"content-type", b"text/event-stream; charset=utf-8"))
    headers.append((b"cache-control", b"no-cache"))
    await responder.start_stream(headers)


def _chunk_text(chunk: dict[str, Any]) -> str:
    parts = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        if delta is None:
            text = choice.get("text")
            if isinstance(text, str):
                parts.append(text)
            continue
        content = delta.get("content")
        if isinstance(content, str):
            parts.append(content)
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") or {}
            parts.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
    return "".join(parts)


async def _relay_stream(responder: Responder, ctx: RequestContext, operation: str) -> None:
    try:
        first, stream = await dispatch.open_stream(ctx, operation)
    except GatewayError as err:
        ctx.status, ctx.http_status, ctx.error_type = "upstream_error", err.status, err.code or err.type
        status, payload, headers = error_response(err, ctx)
        await responder.send_json(status, payload, headers)
        return
    await start_sse(responder, ctx, response_headers(ctx))
    output: list[str] = []
    try:
        async for chunk in chain(first, stream):
            if "usage" in chunk:
                reported = chunk.get("usage")
                if reported:
                    ctx.usage = reported_usage(reported) or ctx.usage
                if not ctx.client_wants_usage:
                    if not chunk.get("choices"):
                        continue  # the usage chunk we asked for; the client did not
                    del chunk["usage"]
            output.append(_chunk_text(chunk))
            await responder.write(data_frame(chunk))
        if ctx.usage is None:
            ctx.usage = estimate_usage(ctx, "".join(output))
        assert ctx.route is not None
        ctx.cost_micro = money.cost_micro(ctx.route.price_at(), ctx.usage)
        ctx.stage("relay")
        await responder.write(DONE_FRAME)
        # SDKs skip SSE comments; humans and tools reading the raw stream see the cost.
        await responder.write(f": x-chittycan-cost={money.format_usd(ctx.cost_micro)}\n\n".encode())
    except asyncio.CancelledError:
        ctx.status, ctx.http_status = "client_disconnected", 499
        if ctx.usage is None:
            ctx.usage = estimate_usage(ctx, "".join(output))
        raise
    except GatewayError as err:
        ctx.status, ctx.error_type = "upstream_error", err.code or err.type
        if ctx.usage is None:
            ctx.usage = estimate_usage(ctx, "".join(output))
        await responder.write(data_frame(err.openai_body()))
    except Exception as exc:
        log.exception("stream relay failed", extra={"request_id": ctx.request_id})
        ctx.status, ctx.error_type = "error", type(exc).__name__
        if ctx.usage is None:
            ctx.usage = estimate_usage(ctx, "".join(output))
        failure = UpstreamError("The upstream stream failed.", retryable=False)
        await responder.write(data_frame(failure.openai_body()))
    finally:
        await asyncio.shield(dispatch.close_stream(stream))
    await responder.finish()


async def chain(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """The stream's first item (already read by dispatch) followed by the rest."""
    yield first
    async for item in rest:
        yield item


# --- embeddings -----------------------------------------------------------------------------------


def _pack_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def handle_embeddings(responder: Responder, ctx: RequestContext, body: bytes) -> None:
    try:
        data = parse.json_object(body)
        ctx.requested_model = parse.model_name(data)
        parse.embeddings(data)
        ctx.body = data
        user = data.get("user")
        ctx.end_user = user if isinstance(user, str) else ""
        ctx.stage("parse")
        await authenticate(ctx, responder.headers)
        ctx.stage("auth")
        await resolve_route(ctx, ctx.requested_model, ("embedding",))
        raw = data["input"]
        items = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        ctx.estimated_prompt_tokens = sum(
            len(i) if isinstance(i, list) else tokens.count_text(str(i), ctx.requested_model) for i in items
        )
        await admission.admit(ctx, 0)
        ctx.stage("admit")
    except GatewayError as err:
        status, payload, headers = error_response(err, ctx)
        await responder.send_json(status, payload, headers)
        return
    try:
        try:
            result = await dispatch.call(ctx, "embeddings")
        except GatewayError as err:
            ctx.status, ctx.http_status, ctx.error_type = "upstream_error", err.status, err.code or err.type
            status, payload, headers = error_response(err, ctx)
            await responder.send_json(status, payload, headers)
            return
        ctx.stage("upstream")
        if data.get("encoding_format") == "base64":
            for item in result.get("data") or ():
                if isinstance(item, dict) and isinstance(item.get("embedding"), list):
                    item["embedding"] = _pack_base64(item["embedding"])
        ctx.usage = reported_usage(result.get("usage"))
        if ctx.usage is None or not ctx.usage.prompt_tokens:
            ctx.usage = Usage(prompt_tokens=ctx.estimated_prompt_tokens, source="estimated")
        assert ctx.route is not None
        ctx.cost_micro = money.cost_micro(ctx.route.price_at(), ctx.usage)
        headers = response_headers(ctx)
        headers.append((b"x-chittycan-cost", money.format_usd(ctx.cost_micro).encode()))
        await responder.send_json(200, orjson.dumps(result), headers)
    except asyncio.CancelledError:
        _client_left(ctx)
        raise
    finally:
        await asyncio.shield(settle_and_record(ctx))

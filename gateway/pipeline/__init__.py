"""The request pipeline: every ``/v1`` route, one stage after another.

``run`` serves chat completions, legacy completions, embeddings, Anthropic messages, the
Responses API and the media routes (images, audio, moderations: docs/media.md); what differs
between them is the wire format (``gateway.formats``), passed in as ``wire``. A request carries
its ``RequestContext`` from stage to stage; stages never call each other. A format whose answers
the gateway keeps (the Responses API) also loads its stored state after authenticate
(``wire.prepare``) and stores each complete answer before the client sees it (``wire.complete``,
``wire.watch_stream``).

 1. parse          gateway.pipeline.parse         JSON body, model, the format's checks
 2. authenticate   gateway.pipeline.authenticate  key by prefix + HMAC, cached with its tenant chain
 3. route          gateway.pipeline.route         public model -> deployments the key may use
 4. limit          gateway.pipeline.limit         RPM/TPM per key and tenant
 5. cache          gateway.pipeline.cache         the exact response cache: a hit is served here
 6. reserve        gateway.pipeline.reserve       worst-case cost on every budget scope, all or nothing
 7. dispatch       gateway.pipeline.dispatch      the deployments in order, retries and fallback
 8. relay          gateway.pipeline.relay         the answer, or the stream item by item as it arrives
 9. settle         gateway.pipeline.settle        actual cost; rate ticket and reservation settled
10. record         gateway.pipeline.record        one ledger row, handed off before the response ends

A stage that refuses raises ``GatewayError``; it leaves in the format's error envelope. Settle and
record run whatever happened after reserve (errors and client disconnects included), shielded
from cancellation, exactly once.
"""

from __future__ import annotations

import asyncio
import os

import orjson

from gateway.context import RequestContext, Responder
from gateway.errors import GatewayError, InvalidRequest
from gateway.formats import CHAT, MESSAGES, WireFormat
from gateway.formats.anthropic import check_messages, prompt_estimate
from gateway.formats.checks import json_object, model_name
from gateway.pipeline import authenticate, cache, dispatch, limit, parse, record, relay, reserve, route, settle

__all__ = ["count_tokens", "invalidate_cache", "new_request_id", "run"]


def new_request_id() -> str:
    return f"req_{os.urandom(16).hex()}"  # 128 random bits, as uuid4().hex but 4x cheaper


async def run(wire: WireFormat, responder: Responder, ctx: RequestContext, body: bytes) -> None:
    """Serve one request of any ``/v1`` route, start to finish."""
    try:
        parse.run(ctx, wire, body, responder.headers)
        await authenticate.run(ctx, responder.headers)
        await wire.prepare(ctx)  # the Responses API: the stored conversation (previous_response_id)
        await route.resolve(ctx, wire.kinds)
        ctx.estimated_prompt_tokens = wire.prompt_tokens(ctx)
        ctx.most_units = wire.most_units(ctx)
        most_output = wire.max_output_tokens(ctx)
        await limit.run(ctx, most_output)
        if wire.cacheable:
            await cache.lookup(ctx, responder.headers)
        if not ctx.cache_hit:
            await reserve.run(ctx, most_output)
    except GatewayError as err:
        await responder.send_json(*wire.error_response(err, ctx))
        record.refused(ctx, err)
        return
    try:
        if ctx.cache_hit:
            await cache.serve(responder, ctx, wire)
        elif ctx.stream:
            try:
                first, rest = await dispatch.open_stream(ctx, wire.operation)
            except GatewayError as err:
                await relay.upstream_failed(responder, ctx, wire, err)
                return
            await relay.send_stream(responder, ctx, wire, first, wire.watch_stream(ctx, rest))
            await cache.keep(ctx)
        else:
            try:
                result = await dispatch.call(ctx, wire.operation)
            except GatewayError as err:
                ctx.stage("upstream")
                await relay.upstream_failed(responder, ctx, wire, err)
                return
            ctx.stage("upstream")
            result = await wire.complete(ctx, result)
            await relay.send_result(responder, ctx, wire, result)
            await cache.keep(ctx, result)
    except asyncio.CancelledError:
        _client_left(ctx)
        raise
    finally:
        await asyncio.shield(_settle_and_record(ctx))


def _client_left(ctx: RequestContext) -> None:
    """The client disconnected (the consumer cancelled us) before the answer was complete."""
    if ctx.status == "ok":
        ctx.status, ctx.http_status = "client_disconnected", 499
    if ctx.usage is None and ctx.reached_provider:
        ctx.usage = ctx.estimated_usage("")  # the prompt was sent; bill it as the upstream will


async def _settle_and_record(ctx: RequestContext) -> None:
    await settle.run(ctx)
    await record.run(ctx)


async def count_tokens(responder: Responder, ctx: RequestContext, body: bytes) -> None:
    """``/v1/messages/count_tokens``: parse, authenticate and route, then count (nothing is billed).

    Counted by the Anthropic upstream when the model's first deployment is one, else offline.
    """
    try:
        data = json_object(body)
        ctx.requested_model = model_name(data)
        check_messages(data)
        await authenticate.run(ctx, responder.headers)
        await route.resolve(ctx, MESSAGES.kinds)
    except GatewayError as err:
        await responder.send_json(*MESSAGES.error_response(err, ctx))
        return
    counted = await dispatch.count_tokens(ctx, data)
    if counted is None:
        counted = prompt_estimate(data, ctx.requested_model)
    await responder.send_json(200, orjson.dumps({"input_tokens": counted}), MESSAGES.success_headers(ctx))


async def invalidate_cache(responder: Responder, ctx: RequestContext, body: bytes) -> None:
    """``POST /v1/cache/invalidate`` ``{"model": name}`` or ``{}``: the caller's tenant's cached
    answers of that public model, or all of them, are dropped; the answer says how many."""
    try:
        data = json_object(body) if body.strip() else {}
        model = data.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise InvalidRequest("model: must be a public model name", param="model")
        await authenticate.run(ctx, responder.headers)
        assert ctx.key is not None
        deleted = await cache.invalidate(ctx.key.tenant.id, model)
    except GatewayError as err:
        await responder.send_json(*CHAT.error_response(err, ctx))
        return
    answer: dict[str, object] = {"deleted": deleted}
    if model is not None:
        answer["model"] = model
    await responder.send_json(200, orjson.dumps(answer), [(b"x-request-id", ctx.request_id.encode())])

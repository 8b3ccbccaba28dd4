"""The request pipeline: every ``/v1`` route, one stage after another.

``run`` serves chat completions, legacy completions, embeddings and Anthropic messages; what
differs between them is the wire format (``gateway.formats``), passed in as ``wire``. A request
carries its ``RequestContext`` from stage to stage; stages never call each other.

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
import math
import os

import orjson
from asgiref.sync import sync_to_async

from gateway.context import RequestContext, Responder
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.formats import CHAT, MESSAGES, WireFormat
from gateway.formats.anthropic import check_messages, prompt_estimate
from gateway.formats.checks import json_object, model_name
from gateway.pipeline import authenticate, cache, dispatch, limit, parse, record, relay, reserve, route, settle
from ledger.feedback import feedback_record

__all__ = ["count_tokens", "feedback", "invalidate_cache", "new_request_id", "run"]


def new_request_id() -> str:
    return f"req_{os.urandom(16).hex()}"  # 128 random bits, as uuid4().hex but 4x cheaper


async def run(wire: WireFormat, responder: Responder, ctx: RequestContext, body: bytes) -> None:
    """Serve one request of any ``/v1`` route, start to finish."""
    try:
        parse.run(ctx, wire, body, responder.headers)
        await authenticate.run(ctx, responder.headers)
        ctx.estimated_prompt_tokens = wire.prompt_tokens(ctx)  # before route: routing policies read it
        await route.resolve(ctx, wire.kinds, responder.headers)
        most_output = wire.max_output_tokens(ctx)
        await limit.run(ctx, most_output)
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
            await relay.send_stream(responder, ctx, wire, first, rest)
            await cache.keep(ctx)
        else:
            try:
                result = await dispatch.call(ctx, wire.operation)
            except GatewayError as err:
                ctx.stage("upstream")
                await relay.upstream_failed(responder, ctx, wire, err)
                return
            ctx.stage("upstream")
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
        ctx.body = data
        ctx.estimated_prompt_tokens = prompt_estimate(data, ctx.requested_model)
        await route.resolve(ctx, MESSAGES.kinds, responder.headers)
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


MAX_LABEL = 100


def _feedback_input(body: bytes) -> tuple[str, float | None, str]:
    data = json_object(body)
    unknown = sorted(set(data) - {"request_id", "score", "label"})
    if unknown:
        raise InvalidRequest(f"Unknown field(s): {', '.join(unknown)} (request_id, score, label).", param=unknown[0])
    request_id = data.get("request_id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > 64:
        raise InvalidRequest("request_id: the x-request-id of one of your requests is required.", param="request_id")
    score = data.get("score")
    if score is not None and (
        isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(float(score))
    ):
        raise InvalidRequest("score: must be a finite number.", param="score")
    label = data.get("label")
    if label is not None and (not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL):
        raise InvalidRequest(f"label: must be a non-empty string of at most {MAX_LABEL} characters.", param="label")
    if score is None and label is None:
        raise InvalidRequest("Give a score (number) or a label (string), or both.", param="score")
    return request_id, float(score) if score is not None else None, label.strip() if label else ""


async def feedback(responder: Responder, ctx: RequestContext, body: bytes) -> None:
    """``POST /v1/feedback`` ``{"request_id", "score" and/or "label"}``: the outcome of one of the
    caller's tenant's requests (a routing experiment's feedback mean reads it). Another tenant's
    request, or one the ledger does not know, is a 404."""
    try:
        request_id, score, label = _feedback_input(body)
        await authenticate.run(ctx, responder.headers)
        assert ctx.key is not None
        stored = await sync_to_async(feedback_record, thread_sensitive=False)(
            tenant_id=ctx.key.tenant.id, api_key_id=ctx.key.id, request_id=request_id, score=score, label=label
        )
        if stored is None:
            raise NotFound(f"No request {request_id} of yours is in the ledger.", code="request_not_found")
    except GatewayError as err:
        await responder.send_json(*CHAT.error_response(err, ctx))
        return
    saved, row = stored
    answer: dict[str, object] = {
        "object": "feedback",
        "request_id": request_id,
        "score": saved.score,
        "label": saved.label or None,
    }
    if row.experiment:
        answer["experiment"] = row.experiment
        answer["arm"] = row.arm
    await responder.send_json(200, orjson.dumps(answer), [(b"x-request-id", ctx.request_id.encode())])

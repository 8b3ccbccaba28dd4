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
 5. cache          gateway.pipeline.cache         the response cache (exact, then semantic): a hit is served here
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
import logging
import math
import os

import orjson
from asgiref.sync import sync_to_async

from gateway import auth, tracing
from gateway import cache as cache_store
from gateway.cache import MANAGEMENT_PREFIX
from gateway.context import RequestContext, Responder
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.formats import CHAT, EMBEDDINGS, MESSAGES, WireFormat
from gateway.formats.anthropic import check_messages, prompt_estimate
from gateway.formats.checks import json_object, model_name
from gateway.pipeline import authenticate, cache, dispatch, limit, parse, record, relay, reserve, route, settle
from gateway.routing import breaker
from ledger.feedback import feedback_record

__all__ = ["count_tokens", "feedback", "invalidate_cache", "new_request_id", "run"]

log = logging.getLogger(__name__)


def new_request_id() -> str:
    return f"req_{os.urandom(16).hex()}"  # 128 random bits, as uuid4().hex but 4x cheaper


async def run(wire: WireFormat, responder: Responder, ctx: RequestContext, body: bytes) -> None:
    """Serve one request of any ``/v1`` route, start to finish."""
    if tracing.ENABLED:
        tracing.begin(ctx, responder.headers)
    try:
        parse.run(ctx, wire, body, responder.headers)
        await authenticate.run(ctx, responder.headers)
        await wire.prepare(ctx)  # the Responses API: the stored conversation (previous_response_id)
        ctx.estimated_prompt_tokens = wire.prompt_tokens(ctx)  # before route: routing policies read it
        ctx.most_units = wire.most_units(ctx)
        await route.resolve(ctx, wire.kinds, responder.headers)
        ctx.stage("route")
        most_output = wire.max_output_tokens(ctx)
        await limit.run(ctx, most_output)
        ctx.stage("limit")
        if wire.cacheable:
            await cache.lookup(ctx, responder.headers, embed=_embed)
            if ctx.cache_result in ("miss", "bypass"):
                ctx.stage("cache")  # a hit closes its own stage
        if not ctx.cache_hit:
            await reserve.run(ctx, most_output)
    except GatewayError as err:
        await cache.land(ctx, wire)  # a coalescing leader refused here: its followers go again
        await responder.send_json(*wire.error_response(err, ctx))
        record.refused(ctx, err)
        return
    except BaseException:
        await asyncio.shield(cache.land(ctx, wire))
        raise
    try:
        if ctx.cache_hit:
            await cache.serve(responder, ctx, wire)
            ctx.stage("relay")
        elif ctx.stream:
            try:
                first, rest = await cache.shielded(ctx, dispatch.open_stream(ctx, wire.operation))
            except GatewayError as err:
                ctx.stage("upstream")
                await relay.upstream_failed(responder, ctx, wire, err)
                return
            rest = cache.fan_out(ctx, first, rest)
            await relay.send_stream(responder, ctx, wire, first, wire.watch_stream(ctx, rest))
            await cache.keep(ctx)
        else:
            try:
                result = await cache.shielded(ctx, dispatch.call(ctx, wire.operation))
            except GatewayError as err:
                ctx.stage("upstream")
                await relay.upstream_failed(responder, ctx, wire, err)
                return
            ctx.stage("upstream")
            result = await wire.complete(ctx, result)
            await relay.send_result(responder, ctx, wire, result)
            ctx.stage("relay")
            await cache.keep(ctx, result)
    except asyncio.CancelledError:
        _client_left(ctx)
        raise
    finally:
        await asyncio.shield(_settle_and_record(ctx, wire))


def _client_left(ctx: RequestContext) -> None:
    """The client disconnected (the consumer cancelled us) before the answer was complete."""
    if ctx.status == "ok":
        ctx.status, ctx.http_status = "client_disconnected", 499
    if ctx.usage is None and ctx.reached_provider:
        ctx.usage = ctx.estimated_usage("")  # the prompt was sent; bill it as the upstream will


async def _settle_and_record(ctx: RequestContext, wire: WireFormat) -> None:
    if ctx.stream_probe is not None:
        # A stream's half-open probe the relay never settled (cancelled before it started).
        probe, ctx.stream_probe = ctx.stream_probe, None
        await breaker.release(probe)
    await cache.land(ctx, wire)  # a coalescing leader's flight ends (completed if its client left)
    await settle.run(ctx)
    ctx.stage("settle")
    await record.run(ctx)


async def _embed(parent: RequestContext, model: str, text: str) -> list[float] | None:
    """The semantic cache's embedding of a prompt: an embeddings request of the parent's key, run
    through the stages like any (route, limit, reserve, dispatch, settle, record: its own ledger
    row and request id). None, and the semantic cache is skipped, when it is refused or fails."""
    ctx = RequestContext(request_id=new_request_id(), endpoint=EMBEDDINGS.endpoint)
    ctx.key, ctx.requested_model, ctx.end_user = parent.key, model, parent.end_user
    ctx.body = {"model": model, "input": text}
    try:
        assert ctx.key is not None
        auth.check_endpoint(ctx.key, ctx.endpoint)
        await route.resolve(ctx, EMBEDDINGS.kinds)
        ctx.estimated_prompt_tokens = EMBEDDINGS.prompt_tokens(ctx)
        await limit.run(ctx, 0)
        await reserve.run(ctx, 0)
    except GatewayError as err:
        record.refused(ctx, err)
        log.info("semantic cache: embedding refused: %s", err.message, extra={"request_id": parent.request_id})
        return None
    try:
        result = await dispatch.call(ctx, EMBEDDINGS.operation)
        ctx.stage("upstream")
        ctx.usage = EMBEDDINGS.read_result(ctx, result)
    except GatewayError as err:
        ctx.status, ctx.http_status, ctx.error_type = "upstream_error", err.status, err.code or err.type
        log.info("semantic cache: embedding failed: %s", err.message, extra={"request_id": parent.request_id})
        return None
    finally:
        await asyncio.shield(_settle_and_record(ctx, EMBEDDINGS))
    data = result.get("data")
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    vector = first.get("embedding")
    if not isinstance(vector, list) or not all(isinstance(v, int | float) for v in vector):
        log.info("semantic cache: the embedding answer has no vector", extra={"request_id": parent.request_id})
        return None
    return [float(v) for v in vector]


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
    """``POST /v1/cache/invalidate`` ``{"model", "key_prefix", "pattern"}`` (each optional): the
    matching cached answers are dropped; the answer says how many. A gateway key drops its own
    tenant's; a management token (``ccm_...``) anyone's, or one tenant's (``"tenant": slug``)."""
    try:
        data = json_object(body) if body.strip() else {}
        token = auth.bearer_token(responder.headers)
        if token.startswith(MANAGEMENT_PREFIX):
            tenant_ids = await cache_store.management_scope(token, data.get("tenant"))
        else:
            if "tenant" in data:
                raise InvalidRequest("tenant: only a management token chooses the tenant", param="tenant")
            await authenticate.run(ctx, responder.headers)
            assert ctx.key is not None
            tenant_ids = (ctx.key.tenant.id,)
        chosen = cache.selection(data, tenant_ids)
        deleted = await cache.invalidate(chosen)
    except GatewayError as err:
        await responder.send_json(*CHAT.error_response(err, ctx))
        return
    answer: dict[str, object] = {"deleted": deleted}
    answer.update({k: v for k, v in data.items() if k in ("model", "key_prefix", "pattern", "tenant")})
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

"""Stage 5, cache: the exact response cache (``gateway.cache``), per tenant, for models that enable it.

``lookup`` decides, before any budget is reserved, what the request does with the cache and says
so in ``X-ChittyCan-Cache`` (sent with every answer, errors included, through
``ctx.extra_headers``):

- the model's cache is off: nothing is said and nothing is stored;
- ``Cache-Control: no-store`` (or a passthrough key): ``BYPASS``, neither read nor written;
- ``Cache-Control: no-cache``: ``MISS``, the upstream answers and its answer replaces the entry;
- else a stored answer is a ``HIT`` (served by ``serve``, with ``Age``, cost 0 and the saving
  noted for the ledger), or a ``MISS`` whose complete, successful answer ``keep`` stores (a
  stream's items as the relay recorded them).

``X-ChittyCan-Cache-TTL: seconds`` sets how long this request's answer is kept.
"""

from __future__ import annotations

import logging
import time

import orjson

from core import money
from gateway import admission
from gateway import cache as store
from gateway.cache import render, semantic
from gateway.context import RequestContext, Responder
from gateway.errors import InvalidRequest
from gateway.formats import WireFormat
from gateway.formats.base import Json

log = logging.getLogger(__name__)

HEADER = b"x-chittycan-cache"
SIMILARITY_HEADER = b"x-chittycan-cache-similarity"
MAX_TTL = 30 * 86_400


def _directives(headers: dict[bytes, bytes]) -> set[str]:
    raw = headers.get(b"cache-control", b"").decode("latin-1")
    return {part.strip().lower() for part in raw.split(",") if part.strip()}


def _ttl(headers: dict[bytes, bytes], default: int) -> int:
    raw = headers.get(b"x-chittycan-cache-ttl")
    if raw is None:
        return default
    try:
        ttl = int(raw.decode("latin-1").strip())
    except ValueError:
        ttl = 0
    if not 1 <= ttl <= MAX_TTL:
        raise InvalidRequest(
            f"X-ChittyCan-Cache-TTL: must be whole seconds from 1 to {MAX_TTL}", param="X-ChittyCan-Cache-TTL"
        )
    return ttl


async def lookup(ctx: RequestContext, headers: dict[bytes, bytes], embed: semantic.Embed | None = None) -> None:
    """Find the tenant's cached answer (``ctx.cache_hit``), or prepare this answer's storing.

    After an exact miss, a model with the semantic cache on embeds the prompt through ``embed``
    and may serve the answer of a similar one (``gateway.cache.semantic``)."""
    ctx.cache_hit = False
    route, key = ctx.route, ctx.key
    if route is None or key is None or route.cache_ttl <= 0:
        return
    directives = _directives(headers)
    if "no-store" in directives or ctx.passthrough_key:
        ctx.extra_headers.append((HEADER, b"BYPASS"))
        ctx.cache_result = "bypass"
        return
    ctx.cache_ttl = _ttl(headers, route.cache_ttl)
    ctx.cache_digest = store.request_digest(ctx.endpoint, route.name, ctx.body, ctx.upstream_headers)
    entry = None if "no-cache" in directives else await store.lookup(key.tenant.id, route.name, ctx.cache_digest)
    similarity = 0.0
    if entry is None and route.semantic_model and embed is not None:
        entry, similarity = await semantic.find(ctx, key.tenant.id, embed, search="no-cache" not in directives)
    if entry is None or entry.endpoint != ctx.endpoint:
        ctx.extra_headers.append((HEADER, b"MISS"))
        ctx.cache_result = "miss"
        if ctx.stream:
            ctx.cache_items = []
        return
    await admission.count_cache_hit(ctx)  # counts toward RPM (a 429 if full); no budget reserved
    ctx.cache_hit, ctx.cache_entry, ctx.cache_digest = True, entry, ""
    ctx.extra_headers.append((HEADER, b"HIT"))
    ctx.cache_result = "hit"
    ctx.extra_headers.append((b"age", str(max(0, int(time.time() - entry.stored_at))).encode()))
    if similarity:
        ctx.extra_headers.append((SIMILARITY_HEADER, f"{similarity:.3f}".encode()))
    ctx.usage = entry.usage
    ctx.saved_micro = money.cost_micro(route.price_at(), entry.usage)
    ctx.cost_micro = 0
    ctx.deployment = next((d for d in route.deployments if d.id == entry.deployment_id), None)
    ctx.stage("cache")


async def serve(responder: Responder, ctx: RequestContext, wire: WireFormat) -> None:
    """Answer a hit in the request's own shape: the body, or the stream replayed item by item."""
    entry = ctx.cache_entry
    assert entry is not None
    cost = money.format_usd(0)
    if wire.keeps_state:  # the Responses API: a hit is a new response, under its own id (and stored)
        entry.body = await wire.complete(ctx, entry.body or render.assemble(entry.endpoint, entry.items or []))
    if not ctx.stream:
        body = entry.body if entry.body is not None else render.assemble(entry.endpoint, entry.items or [])
        if entry.body is None and ctx.endpoint in ("chat", "completions") and not body.get("usage"):
            body["usage"] = entry.usage.to_openai()  # the stream reported none: what was billed for it
        headers = wire.success_headers(ctx)
        headers.append((b"x-chittycan-cost", cost.encode()))
        await responder.send_json(200, orjson.dumps(body), headers)
        return
    items = entry.items if entry.items is not None else render.explode(entry.endpoint, entry.body or {})
    ctx.ttft_ms = ctx.elapsed_ms()
    headers = wire.success_headers(ctx)
    headers.append((b"content-type", b"text/event-stream; charset=utf-8"))
    headers.append((b"cache-control", b"no-cache"))
    await responder.start_stream(headers)
    tracker = wire.stream_tracker(ctx)
    for item in items:
        frame = tracker.frame(item)
        if frame is not None:
            await responder.write(frame)
    await responder.write(tracker.closing(cost))
    await responder.finish()


async def keep(ctx: RequestContext, body: Json | None = None) -> None:
    """Store a miss's answer if it is complete and successful (``body`` when it was not streamed)."""
    route, key, items = ctx.route, ctx.key, ctx.cache_items
    ctx.cache_items = None
    if not ctx.cache_digest or route is None or key is None or ctx.usage is None:
        return
    if ctx.status != "ok" or ctx.http_status != 200:
        return
    if body is None and (items is None or not render.complete_stream(ctx.endpoint, items)):
        return
    entry = store.Entry(
        endpoint=ctx.endpoint,
        stored_at=time.time(),
        usage=ctx.usage,
        body=body,
        items=items if body is None else None,
        deployment_id=ctx.deployment.id if ctx.deployment is not None else None,
    )
    if not await store.store(key.tenant.id, route.name, ctx.cache_digest, entry, ctx.cache_ttl):
        log.info("answer not cached (over the size cap or the store failed)", extra={"request_id": ctx.request_id})
        return
    semantic.remember(ctx, key.tenant.id)  # in the background: the answer is already sent


async def invalidate(tenant_id: int, model: str | None) -> int:
    """Drop the tenant's cached answers (of one public model, or all): how many went."""
    return await store.invalidate(tenant_id, model)

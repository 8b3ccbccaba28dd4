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

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TYPE_CHECKING, TypeVar

import orjson

from core import money
from core.money import Usage
from gateway import admission
from gateway import cache as store
from gateway.cache import coalesce, render
from gateway.context import RequestContext, Responder
from gateway.errors import GatewayError, InvalidRequest, UpstreamError
from gateway.formats import WireFormat
from gateway.formats.base import Json
from gateway.providers.base import close_stream

if TYPE_CHECKING:
    from gateway.cache.semantic import Embed

log = logging.getLogger(__name__)

T = TypeVar("T")

HEADER = b"x-chittycan-cache"
KEY_HEADER = b"x-chittycan-cache-key"
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


async def lookup(ctx: RequestContext, headers: dict[bytes, bytes], embed: Embed | None = None) -> None:
    """Find the tenant's cached answer (``ctx.cache_hit``), or prepare this answer's storing.

    After an exact miss, a model with the semantic cache on embeds the prompt through ``embed``
    and may serve the answer of a similar one (``gateway.cache.semantic``). Still a miss, the
    request joins the key's flight (coalescing): it leads it (``MISS``, it calls the upstream) or
    follows an identical request in the air (``HIT``, the leader's answer)."""
    ctx.cache_hit = False
    route, key = ctx.route, ctx.key
    if route is None or key is None:
        return
    ttl = store.enabled_ttl(route.cache_ttl, route.cache_ttl_setting, key)
    if ttl <= 0:
        return
    directives = _directives(headers)
    if "no-store" in directives or ctx.passthrough_key:
        ctx.extra_headers.append((HEADER, b"BYPASS"))
        ctx.cache_result = "bypass"
        return
    ctx.cache_ttl = _ttl(headers, ttl)
    ctx.cache_space = store.space_for(key)
    ctx.cache_digest = store.request_digest(ctx.endpoint, route.name, ctx.body, ctx.upstream_headers)
    refresh = "no-cache" in directives
    ctx.extra_headers.append((KEY_HEADER, ctx.cache_digest.encode()))  # what key_prefix invalidates
    for turn in range(_MAX_TURNS):
        entry = None if refresh else await store.lookup(ctx.cache_space, route.name, ctx.cache_digest)
        if entry is not None and entry.endpoint == ctx.endpoint:
            await _hit(ctx, entry)
            return
        if turn == 0 and route.semantic_model and embed is not None:
            from gateway.cache import semantic  # noqa: PLC0415  (numpy: only models with the semantic cache on load it)

            similar, similarity = await semantic.find(ctx, key.tenant.id, ctx.cache_space, embed, search=not refresh)
            if similar is not None:
                await _hit(ctx, similar)
                ctx.extra_headers.append((SIMILARITY_HEADER, f"{similarity:.3f}".encode()))
                return
        joined = await coalesce.join(store.lease_key(ctx.cache_space, route.name, ctx.cache_digest))
        if joined is None:
            break
        flight, leads = joined
        if leads:
            if not refresh:  # the previous leader may have stored its answer since the lookup
                entry = await store.lookup(ctx.cache_space, route.name, ctx.cache_digest)
                if entry is not None and entry.endpoint == ctx.endpoint:
                    await flight.close()
                    await _hit(ctx, entry)
                    return
            ctx.cache_flight = flight
            break
        if await _follow(ctx, flight):
            return
        refresh = False  # the leader failed: this request goes again, as it would have alone
    ctx.extra_headers.append((HEADER, b"MISS"))
    ctx.cache_result = "miss"
    if ctx.stream:
        ctx.cache_items = []


_MAX_TURNS = 5  # leaders failing in a row before a request stops following and goes alone


async def _hit(ctx: RequestContext, entry: store.Entry, *, coalesced: bool = False) -> None:
    """Serve ``entry``: it counts toward RPM (a 429 if full), reserves no budget, costs 0."""
    route = ctx.route
    assert route is not None
    await admission.count_cache_hit(ctx)
    ctx.cache_hit, ctx.cache_entry, ctx.cache_digest, ctx.coalesced = True, entry, "", coalesced
    ctx.extra_headers.append((HEADER, b"HIT"))
    ctx.cache_result = "hit"
    ctx.extra_headers.append((b"age", str(max(0, int(time.time() - entry.stored_at))).encode()))
    ctx.usage = entry.usage
    ctx.saved_micro = money.cost_micro(route.price_at(), entry.usage)
    ctx.cost_micro = 0
    ctx.deployment = next((d for d in route.deployments if d.id == entry.deployment_id), None)
    ctx.stage("cache")


async def _follow(ctx: RequestContext, flight: coalesce.Flight) -> bool:
    """Wait on an identical request's upstream call: True when it answered this one (a hit).

    A stream request follows a streaming leader live (from its first item); otherwise the
    follower waits for the complete answer. False if the leader failed before this request
    received anything: the caller goes again."""
    reader = flight.read()
    items: list[Json] = []
    body: Json | None = None
    async for kind, data in reader:
        if kind == "fail":
            return False
        if kind == "item" and ctx.stream and not items:
            await _hit(ctx, store.Entry(ctx.endpoint, time.time(), Usage(0, 0, 0, 0, 0, "cache")), coalesced=True)
            ctx.usage = None  # known at the leader's end
            ctx.cache_entry, ctx.cache_follow = None, _live(data, reader)
            return True
        if kind == "item":
            items.append(data)
        elif kind == "body":
            body = data
        elif kind == "end":
            usage, deployment_id = coalesce.usage_from(data)
            entry = store.Entry(
                ctx.endpoint, time.time(), usage, body, None if body is not None else items, deployment_id
            )
            await _hit(ctx, entry, coalesced=True)
            return True
    return False


async def _live(first: Json, reader: AsyncGenerator[coalesce.Message, None]) -> AsyncGenerator[coalesce.Message, None]:
    yield "item", first
    async for message in reader:
        yield message


async def serve(responder: Responder, ctx: RequestContext, wire: WireFormat) -> None:
    """Answer a hit in the request's own shape: the body, or the stream replayed item by item."""
    if ctx.cache_follow is not None:
        await _serve_live(responder, ctx, wire)
        return
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


async def _serve_live(responder: Responder, ctx: RequestContext, wire: WireFormat) -> None:
    """A streamed follower: the leader's items as the leader receives them, then its usage."""
    route = ctx.route
    assert route is not None
    reader, ctx.cache_follow = ctx.cache_follow, None
    ctx.ttft_ms = ctx.elapsed_ms()
    headers = wire.success_headers(ctx)
    headers.append((b"content-type", b"text/event-stream; charset=utf-8"))
    headers.append((b"cache-control", b"no-cache"))
    await responder.start_stream(headers)
    tracker = wire.stream_tracker(ctx)
    async with contextlib.aclosing(reader) as messages:
        async for kind, data in messages:
            if kind == "item":
                frame = tracker.frame(data)
                if frame is not None:
                    await responder.write(frame)
            elif kind == "end":
                ctx.usage, _ = coalesce.usage_from(data)
                ctx.saved_micro = money.cost_micro(route.price_at(), ctx.usage)
                await responder.write(tracker.closing(money.format_usd(0)))
            else:  # the leader's stream broke after it started: as this request's own would have
                ctx.status, ctx.error_type = "upstream_error", "upstream_error"
                ctx.usage = tracker.usage()
                await responder.write(
                    tracker.error_frame(UpstreamError("The upstream stream failed.", retryable=False))
                )
    await responder.finish()


async def shielded(ctx: RequestContext, call: Awaitable[T]) -> T:
    """A flight leader's upstream call goes on if its client leaves (its followers wait for it)."""
    flight = ctx.cache_flight
    if flight is None:
        return await call
    work = asyncio.ensure_future(call)
    flight.work = work
    return await asyncio.shield(work)


def fan_out(ctx: RequestContext, first: Json, rest: AsyncIterator[Json]) -> AsyncIterator[Json]:
    """A flight leader's stream: read to its end by a task of its own (which hands each item to the
    followers as it arrives), and relayed to the leader's client from there."""
    flight = ctx.cache_flight
    if flight is None:
        return rest
    flight.push("item", dict(first))
    queue: asyncio.Queue[Json | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in rest:
                flight.push("item", dict(item))
                queue.put_nowait(item)
            queue.put_nowait(None)
        except Exception as exc:  # the relay raises it in the leader's request
            queue.put_nowait(exc)
        finally:
            await close_stream(rest)

    async def relayed() -> AsyncGenerator[Json, None]:
        while True:
            got = await queue.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got

    flight.pump = asyncio.ensure_future(pump())
    return relayed()


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
    await _keep(ctx, body, items)


async def _keep(ctx: RequestContext, body: Json | None, items: list[Json] | None) -> None:
    route, usage = ctx.route, ctx.usage
    assert route is not None and usage is not None
    deployment_id = ctx.deployment.id if ctx.deployment is not None else None
    entry = store.Entry(
        endpoint=ctx.endpoint,
        stored_at=time.time(),
        usage=usage,
        body=body,
        items=items if body is None else None,
        deployment_id=deployment_id,
        prompt=store.prompt_text(ctx.endpoint, ctx.body),
    )
    flight, ctx.cache_flight = ctx.cache_flight, None
    if flight is not None:
        if body is not None:
            flight.push("body", body)
        flight.end(usage, deployment_id)
    stored = await store.store(ctx.cache_space, route.name, ctx.cache_digest, entry, ctx.cache_ttl)
    if flight is not None:
        await flight.close()
    if not stored:
        log.info("answer not cached (over the size cap or the store failed)", extra={"request_id": ctx.request_id})
        return
    if ctx.key is not None and ctx.semantic is not None:  # a semantic probe was made: store it
        from gateway.cache import semantic  # noqa: PLC0415  (numpy: only models with the semantic cache on load it)

        semantic.remember(ctx, ctx.key.tenant.id)  # in the background: the answer is already sent


async def land(ctx: RequestContext, wire: WireFormat) -> None:
    """The end of a flight leader's request, however it went (shielded, before settle): if its
    client left, the upstream call it led is completed for the followers (and billed in full);
    if it failed, the followers are told (and go again)."""
    flight = ctx.cache_flight
    if flight is None:
        return
    try:
        if ctx.status == "client_disconnected" and flight.state == "running":
            await _complete_for_followers(ctx, wire, flight)
    except GatewayError:
        pass  # the upstream failed after the leader's client left: the followers go again
    except Exception:
        log.exception("coalescing: the leader's upstream call failed after its client left")
    finally:
        ctx.cache_flight = None
        await flight.close()  # fails the flight unless it ended


async def _complete_for_followers(ctx: RequestContext, wire: WireFormat, flight: coalesce.Flight) -> None:
    if flight.pump is None and flight.work is not None:
        done = await flight.work  # the upstream call was still under way when the client left
        if not ctx.stream:
            ctx.usage = wire.read_result(ctx, done)
            if ctx.http_status == 499:
                await _keep(ctx, done, None)
            return
        first, rest = done
        flight.pump = asyncio.ensure_future(_drain(flight, first, rest))
    if flight.pump is None:
        return
    await flight.pump
    items = flight.items()
    if not render.complete_stream(ctx.endpoint, items):
        return
    tracker = wire.stream_tracker(ctx)
    for item in items:
        tracker.frame(item)
    ctx.usage = tracker.usage()
    await _keep(ctx, None, items)


async def _drain(flight: coalesce.Flight, first: Json, rest: AsyncIterator[Json]) -> None:
    flight.push("item", dict(first))
    try:
        async for item in rest:
            flight.push("item", dict(item))
    finally:
        await close_stream(rest)


_HEX = frozenset("0123456789abcdef")


def selection(data: Json, tenant_ids: tuple[int, ...] | None) -> store.Selection:
    """The entries an invalidation body names, of ``tenant_ids`` (None: every tenant's): ``model``
    (a public name), ``key_prefix`` (the start of the ``X-ChittyCan-Cache-Key`` answers carry) and
    ``pattern`` (a glob over the prompt text, e.g. ``"*quantum*"``); a bad one is a 400."""
    unknown = sorted(set(data) - {"model", "key_prefix", "pattern", "tenant"})
    if unknown:
        raise InvalidRequest(f"{unknown[0]}: unknown field (model, key_prefix, pattern, tenant)", param=unknown[0])
    model, prefix, pattern = data.get("model"), data.get("key_prefix", ""), data.get("pattern")
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidRequest("model: must be a public model name", param="model")
    if not isinstance(prefix, str) or len(prefix) > 64 or not set(prefix) <= _HEX:
        raise InvalidRequest("key_prefix: must be lowercase hex, at most 64 characters", param="key_prefix")
    if pattern is not None and (not isinstance(pattern, str) or not pattern or len(pattern) > 1000):
        raise InvalidRequest('pattern: must be a glob over the prompt text, e.g. "*quantum*"', param="pattern")
    return store.Selection(tenant_ids, model, prefix, pattern)


async def invalidate(chosen: store.Selection) -> int:
    """Drop the selected cached answers: how many went."""
    return await store.invalidate(chosen)
